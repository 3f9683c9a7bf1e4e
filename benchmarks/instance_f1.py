"""Building-level F1 on real imagery: the default model against one trained with the contact
target and split with the watershed; footprints with and without regularisation.

    .venv/bin/python benchmarks/instance_f1.py --out runs/instance_f1 --budget 6 --seeds 0 1

Same folds as the ablation (``benchmarks/ablation.yaml``: whole sources held out). Every model
trains for ``--budget`` CPU minutes on the fold's training sources (the ablation's base
config: lite0 with the offline ImageNet weights); its post-processing (threshold, min-area,
empty rule) is tuned for building F1 on the training side's validation images, as ``buildseg
tune --objective f1`` does. It is then scored on the centred 224 px grid of the held-out images:

* pixels: the competition Dice;
* buildings, from masks: connected components matched at IoU >= 0.5, giving F1, precision and
  recall (``instance_metrics.match_masks``);
* buildings, from footprints: each tile's predicted buildings polygonised (exact pixel
  outlines, or regularised by ``buildingregulariser``) and matched against the truth's
  polygons (``match_polygons``).

All rows of a fold and seed run in the same process, one after another, on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import merge, write_fold_csvs  # noqa: E402
from buildseg.config import config_from_dict  # noqa: E402
from buildseg.data.datasets import GridTileDataset, split_records  # noqa: E402
from buildseg.footprints.clean import FootprintOptions, clean_footprints  # noqa: E402
from buildseg.footprints.polygons import mask_parts, mask_polygons  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402
from buildseg.inference.core.segmenter import Segmenter  # noqa: E402
from buildseg.inference.jobs.tune import tune_segmenter  # noqa: E402
from buildseg.instance_metrics import InstanceCounts, match_masks, match_polygons  # noqa: E402
from buildseg.metrics import Scoreboard  # noqa: E402
from buildseg.training.loop import train  # noqa: E402

MODELS = {"default (footprint)": ["footprint"], "footprint + contact": ["footprint", "contact"]}


def tile_maps(seg: Segmenter, dataset: GridTileDataset, batch: int = 16):
    from torch.utils.data import DataLoader

    for images, masks, valid in DataLoader(dataset, batch_size=batch, shuffle=False):
        maps = seg.probabilities(images).mean
        for k in range(len(images)):
            h, w = valid[k].tolist()
            yield maps[k, :, :h, :w], masks[k, 0, :h, :w].numpy().astype(np.uint8)


def score(seg: Segmenter, heldout_csv: Path, regularize: bool) -> dict[str, dict]:
    """Per evaluation row: Dice and building metrics over the held-out tiles."""
    dataset = GridTileDataset(load_records(heldout_csv), tile=224)
    rows = {"mask": (Scoreboard(), InstanceCounts())}
    if seg.split:
        rows["mask, no split"] = (Scoreboard(), InstanceCounts())
    polygons = {"polygons, exact": InstanceCounts()}
    if regularize:
        polygons["polygons, regularised"] = InstanceCounts()
    for maps, truth in tile_maps(seg, dataset):
        variants = {"mask": seg.rules(maps)}
        if seg.split:
            variants["mask, no split"] = seg.rules(maps[0])  # the footprint map alone: no watershed
        for name, mask in variants.items():
            board, counts = rows[name]
            board.add(mask, truth)
            counts += match_masks(mask, truth).counts
        truth_polys = mask_polygons(truth)
        parts = mask_parts(variants["mask"], maps[0])
        for name, counts in polygons.items():
            options = FootprintOptions(simplify=0.0, regularize=name.endswith("regularised"))
            frame = clean_footprints(parts, None, 1.0, None, options, "tile")
            counts += match_polygons(list(frame.geometry), truth_polys)[0]
    out = {name: {**board.summary(), **{f"b_{k}": v for k, v in counts.summary().items()}}
           for name, (board, counts) in rows.items()}
    for name, counts in polygons.items():
        out[name] = {"dice": math.nan, **{f"b_{k}": v for k, v in counts.summary().items()}}
    return out


def fmt(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| model / evaluation | runs | Dice | building F1 | precision | recall | matched IoU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        lines.append(f"| {name} | {len(runs)} | {fmt([r['dice'] for r in runs])} | {fmt([r['b_f1'] for r in runs])} | "
                     f"{fmt([r['b_precision'] for r in runs])} | {fmt([r['b_recall'] for r in runs])} | "
                     f"{fmt([r['b_mean_iou'] for r in runs])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="benchmarks/ablation.yaml")
    parser.add_argument("--out", default="runs/instance_f1")
    parser.add_argument("--budget", type=float, default=6.0, help="CPU minutes of training per model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reuse", action="store_true", help="evaluate the runs' existing best.pt, train only missing ones")
    args = parser.parse_args()
    grid_path = Path(args.grid).resolve()
    grid = yaml.safe_load(grid_path.read_text())
    root = grid_path.parents[1]
    out = Path(args.out)
    folds = write_fold_csvs(grid, root, out)
    base = copy.deepcopy(grid["base"])
    base["model"]["weights"] = str((root / base["model"]["weights"]).resolve())
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for fold, (train_csv, heldout_csv) in folds.items():
            for model_name, targets in MODELS.items():
                config = config_from_dict(merge(base, {"model": {"targets": targets}, "train": {"seed": seed}}))
                config.data.train = str(train_csv)
                config.train.out = str(out / "runs" / f"{model_name.split()[0]}_{'_'.join(targets)}" / f"{fold}_s{seed}")
                config.train.epochs, config.train.time_limit = 10_000, args.budget
                config.train.time_limit_clock, config.train.progress = "cpu", False
                started = time.monotonic()
                if not (args.reuse and (Path(config.train.out) / "best.pt").is_file()):
                    train(config)
                seg = Segmenter.from_checkpoint(Path(config.train.out) / "best.pt", threshold=0.5, min_area=0)
                # post-processing tuned for building F1 on the training side's held-out 15%, as
                # `buildseg tune --objective f1` would (threshold, min-area, empty rule)
                _, val = split_records(load_records(train_csv), config.data.val_fraction, config.train.seed)
                seg = seg.with_settings(postprocess=tune_segmenter(seg, GridTileDataset(val, tile=224), "f1").best)
                for evaluation, summary in score(seg, heldout_csv, regularize=len(targets) == 1).items():
                    results.setdefault(f"{model_name}: {evaluation}", []).append(summary)
                    print(f"{model_name} / {evaluation} / {fold} / seed {seed}: Dice {summary['dice']:.4f}, "
                          f"F1 {summary['b_f1']:.4f} (P {summary['b_precision']:.3f}, R {summary['b_recall']:.3f}) "
                          f"[{(time.monotonic() - started) / 60:.1f} min]", flush=True)
                (out / "instance_f1.md").write_text(table(results) + "\n")
    print()
    print(table(results))


if __name__ == "__main__":
    main()
