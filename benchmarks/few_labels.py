"""A new place from a few labelled tiles: the few-label fine-tune (``train --init``) against the
base model untouched and against training from ImageNet on the same tiles, same steps.

    OMP_NUM_THREADS=1 .venv/bin/python -W ignore benchmarks/few_labels.py --grid benchmarks/ablation_corpus.yaml \
        --bases runs/ablation_corpus/runs/+_hsv,_gamma_\(recipe\) --out runs/few_labels --ks 1 3 10 --seeds 0

Protocol: each fold of the grid holds out places; its base model is the fold's model from the
ablation (trained without those places, the base recipe). From the held-out tiles, ``max(ks)``
are drawn per seed (round-robin over the held-out sources); the first k of them are the user's
labels, and every other held-out tile is scored (competition Dice on the 224 px grid, at the
model's GSD), so every k and every start is scored on the same tiles. Starts:
  * ``base untouched``: the fold's base model, no training;
  * ``base + fine-tune, checked (default)``: ``train --init BASE --data K_TILES`` with the defaults
    (``train_and_tune``: the few-label check first, best.pt = the fine-tune or the base);
  * ``base + fine-tune, unchecked``: the same run's last.pt (the fine-tune, whatever the check said);
  * ``ImageNet, same steps``: the same tiles and steps from the ImageNet encoder (lr 1e-3).
A fold's base models must exist (``--bases`` holds ``FOLD_s0/best.pt`` and the ablation's ``stats.json``); folds without one wait
for it (the ablation may still be running) or are skipped with ``--no-wait``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from buildseg.config import Config  # noqa: E402
from buildseg.data.datasets import GridTileDataset  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402
from buildseg.inference.core.postprocess import PostProcess, apply  # noqa: E402
from buildseg.inference.core.segmenter import Segmenter  # noqa: E402
from buildseg.inference.jobs.tune import predict_tiles  # noqa: E402
from buildseg.metrics import Scoreboard  # noqa: E402
from buildseg.pipeline import train_and_tune  # noqa: E402
from buildseg.runtime.checkpoint import load_checkpoint  # noqa: E402

STARTS = ("base untouched", "base + fine-tune, unchecked", "base + fine-tune, checked (default)", "ImageNet, same steps")


def split(rows: list[dict], held: list[str], k_max: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(the k_max label tiles in draw order, the scored tiles) of one fold and seed."""
    rng = np.random.default_rng(seed)
    by_source = {s: [r for r in rows if r["source"] == s] for s in held}
    for members in by_source.values():
        rng.shuffle(members)
    labels: list[dict] = []
    while len(labels) < k_max and any(by_source.values()):
        for source in held:
            if by_source[source] and len(labels) < k_max:
                labels.append(by_source[source].pop())
    chosen = {r["img_id"] for r in labels}
    return labels, [r for r in rows if r["source"] in held and r["img_id"] not in chosen]


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def score(checkpoint: Path, scored_csv: Path) -> float:
    payload = load_checkpoint(checkpoint)
    gsd = (payload.get("input") or {}).get("gsd")
    seg = Segmenter.from_checkpoint(checkpoint, threshold=0.5, min_area=0)
    probs, truths = predict_tiles(seg, GridTileDataset(load_records(scored_csv), tile=224, target_gsd=gsd))
    board = Scoreboard()
    post = PostProcess()
    for prob, truth in zip(probs, truths):
        board.add(apply(prob, post), truth)
    return float(board.summary()["dice"])


def fine_tune(start: str, base: Path, labels_csv: Path, out: Path, imagenet: str, seed: int,
              few_lr: float | None = None, check: bool = True, freeze_norms: str = "auto") -> Path:
    if (out / "done").is_file():
        return out / "best.pt"
    config = Config()
    config.data.train = str(labels_csv)
    config.train.out = str(out)
    config.train.progress = False
    config.train.quantize_at_end = False
    config.train.seed = seed
    config.train.few_check = check
    config.train.few_freeze_norms = freeze_norms
    if start != STARTS[-1]:
        config.train.init = str(base)
        if few_lr:
            config.train.few_lr = config.train.few_lr_many = few_lr
    else:  # ImageNet: the base's architecture and GSD, the same few-label steps, the general learning rate
        card = load_checkpoint(base)["model_card"]
        config.model.encoder, config.model.weights = card["encoder"], imagenet
        config.data.gsd = (load_checkpoint(base).get("input") or {}).get("gsd")
        steps = config.train.few_steps
        config.data.crops_per_image = max(1, -(-steps * config.train.batch_size // len(load_records(labels_csv))))
        config.data.val = str(labels_csv)
        config.train.epochs, config.train.keep_last, config.train.tune_at_end = 1, True, False
        config.train.warmup_steps = max(1, steps // 10)
    train_and_tune(config)
    (out / "done").write_text("")
    return out / "best.pt"


def table(results: dict) -> str:
    lines = ["| k tiles | start | Dice mean ± sd over folds x seeds | per fold/seed | vs base untouched, paired |",
             "|---:|---|---:|---|---|"]
    for k in sorted({key[0] for key in results}):
        untouched = {fs: v for (kk, start, fs), v in results.items() if kk == k and start == STARTS[0]}
        for start in STARTS:
            cells = {fs: v for (kk, s, fs), v in results.items() if kk == k and s == start}
            if not cells:
                continue
            values = list(cells.values())
            diffs = [cells[fs] - untouched[fs] for fs in cells if fs in untouched]
            paired = "—" if start == STARTS[0] or not diffs else (
                f"{np.mean(diffs):+.3f} ± {np.std(diffs):.3f}, {sum(d > 0 for d in diffs)} of {len(diffs)} up")
            per = " / ".join(f"{fs} {v:.3f}" for fs, v in cells.items())
            lines.append(f"| {k} | {start} | {np.mean(values):.3f} ± {np.std(values):.3f} | {per} | {paired} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="benchmarks/ablation_corpus.yaml")
    parser.add_argument("--bases", required=True, help="folder of the fold base models: FOLD_s0/best.pt")
    parser.add_argument("--out", default="runs/few_labels")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--imagenet-at", type=int, nargs="*", default=None, help="ks that also train from ImageNet "
                        "(default: all)")
    parser.add_argument("--no-wait", action="store_true")
    parser.add_argument("--folds", nargs="*", help="only these folds of the grid (default: all)")
    parser.add_argument("--few-lr", type=float, help="the fine-tune's train.few_lr (default: the config's)")
    parser.add_argument("--no-few-check", action="store_true", help="fine-tune without the few-label check")
    parser.add_argument("--freeze-norms", choices=["auto", "on", "off"], default="auto", help="train.few_freeze_norms")
    parser.add_argument("--tables", nargs="*", help="print one table from these few_labels.json files (runs split "
                        "over processes with --folds) and exit")
    args = parser.parse_args()
    if args.tables:
        merged = {}
        for path in args.tables:
            for key, value in json.loads(Path(path).read_text()).items():
                k, start, fold_seed = key.split("|")
                merged[(int(k), start, fold_seed)] = value
        print(table(merged))
        return
    grid_path = Path(args.grid).resolve()
    grid = yaml.safe_load(grid_path.read_text())
    root = grid_path.parents[1]
    csv.field_size_limit(2**31 - 1)
    with open(root / grid["data"]) as handle:
        rows = list(csv.DictReader(handle))
    imagenet = str((root / grid["base"]["model"]["weights"]).resolve())
    out = Path(args.out)
    results: dict = {}
    for seed in args.seeds:
        for fold, held in grid["folds"].items():
            if args.folds and fold not in args.folds:
                continue
            base = Path(args.bases) / f"{fold}_s0" / "best.pt"
            finished = base.parent / "stats.json"  # the ablation writes it when the fold's training has ended
            while not finished.is_file() and not args.no_wait:
                time.sleep(30)
            if not finished.is_file():
                continue
            labels, scored = split(rows, held, max(args.ks), seed)
            scored_csv = write_csv(scored, out / "data" / f"{fold}_s{seed}_scored.csv")
            key = f"{fold}/s{seed}"
            untouched = score(base, scored_csv)
            for k in args.ks:
                results[(k, STARTS[0], key)] = untouched
                labels_csv = write_csv(labels[:k], out / "data" / f"{fold}_s{seed}_k{k}.csv")
                for start in (STARTS[2], STARTS[3]):
                    if start == STARTS[3] and args.imagenet_at is not None and k not in args.imagenet_at:
                        continue
                    name = "finetune" if start == STARTS[2] else "imagenet"
                    checkpoint = fine_tune(start, base, labels_csv, out / "runs" / f"{fold}_s{seed}_k{k}_{name}", imagenet,
                                           seed, args.few_lr, check=not args.no_few_check,
                                           freeze_norms=args.freeze_norms)
                    results[(k, start, key)] = score(checkpoint, scored_csv)
                    if start == STARTS[2]:  # the fine-tune itself is the run's last.pt
                        results[(k, STARTS[1], key)] = score(checkpoint.parent / "last.pt", scored_csv)
                    print(f"{key} k={k} {start}: Dice {results[(k, start, key)]:.4f} (untouched {untouched:.4f})", flush=True)
                (out / "few_labels.md").write_text(table(results) + "\n")
                (out / "few_labels.json").write_text(json.dumps({"|".join(map(str, k)): v for k, v in results.items()}))
    print(table(results))


if __name__ == "__main__":
    main()
