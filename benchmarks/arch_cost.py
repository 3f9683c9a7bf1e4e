"""CPU milliseconds per 224 px tile of trained checkpoints, as ``buildseg predict`` runs them.

For the architecture choice of the packaged model (issue 33): each checkpoint (e.g. one fold
model per encoder of ``ablation_corpus.yaml``) is loaded with predict's defaults (engine and
precision ``auto``: chosen on this machine) and times batches of 32 random 224 px tiles, in
turns, ``--repeats`` rounds; the table gives the median ms per tile and the ratio to the first.
Pair it with the rows' Dice from ``ablation.py`` (benchmarks/README.md).

    python benchmarks/arch_cost.py RUN_A/best.pt RUN_B/best.pt ... [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from buildseg.inference.core.segmenter import Segmenter  # noqa: E402
from loader_throughput import cpu_flags  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (32, 3, 224, 224), dtype=np.uint8))
    segmenters = [Segmenter.from_checkpoint(path) for path in args.checkpoints]
    for seg in segmenters:  # compile, first-use precision choice, warm caches
        seg.probabilities(tiles)
    times: list[list[float]] = [[] for _ in segmenters]
    for _ in range(args.repeats):
        for k, seg in enumerate(segmenters):
            started = time.perf_counter()
            for _ in range(args.batches):
                seg.probabilities(tiles)
            times[k].append((time.perf_counter() - started) * 1000 / (args.batches * len(tiles)))
    print(f"CPU flags: {cpu_flags()}; torch threads {torch.get_num_threads()}\n")
    print("| checkpoint | encoder | engine, precision | ms per 224 px tile (median) | vs first |")
    print("|---|---|---|---:|---:|")
    base = statistics.median(times[0])
    for path, seg, values in zip(args.checkpoints, segmenters, times):
        ms = statistics.median(values)
        encoder = seg.models[0].card.encoder if hasattr(seg, "models") else "?"
        print(f"| {path} | {encoder} | {seg.engine}, {seg.precision} | {ms:.2f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
