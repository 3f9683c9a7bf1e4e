"""int8 at first use, with no labels: does agreement with fp32's masks say what the labels would?

    .venv/bin/python -W ignore benchmarks/first_int8.py --data runs/buildings_corpus.csv [--model buildings]

``predict --precision auto`` with a model that has no int8 model (the packaged one) calibrates
one on up to 64 tiles of the input: half calibrate, half judge it by how well its masks agree
with fp32's (``jobs/first_int8.py``), kept within ``AGREEMENT_DROP``. Here that runs
once per source of a labelled corpus (each source as one user's input, its own engine cache),
here as plain int8 (no accuracy control: the question is what agreement says), and then fp32
and int8 are scored against the labels on the source's tiles (the calibration read images,
never labels): the label-free agreement next to the Dice change it stands for. Prints one
row per source and the paired change over sources.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from buildseg.data.datasets import GridTileDataset  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402
from buildseg.inference.core import engines  # noqa: E402
from buildseg.inference.core.postprocess import PostProcess  # noqa: E402
from buildseg.inference.jobs import first_int8, quantize  # noqa: E402
from buildseg.runtime.checkpoint import checkpoint_paths, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/buildings_corpus.csv", help="labelled CSV with a source column")
    parser.add_argument("--model", default="buildings")
    args = parser.parse_args()
    import openvino as ov

    path = checkpoint_paths(f"model:{args.model}")[0]
    model, payload = load_model(path)
    post = PostProcess.from_dict(payload.get("postprocess"))
    gsd = (payload.get("input") or {}).get("gsd")
    records = load_records(args.data, require_masks=True)
    sources = sorted({r.tile_source for r in records})
    score = quantize.tile_dice(post)
    core = ov.Core()
    rows = []
    print("| source | tiles | plain int8: agreement with fp32 (label-free) | Dice fp32 | Dice int8 | change |")
    print("|---|---:|---:|---:|---:|---:|")
    for source in sources:
        mine = [r for r in records if r.tile_source == source]
        labelled = GridTileDataset(mine, tile=224, in_chans=model.card.in_chans, target_gsd=gsd)
        blank = GridTileDataset([replace(r, rle="-1", mask_path=None) for r in mine], tile=224,
                                in_chans=model.card.in_chans, target_gsd=gsd)
        images = [image for image, _ in quantize.sample_tiles(blank, first_int8.FIRST_USE_TILES)]
        if len(images) < 4:
            continue
        with tempfile.TemporaryDirectory() as cache:
            os.environ["BUILDSEG_ENGINE_CACHE"] = cache
            judged = images[1::2]
            validation = list(zip(judged, first_int8.fp32_masks(path, judged)))
            if not any(mask.any() for _, mask in validation):
                continue
            verdict = quantize.calibrate_int8(path, calibration=images[0::2], validation=validation, max_drop=None,
                                              keep_refused=True, truth="fp32 masks")
            tiles = quantize.sample_tiles(labelled, 300, seed=1)  # the labels: every tile of the source, up to 300
            onnx = str(engines.cached_onnx(model, Path(cache)))
            fp32 = score(core.compile_model(onnx, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), tiles)
            int8 = score(core.compile_model(verdict.path, "CPU"), tiles)
        rows.append((verdict.dice_int8, fp32, int8))
        print(f"| {source} | {len(tiles)} | {verdict.dice_int8:.4f} | {fp32:.4f} | {int8:.4f} | {int8 - fp32:+.4f} |",
              flush=True)
    changes = np.array([r[2] - r[1] for r in rows])
    agreement = np.array([r[0] for r in rows])
    print(f"\n{len(rows)} sources: Dice change int8 - fp32 {changes.mean():+.4f} ± {changes.std():.4f} "
          f"(worst {changes.min():+.4f}); label-free agreement {agreement.mean():.4f} (lowest {agreement.min():.4f}); "
          f"correlation of agreement and change {np.corrcoef(agreement, changes)[0, 1]:+.2f}")


if __name__ == "__main__":
    main()
