"""Ablation over the notes' questions (backbone, loss, deep supervision, dropout, norm, TTA,
post-processing) on real imagery, under one CPU budget per run.

    .venv/bin/python benchmarks/ablation.py --grid benchmarks/ablation.yaml --out runs/ablation

Protocol: for each fold, whole sources (manifest's source_dataset) are held out; the rest
trains (15% of it held out for checkpoint selection and for tuning post-processing). Each
row trains for ``budget_minutes`` (``--time-limit``) on ``budget_clock`` (``cpu``: CPU time of
the training process, so rows stay comparable when the machine is shared; ``wall``) and is
scored on a centred grid of
non-overlapping 224 tiles of the held-out images with the competition Dice (threshold 0.5
unless the row tunes it on the training side). Rows with ``reuse`` only change the
evaluation of another row's checkpoints. The Markdown table is rewritten after every run,
so an interrupted ablation keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from buildseg.config import config_from_dict  # noqa: E402
from buildseg.data.datasets import GridTileDataset, split_records  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402
from buildseg.inference.core.postprocess import PostProcess, apply  # noqa: E402
from buildseg.inference.core.segmenter import Segmenter  # noqa: E402
from buildseg.inference.jobs.tune import predict_tiles, search  # noqa: E402
from buildseg.metrics import Scoreboard  # noqa: E402
from buildseg.training.loop import train  # noqa: E402


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_fold_csvs(grid: dict, root: Path, out: Path) -> dict[str, tuple[Path, Path]]:
    """Each fold's training and held-out CSVs. Sources come from the grid's manifest, or from
    the data CSV's own ``source`` column (a corpus from recipes/buildings/corpus.py)."""
    csv.field_size_limit(2**31 - 1)
    data_csv = root / grid["data"]
    with open(data_csv) as handle:
        reader = csv.DictReader(handle)
        rows, columns = list(reader), list(reader.fieldnames or [])
    if grid.get("manifest"):
        with open(root / grid["manifest"]) as handle:
            source = {row["img_id"]: row["source_dataset"] for row in csv.DictReader(handle)}
    else:
        source = {row["img_id"]: row["source"] for row in rows}
    for row in rows:
        row["img_path"] = str((data_csv.parent / row["img_path"]).resolve())
    folds = {}
    for name, held in grid["folds"].items():
        paths = []
        for part, keep in (("train", lambda r, held=held: source[r["img_id"]] not in held),
                           ("heldout", lambda r, held=held: source[r["img_id"]] in held)):
            path = out / "folds" / f"{name}_{part}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(r for r in rows if keep(r))
            paths.append(path)
        folds[name] = (paths[0], paths[1])
    return folds


def evaluate(checkpoint: Path, config, train_csv: Path, heldout_csv: Path, spec: dict) -> dict:
    seg = Segmenter.from_checkpoint(checkpoint, tta=spec.get("tta", "none"), ds_ensemble=spec.get("ds_ensemble"),
                                    threshold=0.5, min_area=0)
    post = PostProcess()
    if spec.get("tune"):
        _, val = split_records(load_records(train_csv), config.data.val_fraction, config.train.seed)
        probs, truths = predict_at_gsd(seg, GridTileDataset(val, tile=224), config.data.gsd)
        post = search(probs, truths)[0].post
    probs, truths = predict_at_gsd(seg, GridTileDataset(load_records(heldout_csv), tile=224), config.data.gsd)
    board = Scoreboard()
    for prob, truth in zip(probs, truths):
        board.add(apply(prob, post), truth)
    return {**board.summary(), "post": post}


def predict_at_gsd(seg, grid: GridTileDataset, model_gsd: float | None):
    """Probabilities and truths on the tiles' own (native) grid, so every row is scored on the
    same tiles: a tile of known GSD is resampled to the model's GSD, predicted, and its map
    resampled back (as GeoTIFF prediction writes the mask on the scene's grid)."""
    import cv2
    import torch

    if not model_gsd:
        return predict_tiles(seg, grid)
    probs, truths = [], []
    for index in range(len(grid)):
        image, mask, valid = grid[index]
        h, w = valid.tolist()
        tile = image[:, :h, :w].permute(1, 2, 0).numpy()
        gsd = grid.records[grid.tiles[index][0]].gsd
        if gsd:
            size = (max(32, round(w * gsd / model_gsd)), max(32, round(h * gsd / model_gsd)))
            small = cv2.resize(tile, size, interpolation=cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR)
            prob = seg.probabilities(torch.from_numpy(small).permute(2, 0, 1)[None].contiguous()).mean[0, 0]
            prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
        else:
            prob = seg.probabilities(torch.from_numpy(tile).permute(2, 0, 1)[None].contiguous()).mean[0, 0]
        probs.append(prob.astype(np.float32))
        truths.append(mask[0, :h, :w].numpy().astype(bool))
    return probs, truths


def fmt(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"


def paired(per_fold: dict, base: dict) -> str:
    """Mean ± sd of the per-run Dice differences against the first row (same fold and seed),
    and how many went up."""
    keys = [k for k in per_fold if k in base]
    if not keys or per_fold is base:
        return "—"
    diffs = [per_fold[k]["dice"] - base[k]["dice"] for k in keys]
    return f"{np.mean(diffs):+.3f} ± {np.std(diffs):.3f}, {sum(d > 0 for d in diffs)} of {len(diffs)} up"


def table(results: dict, grid: dict) -> str:
    folds = list(grid["folds"])
    base = next(iter(results.values()), {})
    lines = [f"| row | Dice (mean ± sd over folds {', '.join(folds)}, and seeds) | per fold (and seed) | vs first row, paired | "
             "IoU | empty-tile FP rate | train img/s | images seen | train CPU min | train wall min |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, per_fold in results.items():
        dice = [r["dice"] for r in per_fold.values()]
        lines.append(
            f"| {name} | {fmt(dice)} | {' / '.join(f'{d:.3f}' for d in dice)} | {paired(per_fold, base)} | "
            f"{fmt([r['iou'] for r in per_fold.values()])} | "
            f"{fmt([r['empty_fp_rate'] for r in per_fold.values()], 2)} | {fmt([r['img_s'] for r in per_fold.values()], 1)} | "
            f"{fmt([r['images'] for r in per_fold.values()], 0)} | {fmt([r['cpu_minutes'] for r in per_fold.values()], 1)} | "
            f"{fmt([r['minutes'] for r in per_fold.values()], 1)} |")
    return "\n".join(lines)


def train_row(row: dict, base: dict, root: Path, out: Path, budget: float, clock: str, train_csv: Path,
              seed: int | None, key: str) -> tuple[Path, object, dict]:
    """Train one row on one fold (and seed) under the budget; (best.pt, config, throughput)."""
    name = row["name"]
    overrides = {k: v for k, v in row.items() if k in ("model", "data", "train", "loss")}
    if isinstance(overrides.get("model", {}).get("weights"), str) and overrides["model"]["weights"] not in ("none", "imagenet"):
        overrides["model"]["weights"] = str((root / overrides["model"]["weights"]).resolve())
    config = config_from_dict(merge(base, overrides), source=f"row {name!r}")
    if seed is not None:
        config.train.seed = seed
    config.data.train = str(train_csv)
    config.train.out = str(out / "runs" / name.replace(" ", "_").replace("/", "-").replace(":", "") / key.replace("/", "_"))
    config.train.epochs = 10_000
    config.train.time_limit = budget
    config.train.time_limit_clock = clock
    config.train.progress = False
    done = Path(config.train.out) / "best.pt"
    if done.is_file() and (Path(config.train.out) / "stats.json").is_file():  # finished before an interruption
        return done, config, json.loads((Path(config.train.out) / "stats.json").read_text())
    started, cpu_started = time.monotonic(), time.process_time()
    result = train(config)
    minutes, cpu_minutes = (time.monotonic() - started) / 60, (time.process_time() - cpu_started) / 60
    train_seconds = sum(h["train_seconds"] for h in result.history)
    images = sum(h["train_img_s"] * h["train_seconds"] for h in result.history)
    stats = {"img_s": images / max(train_seconds, 1e-9), "images": images, "minutes": minutes, "cpu_minutes": cpu_minutes}
    (Path(config.train.out) / "stats.json").write_text(json.dumps(stats))
    return done, config, stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", default="benchmarks/ablation.yaml")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--rows", nargs="*", help="only these row names")
    parser.add_argument("--budget", type=float, help="override budget_minutes")
    parser.add_argument("--seeds", type=int, nargs="+", help="train every row with each of these seeds (default: the "
                        "row's own seed); the table then shows mean ± sd over folds x seeds")
    args = parser.parse_args()
    grid_path = Path(args.grid).resolve()
    grid = yaml.safe_load(grid_path.read_text())
    root = grid_path.parents[1]  # paths in the grid are relative to the repository root
    out = Path(args.out)
    folds = write_fold_csvs(grid, root, out)
    budget = args.budget or grid["budget_minutes"]
    clock = grid.get("budget_clock", "wall")
    base = copy.deepcopy(grid["base"])
    weights = base.get("model", {}).get("weights")
    if weights and weights not in ("none", "imagenet"):
        base["model"]["weights"] = str((root / weights).resolve())
    results: dict[str, dict] = {}
    runs: dict[tuple[str, str], tuple[Path, object, dict]] = {}
    rows = [r for r in grid["rows"] if not args.rows or r["name"] in args.rows or r.get("reuse") in args.rows]
    for row in rows:
        results[row["name"]] = {}
    # fold x seed outer, rows inner: an interrupted run still holds complete paired comparisons
    for fold, seed, (train_csv, heldout_csv) in [(f, s, p) for s in (args.seeds or [None]) for f, p in folds.items()]:
        key = fold if seed is None else f"{fold}/s{seed}"
        for row in rows:
            name = row["name"]
            if row.get("reuse"):
                if (row["reuse"], key) not in runs:
                    continue
                checkpoint, config, stats = runs[(row["reuse"], key)]
            else:
                checkpoint, config, stats = train_row(row, base, root, out, budget, clock, train_csv, seed, key)
                runs[(name, key)] = (checkpoint, config, stats)
            summary = evaluate(checkpoint, config, train_csv, heldout_csv, row.get("eval", {}))
            results[name][key] = {**summary, **stats}
            print(f"{name} / {key}: Dice {summary['dice']:.4f} ({summary['n_scored']} of {summary['n']} tiles), "
                  f"post {summary['post']}", flush=True)
            text = table(results, grid)
            (out / "ablation.md").write_text(text + "\n")
    print()
    print(table(results, grid))


if __name__ == "__main__":
    main()
