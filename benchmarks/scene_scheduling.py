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

A second table adds one 50,000 x 50,000 px scene (25 tiles) to a mosaic and compares
largest-first with whole scenes against largest-first with the Ray runner's automatic split
(scenes above max(64 Mpx, total / N / 4) cut into 64 Mpx pieces, ``scene_pieces.py``),
against total / N (the bound once no scene is indivisible). Assembling a split scene is not simulated (it copies the
mask once and joins the border parts: small beside predicting it).

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


def split(sizes: np.ndarray, above: float, piece: float) -> np.ndarray:
    """Every scene above ``above`` pixels cut into pieces of ``piece`` pixels (the last smaller)."""
    parts = []
    for size in sizes:
        if size > above:
            whole = int(size // piece)
            parts += [piece] * whole + ([size - whole * piece] if size > whole * piece else [])
        else:
            parts.append(size)
    return np.array(parts)


def giant_scene_table(scenes: int, seeds: int) -> None:
    piece = 64e6
    print(f"\n{scenes} scenes + one 50,000 px scene; makespan / (total / N), mean (sd); split: scenes above "
          "max(64 Mpx, total / N / 4) in 64 Mpx pieces")
    print(f"{'workers':>7} {'largest first, whole':>22} {'largest first, split':>22} {'extra tasks':>12}")
    for workers in (2, 4, 8, 16, 32, 64):
        rows = []
        for seed in range(seeds):
            sizes = np.append(mosaic(np.random.default_rng(seed), scenes), 50_000.0 ** 2)
            bound = sizes.sum() / workers
            above = max(piece, sizes.sum() / workers / 4)
            whole = dynamic_makespan(np.sort(sizes)[::-1], workers) / bound
            tasks = split(sizes, above, piece)
            rows.append((whole, dynamic_makespan(np.sort(tasks)[::-1], workers) / bound, len(tasks) - len(sizes)))
        mean, sd = np.mean(rows, axis=0), np.std(rows, axis=0)
        cells = [f"{m:.3f} ({s:.3f})" for m, s in zip(mean[:2], sd[:2])]
        print(f"{workers:>7} {cells[0]:>22} {cells[1]:>22} {mean[2]:>12.0f}")


if __name__ == "__main__":
    main()
    giant_scene_table(400, 20)
