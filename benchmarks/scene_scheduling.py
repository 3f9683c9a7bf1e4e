"""Static `i % world` split against dynamic largest-first scheduling of scenes, simulated.

A mosaic's scenes are not equal: most are full tiles, some are clipped at the edge of the
area, a few are large strips. Scene cost is taken as its pixel count (prediction time is
linear in pixels). Sizes are drawn per seed as: 80% full tiles (pixel count lognormal
around 10,000^2, sigma 0.15), 15% edge tiles (uniform 5-60% of a tile), 5% strips (3-8 tiles).

For N workers the makespan (time until the last worker finishes) is computed for
* static: scene i to worker i % N, in list order (torchrun today);
* dynamic, list order: the next scene goes to the first free worker;
* dynamic, largest first: the same, scenes sorted by size (the Ray runner).
Reported as the ratio to the lower bound max(total / N, largest scene): 1.00 is perfect.

    python benchmarks/scene_scheduling.py [--scenes 400] [--seeds 20]
"""

from __future__ import annotations

import argparse
import heapq

import numpy as np


def mosaic(rng: np.random.Generator, n: int) -> np.ndarray:
    tile = 10_000.0 ** 2
    kind = rng.choice(3, size=n, p=[0.80, 0.15, 0.05])
    full = tile * rng.lognormal(0.0, 0.15, n)
    edge = tile * rng.uniform(0.05, 0.60, n)
    strip = tile * rng.uniform(3.0, 8.0, n)
    return np.where(kind == 0, full, np.where(kind == 1, edge, strip))


def static_makespan(sizes: np.ndarray, workers: int) -> float:
    return max(float(sizes[w::workers].sum()) for w in range(workers))


def dynamic_makespan(sizes: np.ndarray, workers: int) -> float:
    free = [0.0] * workers  # when each worker is next free
    heapq.heapify(free)
    for size in sizes:
        heapq.heappush(free, heapq.heappop(free) + float(size))
    return max(free)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    print(f"{args.scenes} scenes, {args.seeds} seeds; makespan / lower bound, mean (sd); lower is better, 1.00 is ideal")
    print(f"{'workers':>7} {'static i % N':>14} {'dynamic, list order':>20} {'dynamic, largest first':>23} "
          f"{'static / largest-first':>23}")
    for workers in (2, 4, 8, 16, 32, 64):
        rows = []
        for seed in range(args.seeds):
            sizes = mosaic(np.random.default_rng(seed), args.scenes)
            bound = max(sizes.sum() / workers, sizes.max())
            static = static_makespan(sizes, workers) / bound
            listed = dynamic_makespan(sizes, workers) / bound
            largest = dynamic_makespan(np.sort(sizes)[::-1], workers) / bound
            rows.append((static, listed, largest, static / largest))
        mean, sd = np.mean(rows, axis=0), np.std(rows, axis=0)
        cells = [f"{m:.3f} ({s:.3f})" for m, s in zip(mean, sd)]
        print(f"{workers:>7} {cells[0]:>14} {cells[1]:>20} {cells[2]:>23} {cells[3]:>23}")


if __name__ == "__main__":
    main()
