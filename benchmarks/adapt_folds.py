"""Does `buildseg adapt` help on sources the model never saw? Source-held-out folds x seeds,
paired against the unadapted model, in one run.

    .venv/bin/python -W ignore benchmarks/adapt_folds.py --out runs/adapt_folds --seeds 0 1 [--steps 100]

The folds, data and training recipe are the generalisation ablation's
(``ablation_generalise.yaml``; the current defaults: one-cycle, d4 + colour, lite0 with the
offline ImageNet weights, 3 CPU minutes of training). For each fold x seed: train once, then
adapt that checkpoint to the held-out sources' images (a CSV of ``img_id,img_path`` only: no
masks) with each variant, and score every model on the held-out images' 224 px grid with the
competition Dice at threshold 0.5 (the ablation's ``evaluate``). Adapting runs a fixed number
of steps, so the comparison does not depend on the machine's load. "paired" is the mean and
sd of the per-run differences against the same run unadapted, and how many went up.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import evaluate, merge, write_fold_csvs  # noqa: E402
from buildseg.adaptation.loop import AdaptSettings, adapt  # noqa: E402
from buildseg.config import config_from_dict  # noqa: E402
from buildseg.training.loop import train  # noqa: E402
from loader_throughput import cpu_flags  # noqa: E402

VARIANTS = {
    "batch-norm re-estimation only": dict(self_training=False, bn=True),
    "self-training (EMA teacher, confident pixels)": dict(self_training=True, bn=False),
    "self-training + batch-norm re-estimation": dict(self_training=True, bn=True),
    "self-training + labelled source batches": dict(self_training=True, bn=False, labelled=True),
    "self-training, d4 teacher (pseudo-labels from the mean of 8 views)": dict(self_training=True, bn=False,
                                                                             teacher_tta="d4"),
}


def unlabelled(heldout_csv: Path, out: Path) -> Path:
    """The held-out images as a test CSV: img_id,img_path, no masks."""
    with open(heldout_csv) as handle:
        rows = [{"img_id": r["img_id"], "img_path": r["img_path"]} for r in csv.DictReader(handle)]
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["img_id", "img_path"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=str(Path(__file__).with_name("ablation_generalise.yaml")))
    parser.add_argument("--out", default="runs/adapt_folds")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=AdaptSettings.steps)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    grid_path = Path(args.grid)
    grid = yaml.safe_load(grid_path.read_text())
    root, out = grid_path.parents[1], Path(args.out)
    folds = write_fold_csvs(grid, root, out)
    base = merge(copy.deepcopy(grid["base"]), {"train": {"scheduler": "onecycle"}})  # today's defaults
    base["model"]["weights"] = str((root / base["model"]["weights"]).resolve())
    print(f"CPU flags: {cpu_flags()}; {args.steps} adapt steps per variant\n", flush=True)
    scores: dict[str, dict[str, float]] = {"unadapted (train alone)": {}}
    for seed in args.seeds:
        for fold, (train_csv, heldout_csv) in folds.items():
            key = f"{fold}/s{seed}"
            run = out / "train" / key.replace("/", "_")
            config = config_from_dict(base, source="adapt_folds base")
            config.train.seed, config.data.train, config.train.out = seed, str(train_csv), str(run)
            config.train.epochs, config.train.time_limit = 10_000, grid["budget_minutes"]
            config.train.time_limit_clock, config.train.progress = grid.get("budget_clock", "wall"), False
            if not (run / "best.pt").is_file():
                train(config)
            scores["unadapted (train alone)"][key] = evaluate(run / "best.pt", config, train_csv, heldout_csv, {})["dice"]
            target = unlabelled(heldout_csv, out / f"{fold}_target.csv")
            for name in args.variants:
                options = dict(VARIANTS[name])
                options["labelled"] = str(train_csv) if options.get("labelled") else None
                settings = replace(AdaptSettings(), steps=args.steps, seed=seed, progress=False, **options)
                adapted = out / "adapt" / name.split(" (")[0].replace(" ", "_").replace("+", "and") / key.replace("/", "_")
                started = time.monotonic()
                if not (adapted / "best.pt").is_file():
                    adapt(run / "best.pt", target, adapted, settings)
                dice = evaluate(adapted / "best.pt", config, train_csv, heldout_csv, {})["dice"]
                scores.setdefault(name, {})[key] = dice
                print(f"{name} / {key}: Dice {dice:.4f} (unadapted {scores['unadapted (train alone)'][key]:.4f}), "
                      f"{time.monotonic() - started:.0f} s", flush=True)
            (out / "adapt_folds.md").write_text(table(scores) + "\n")
    print()
    print(table(scores))


def table(scores: dict[str, dict[str, float]]) -> str:
    base = scores["unadapted (train alone)"]
    keys = list(base)
    lines = [f"| row | runs | Dice mean ± sd | {' / '.join(keys)} | vs unadapted, paired (mean ± sd) | up |",
             "|---|---:|---:|---|---:|---:|"]
    for name, per_run in scores.items():
        values = [per_run[k] for k in keys if k in per_run]
        diffs = [per_run[k] - base[k] for k in keys if k in per_run]
        paired = "—" if name == "unadapted (train alone)" else f"{np.mean(diffs):+.3f} ± {np.std(diffs):.3f}"
        up = "—" if name == "unadapted (train alone)" else f"{sum(d > 0 for d in diffs)} of {len(diffs)}"
        lines.append(f"| {name} | {len(values)} | {np.mean(values):.3f} ± {np.std(values):.3f} | "
                     f"{' / '.join(f'{v:.3f}' for v in values)} | {paired} | {up} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
