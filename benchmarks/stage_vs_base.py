"""A training stage of ``buildings`` 2.0 against the packaged base, on places neither saw.

The places named by ``--places`` (``recipes/buildings/corpus.py`` keys) are left out of the
stage's corpus (``corpus.py --hold-out``), and ``buildings`` 1.0 never saw ``more_dev2``, so
both models meet them for the first time. Each of their tiles is cut into the centred grid of
224 px tiles the competition's test tiles were made by, written as PNGs with a test CSV, and
predicted by ``buildseg predict`` (torch engine, the models' own post-processing) twice:

* **as is**: no GSD, as a competition CSV arrives (the hidden sets' case);
* **known GSD**: the CSV's ``gsd`` column, so each tile is resampled to the model's GSD and back.

Scores per model and mode: competition Dice (per tile, tiles empty in truth and prediction
left out), building F1 (IoU 0.5), and the empty-tile false-positive rate; then the paired
per-tile Dice difference (stage - base: mean +- std, tiles up / down) per place.

    python benchmarks/stage_vs_base.py --stage runs/stage1/best.pt [--base buildings@1.0]
        [--places rio nacala yangon_uav] [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "recipes" / "buildings"))

from corpus import corpus_rows, place_of  # noqa: E402

from loader_throughput import cpu_flags  # noqa: E402

BUILDSEG = str(Path(sys.executable).with_name("buildseg"))
TILE = 224


def grid_tiles(rows: list[dict], folder: Path) -> list[dict]:
    """The 224 px grid of every corpus row, written as PNGs: one dict per grid tile."""
    from buildseg.data.datasets import grid_offsets
    from buildseg.formats import rle
    from buildseg.formats.tables import parse_gsd

    tiles = []
    for row in rows:
        image = np.asarray(Image.open(row["img_path"]).convert("RGB"))
        mask = rle.decode(row["mask_rle"], image.shape[:2])
        for y, h in grid_offsets(image.shape[0], TILE):
            for x, w in grid_offsets(image.shape[1], TILE):
                img_id = f"{row['img_id']}_{y}_{x}"
                path = folder / f"{img_id}.png"
                Image.fromarray(image[y:y + h, x:x + w]).save(path)
                tiles.append({"img_id": img_id, "img_path": str(path), "truth": mask[y:y + h, x:x + w],
                              "place": place_of(row["source"]), "gsd": parse_gsd(row["gsd"], where=row["img_id"])})
    return tiles


def predict(model: str, tiles: list[dict], folder: Path, *, with_gsd: bool) -> dict[str, np.ndarray]:
    from buildseg.formats import rle
    from buildseg.formats.tables import read_rle_table

    table, out = folder / "tiles.csv", folder / "pred.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["img_id", "img_path"] + (["gsd"] if with_gsd else []))
        for t in tiles:
            writer.writerow([t["img_id"], t["img_path"]] + ([t["gsd"] or ""] if with_gsd else []))
    source = ["--model", model] if not Path(model).exists() else ["--checkpoint", model]
    env = {**os.environ, "BUILDSEG_PRECISION_AUTO": "rule"}  # one precision for every run
    done = subprocess.run([BUILDSEG, "predict", *source, "--data", str(table), "--out", str(out), "--engine", "torch",
                           "--no-progress"], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"predict failed for {model}:\n{done.stderr[-2000:]}")
    pred = read_rle_table(out)
    return {t["img_id"]: rle.decode(pred[t["img_id"]], t["truth"].shape) for t in tiles}


def scores(masks: dict[str, np.ndarray], tiles: list[dict]) -> tuple[np.ndarray, dict]:
    """Per-tile Dice (nan where truth and prediction are both empty) and the summary."""
    from buildseg.instance_metrics import InstanceCounts, match_masks
    from buildseg.metrics import image_counts, summarize

    counts, buildings = np.zeros((len(tiles), 3), np.int64), InstanceCounts()
    for i, t in enumerate(tiles):
        counts[i] = image_counts(masks[t["img_id"]], t["truth"])
        buildings += match_masks(masks[t["img_id"]], t["truth"]).counts
    tp, fp, fn = counts.T.astype(float)
    with np.errstate(invalid="ignore"):
        dice = np.where(tp + fp + fn == 0, np.nan, 2 * tp / (2 * tp + fp + fn))
    return dice, {**summarize(counts), **buildings.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, help="the stage's checkpoint (RUN/best.pt) or packaged name")
    parser.add_argument("--base", default="buildings@1.0")
    parser.add_argument("--places", nargs="+", default=["rio", "nacala", "yangon_uav"])
    parser.add_argument("--shared", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--json", type=Path, help="also write the figures here (package.py --quality reads them)")
    args = parser.parse_args()
    figures: dict[str, str] = {}
    rows = [r for r in corpus_rows(args.shared) if place_of(r["source"]) in args.places]
    print(f"CPU: {cpu_flags()}; {time.strftime('%Y-%m-%d')}; places {', '.join(args.places)}: {len(rows)} tiles")
    with tempfile.TemporaryDirectory() as tmp:
        tiles = grid_tiles(rows, Path(tmp))
        places = np.array([t["place"] for t in tiles])
        print(f"{len(tiles)} grid tiles of {TILE} px, {sum(not t['truth'].any() for t in tiles)} building-free\n")
        print("| mode | model | competition Dice | building F1 | empty-tile FP rate |")
        print("|---|---|---:|---:|---:|")
        per_tile = {}
        for mode in ("as is", "known GSD"):
            for name in (args.base, args.stage):
                masks = predict(name, tiles, Path(tmp), with_gsd=mode == "known GSD")
                dice, summary = scores(masks, tiles)
                per_tile[mode, name] = dice
                print(f"| {mode} | {name} | {summary['dice']:.3f} | {summary['f1']:.3f} | {summary['empty_fp_rate']:.2f} |")
                figures[f"held_out {mode}: {'this model' if name == args.stage else name}"] = (f"Dice {summary['dice']:.3f}, building F1 {summary['f1']:.3f}, "
                                                       f"empty-tile FP {summary['empty_fp_rate']:.2f}")
        print("\nPaired per-tile Dice, stage - base (a tile empty in both of one model's truth and prediction "
              "scores 1 when the other predicts there):")
        print("| mode | place | tiles | base | stage | change | up / down |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for mode in ("as is", "known GSD"):
            a, b = per_tile[mode, args.base], per_tile[mode, args.stage]
            a, b = np.where(np.isnan(a) & ~np.isnan(b), 1.0, a), np.where(np.isnan(b) & ~np.isnan(a), 1.0, b)
            for place in [*args.places, "all"]:
                keep = ~np.isnan(a) & ((places == place) if place != "all" else True)
                d = b[keep] - a[keep]
                print(f"| {mode} | {place} | {keep.sum()} | {a[keep].mean():.3f} | {b[keep].mean():.3f} | "
                      f"{d.mean():+.3f} +- {d.std():.3f} | {(d > 0).sum()} / {(d < 0).sum()} |")
            figures[f"held_out {mode}: paired per tile vs {args.base}"] = f"{d.mean():+.3f} +- {d.std():.3f}"
    if args.json:
        figures["held_out places"] = (f"{', '.join(args.places)} ({len(tiles)} grid tiles of {TILE} px), out of the "
                                      f"training of both models; benchmarks/stage_vs_base.py")
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
