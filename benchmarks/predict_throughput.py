"""End-to-end prediction with the defaults after `buildseg train` (no manual quantize step)
against a plain fp32 segmentation_models_pytorch loop, on the same tiles, in one run.

    .venv/bin/pip install segmentation-models-pytorch      # benchmark environment only
    .venv/bin/python benchmarks/predict_throughput.py [--encoder resnet50] [--n 2000] [--train-minutes 3]

1. Trains Unet-<encoder> with `buildseg train`'s defaults (`pipeline.train_and_tune`: the
   post-processing search and the end-of-training int8 step included) for
   ``--train-minutes`` on ``--data`` (default: ../shared/data/real_dev/train.csv; the
   synthetic generator when it is missing).
2. Cuts ``--n`` 224 px tiles (random windows and D4 transforms of those images, with their
   masks) as PNGs with a competition test CSV and a truth CSV.
3. Predicts them end to end to a submission CSV: the plain smp fp32 loop (OpenCV decode, NCHW
   fp32, batches of 32, NumPy RLE; random weights, speed does not depend on them), buildseg
   torch fp32 (the Dice reference), buildseg's defaults on this CPU, and buildseg's defaults
   as they are on a CPU without native bf16 (the CPU check patched: int8 when the run's int8
   model was accepted, else fp32).

Ratios are against the plain loop in the same run; the Dice change is against torch fp32 on the
same tiles. On a CPU with AMX the "as without bf16" row runs int8 on AMX-int8 hardware, so its
speed is not that of an AVX2 machine: its ratio on such a machine must be measured there.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from buildseg.data.datasets import MaskCache  # noqa: E402
from buildseg.evaluation import evaluate_csv  # noqa: E402
from buildseg.formats import rle  # noqa: E402
from buildseg.formats.images import read_rgb, write_png  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402
from buildseg.inference.core.segmenter import Segmenter  # noqa: E402
from buildseg.inference.jobs.tiles import predict_records  # noqa: E402
from loader_throughput import cpu_flags  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared/data/real_dev/train.csv"


def notebook_rle(mask: np.ndarray) -> str:
    pixels = np.concatenate([[0], mask.flatten(), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs) if len(runs) else "-1"


def plain_smp(encoder: str, records, out_csv: Path, batch: int = 32) -> float:
    import segmentation_models_pytorch as smp

    model = smp.Unet(encoder_name=encoder, encoder_weights=None, classes=1).eval()
    mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
    std = np.array([0.229, 0.224, 0.225], np.float32) * 255
    start = time.perf_counter()
    rows = []
    with torch.no_grad():
        for i in range(0, len(records), batch):
            chunk = records[i : i + batch]
            images = np.stack([cv2.cvtColor(cv2.imread(str(r.image_path)), cv2.COLOR_BGR2RGB) for r in chunk])
            x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).astype(np.float32))
            masks = (torch.sigmoid(model(x)) > 0.5).numpy()[:, 0].astype(np.uint8)
            rows += [(r.img_id, notebook_rle(m)) for r, m in zip(chunk, masks)]
    with open(out_csv, "w", newline="") as handle:
        csv.writer(handle).writerows([("img_id", "mask_rle"), *rows])
    return len(records) / (time.perf_counter() - start)


def cut_tiles(source_csv: Path, n: int, folder: Path, side: int = 224, seed: int = 0) -> tuple[Path, Path]:
    """``n`` tiles (random windows, quarter turns and flips of the labelled images) as PNGs,
    with a test CSV (img_id,img_path) and a truth CSV (img_id,mask_rle)."""
    rng = np.random.default_rng(seed)
    masks = MaskCache()
    images = [(read_rgb(r.image_path), r) for r in load_records(source_csv, require_masks=True)]
    sources = [(image, masks.get(r, image.shape[:2])) for image, r in images if min(image.shape[:2]) >= side]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    tests, truths = [], []
    for k in range(n):
        image, mask = sources[int(rng.integers(len(sources)))]
        y, x = (int(rng.integers(0, s - side + 1)) for s in image.shape[:2])
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        tile, truth = (np.rot90(a[y : y + side, x : x + side], turns) for a in (image, mask))
        if flip:
            tile, truth = tile[:, ::-1], truth[:, ::-1]
        name = f"TILE_{k:05d}"
        write_png(folder / "images" / f"{name}.png", np.ascontiguousarray(tile))
        tests.append((name, f"images/{name}.png"))
        truths.append((name, rle.encode(np.ascontiguousarray(truth))))
    for path, header, rows in ((folder / "test.csv", ("img_id", "img_path"), tests),
                               (folder / "truth.csv", ("img_id", "mask_rle"), truths)):
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows([header, *rows])
    return folder / "test.csv", folder / "truth.csv"


def train_defaults(encoder: str, data: Path, minutes: float, out: Path, weights: str):
    from buildseg.config import Config
    from buildseg.pipeline import train_and_tune

    config = Config()
    config.data.train = str(data)
    config.model.encoder, config.model.weights = encoder, weights
    config.train.out = str(out)
    config.train.epochs = 1000
    config.train.time_limit = minutes
    config.train.progress = False
    start = time.perf_counter()
    result, finished = train_and_tune(config)
    return result, finished, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--train-minutes", type=float, default=3.0)
    parser.add_argument("--data", default=str(REAL), help="labelled training CSV (default: ../shared real_dev)")
    parser.add_argument("--weights", default="none", help="encoder weights: none (offline default), imagenet, or a file")
    args = parser.parse_args()
    from buildseg.runtime import device as device_rules

    native = device_rules.cpu_has_native_bf16()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data)
        if not data.is_file():
            from buildseg.data.synth import write_dataset

            data = write_dataset(tmp / "synth", n_train=16, train_size=512, n_test=0, seed=7, progress=False).train_csv
        result, finished, seconds = train_defaults(args.encoder, data, args.train_minutes, tmp / "run", args.weights)
        int8 = finished.int8
        print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"trained Unet-{args.encoder} (weights {args.weights}) with the defaults on {data} for {args.train_minutes:g} min "
              f"({seconds:.0f} s with tuning and int8): val Dice {result.best_score:.4f}")
        if int8 is not None:
            print(f"end-of-training int8: {'accepted' if int8.accepted else 'refused'} ({int8.reason}), "
                  f"{int8.seconds:.0f} s")
        test_csv, truth_csv = cut_tiles(data, args.n, tmp / "tiles")
        records = load_records(test_csv)
        print(f"\n{len(records)} tiles of 224 px cut from {data.name}'s images -> submission CSV\n")
        print("| pipeline | engine, precision | img/s | vs plain smp fp32 | Dice | Dice change vs torch fp32 |")
        print("|---|---|---:|---:|---:|---:|")
        plain = plain_smp(args.encoder, records, tmp / "plain.csv")
        print(f"| plain smp fp32 loop (random weights) | torch, fp32 | {plain:.1f} | 1.00x | n/a | n/a |", flush=True)
        reference = None
        rows = [("buildseg torch fp32", dict(engine="torch", precision="fp32"), native),
                ("buildseg defaults on this CPU", {}, native),
                ("buildseg defaults as on a CPU without bf16", {}, False)]
        for label, options, has_bf16 in rows:
            device_rules.cpu_has_native_bf16 = lambda value=has_bf16: value
            seg = Segmenter.from_checkpoint(result.run_dir, device="cpu", **{"engine": "auto", **options})
            _, stats = predict_records(seg, records, tmp / "sub.csv", progress=False)
            dice = evaluate_csv(tmp / "sub.csv", truth_csv)["dice"]
            reference = dice if reference is None else reference
            print(f"| {label} | {seg.engine}, {seg.precision} | {stats.img_per_s:.1f} | {stats.img_per_s / plain:.2f}x | "
                  f"{dice:.4f} | {dice - reference:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
