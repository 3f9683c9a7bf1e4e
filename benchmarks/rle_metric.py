"""RLE encode+decode and the competition metric over 10,000 random 224x224 masks:
buildseg's vectorised code vs a straightforward per-run Python loop, in the same run.

    .venv/bin/python benchmarks/rle_metric.py [--n 10000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from buildseg.formats import rle
from buildseg.metrics import competition_dice, image_counts


def loop_encode(mask: np.ndarray) -> str:
    """The common notebook version: walk the flattened pixels, one run at a time."""
    pixels = mask.flatten()
    runs, i, n = [], 0, len(pixels)
    while i < n:
        if pixels[i]:
            start = i
            while i < n and pixels[i]:
                i += 1
            runs += [start + 1, i - start]
        else:
            i += 1
    return " ".join(map(str, runs)) if runs else "-1"


def loop_decode(text: str, shape) -> np.ndarray:
    flat = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    if text != "-1":
        tokens = text.split()
        for start, length in zip(tokens[0::2], tokens[1::2]):  # one Python step per run
            flat[int(start) - 1 : int(start) - 1 + int(length)] = 1
    return flat.reshape(shape)


def loop_dice(preds, truths) -> float:
    scores = []
    for p, g in zip(preds, truths):
        if g.sum() > 0 or p.sum() > 0:
            scores.append((2.0 * np.sum(p * g) + 1e-7) / (np.sum(p) + np.sum(g) + 1e-7))
    return float(np.mean(scores))


def random_masks(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Building-like masks: a few rectangles each, 15% empty."""
    masks = []
    for _ in range(n):
        m = np.zeros((224, 224), np.uint8)
        if rng.random() > 0.15:
            for _ in range(rng.integers(1, 8)):
                y, x = rng.integers(0, 200, 2)
                h, w = rng.integers(5, 40, 2)
                m[y : y + h, x : x + w] = 1
        masks.append(m)
    return masks


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    preds, truths = random_masks(args.n, rng), random_masks(args.n, rng)
    shape = (224, 224)

    fast_rles, t_fast_enc = timed(lambda: [rle.encode(m) for m in preds])
    loop_rles, t_loop_enc = timed(lambda: [loop_encode(m) for m in preds])
    assert fast_rles == loop_rles
    fast_dec, t_fast_dec = timed(lambda: [rle.decode(s, shape) for s in fast_rles])
    loop_dec, t_loop_dec = timed(lambda: [loop_decode(s, shape) for s in fast_rles])
    assert all(np.array_equal(a, b) for a, b in zip(fast_dec, loop_dec))

    def fast_metric():
        counts = np.array([image_counts(p, g) for p, g in zip(preds, truths)])
        return competition_dice(counts[:, 0], counts[:, 1], counts[:, 2])[0]

    d_fast, t_fast_m = timed(fast_metric)
    d_loop, t_loop_m = timed(lambda: loop_dice(preds, truths))
    assert abs(d_fast - d_loop) < 1e-12

    n_runs = sum(len(s.split()) // 2 for s in fast_rles)
    print(f"{args.n} random 224x224 masks, {n_runs / args.n:.1f} runs per mask on average\n")
    print("| operation | per-run Python loop (s) | buildseg (s) | speed-up |")
    print("|---|---:|---:|---:|")
    for name, slow, fast in (("RLE encode", t_loop_enc, t_fast_enc), ("RLE decode", t_loop_dec, t_fast_dec),
                             ("competition Dice", t_loop_m, t_fast_m)):
        print(f"| {name} | {slow:.3f} | {fast:.3f} | {slow / fast:.1f}x |")
    total_slow = t_loop_enc + t_loop_dec + t_loop_m
    total_fast = t_fast_enc + t_fast_dec + t_fast_m
    print(f"| all three | {total_slow:.3f} | {total_fast:.3f} | {total_slow / total_fast:.1f}x |")


if __name__ == "__main__":
    main()
