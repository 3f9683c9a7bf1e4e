"""Post-processing for places the model never saw: tuned on development tiles, on other
places, or not at all (issue 33, "empty tiles in new places").

The fold models of ``ablation.py --grid benchmarks/ablation_corpus.yaml`` (one row, every
fold and seed) predict their held-out places (native grid, as the ablation scores them).
Four post-processings are scored on each fold's held-out tiles with the competition Dice,
the empty-tile false-positive rate and the building F1:

* default: threshold 0.5, no min-area, no empty-tile rule (what a fresh run without tuning does);
* other places: threshold, min-area and the empty-tile rule (empty if the tile's max
  probability is below E) tuned on the held-out tiles of the *other* folds, pooled (the same
  seed): a rule that has only seen places other than the one it is judged on;
* a few labelled tiles of the place (``--few``, 10): tuned on that many of its held-out tiles
  drawn at random (what ``buildseg tune`` on a handful of labels does), every row then scored
  on the fold's other tiles;
* the place itself (oracle): tuned on the tiles it is scored on, an upper bound no user has;
* the rule tuned on all folds pooled, per seed: what a packaged model would ship.

Probabilities are cached per run (``OUT/<fold>_s<seed>.npz``), so a re-run only re-tunes.

    python benchmarks/empty_rule.py [--row "+ hsv, gamma (recipe)"] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import predict_at_gsd, write_fold_csvs  # noqa: E402
from buildseg.data.datasets import GridTileDataset  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402
from buildseg.inference.core.postprocess import PostProcess  # noqa: E402
from buildseg.inference.core.segmenter import Segmenter  # noqa: E402
from buildseg.inference.jobs.tune import search  # noqa: E402
from loader_throughput import cpu_flags  # noqa: E402

EMPTY = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def run_dir(out: Path, row: str, fold: str, seed: int) -> Path:
    return out / "runs" / row.replace(" ", "_").replace("/", "-").replace(":", "") / f"{fold}_s{seed}"


def fold_probs(run: Path, heldout: Path, cache: Path) -> tuple[list, list]:
    """The run's probabilities and the truths on its held-out tiles (cached)."""
    if cache.is_file():
        data = np.load(cache, allow_pickle=True)
        return ([np.asarray(p, dtype=np.float32) for p in data["probs"]],
                [np.asarray(t, dtype=bool) for t in data["truths"]])
    seg = Segmenter.from_checkpoint(run / "best.pt", threshold=0.5, min_area=0)
    gsd = (yaml.safe_load((run / "config.yaml").read_text()).get("data") or {}).get("gsd")
    probs, truths = predict_at_gsd(seg, GridTileDataset(load_records(heldout), tile=224), gsd)
    cache.parent.mkdir(parents=True, exist_ok=True)
    stored = {"probs": np.empty(len(probs), dtype=object), "truths": np.empty(len(truths), dtype=object)}
    for k, (prob, truth) in enumerate(zip(probs, truths)):  # tiles differ in size: one array each
        stored["probs"][k], stored["truths"][k] = prob, truth
    np.savez_compressed(cache, **stored)
    return probs, truths


def score(probs, truths, post: PostProcess) -> dict:
    """Dice, empty-tile FP rate and building F1 of ``post`` (the tuner's own scoring of one rule)."""
    return search(probs, truths, thresholds=(post.threshold,), min_areas=(post.min_area,),
                  empty_max_probs=(post.empty_max_prob,))[0].summary


def best(probs, truths) -> PostProcess:
    return search(probs, truths, empty_max_probs=EMPTY)[0].post


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", default="benchmarks/ablation_corpus.yaml")
    parser.add_argument("--ablation", default="runs/ablation_corpus", help="the ablation's --out")
    parser.add_argument("--row", default="+ hsv, gamma (recipe)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="runs/empty_rule")
    parser.add_argument("--few", type=int, default=10, help="labelled tiles of the place for the few-label row")
    args = parser.parse_args()
    grid_path = Path(args.grid).resolve()
    grid = yaml.safe_load(grid_path.read_text())
    folds = write_fold_csvs(grid, grid_path.parents[1], Path(args.ablation))
    data = {}
    for seed in args.seeds:
        for fold, (_, heldout) in folds.items():
            run = run_dir(Path(args.ablation), args.row, fold, seed)
            if (run / "best.pt").is_file():
                data[(fold, seed)] = fold_probs(run, heldout, Path(args.out) / f"{fold}_s{seed}.npz")
    print(f"CPU flags: {cpu_flags()}; row {args.row!r}: {len(data)} fold runs\n")
    few = f"{args.few} labelled tiles of the place"
    results: dict[str, list[dict]] = {"default": [], "other places": [], few: [], "the place itself (oracle)": []}
    for (fold, seed), (probs, truths) in data.items():
        others = [(p, t) for (f, s), (ps, ts) in data.items() if s == seed and f != fold for p, t in zip(ps, ts)]
        labelled = set(np.random.default_rng(seed).choice(len(probs), size=min(args.few, len(probs) - 1), replace=False))
        rest = [k for k in range(len(probs)) if k not in labelled]  # every row is scored on these
        probs_rest, truths_rest = [probs[k] for k in rest], [truths[k] for k in rest]
        rules = {"default": PostProcess(), "other places": best([p for p, _ in others], [t for _, t in others]),
                 few: best([probs[k] for k in labelled], [truths[k] for k in labelled]),
                 "the place itself (oracle)": best(probs_rest, truths_rest)}
        for name, post in rules.items():
            results[name].append({"fold": fold, "seed": seed, **score(probs_rest, truths_rest, post), "post": post})
    base = results["default"]
    print("| post-processing | Dice | empty-tile FP rate | building F1 | vs default, paired | rules chosen |")
    print("|---|---:|---:|---:|---|---|")
    for name, rows in results.items():
        dice = np.array([r["dice"] for r in rows])
        diff = dice - np.array([r["dice"] for r in base])
        chosen = sorted({f"{r['post'].threshold:.2f}/{r['post'].min_area}/{r['post'].empty_max_prob:.2f}" for r in rows})
        print(f"| {name} | {dice.mean():.3f} ± {dice.std():.3f} | "
              f"{np.nanmean([r['empty_fp_rate'] for r in rows]):.2f} | {np.nanmean([r['f1'] for r in rows]):.3f} | "
              f"{'—' if name == 'default' else f'{diff.mean():+.3f} ± {diff.std():.3f}, {(diff > 0).sum()} of {len(diff)} up'}"
              f" | {', '.join(chosen[:4])}{' ...' if len(chosen) > 4 else ''} |")
    print("\nrules as threshold/min-area/empty-if-max-prob-below. Tuned on all folds pooled:")
    for seed in args.seeds:
        pooled = [(p, t) for (f, s), (ps, ts) in data.items() if s == seed for p, t in zip(ps, ts)]
        if pooled:
            post = best([p for p, _ in pooled], [t for _, t in pooled])
            print(f"  seed {seed}: threshold {post.threshold:.2f}, min_area {post.min_area}, empty_max_prob "
                  f"{post.empty_max_prob:.2f}")


if __name__ == "__main__":
    main()
