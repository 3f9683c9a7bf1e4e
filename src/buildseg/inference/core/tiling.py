"""Sliding-window prediction for images larger than a window.

Windows overlap and are blended with Gaussian weights (highest at the window centre,
where the model sees the most context), so there are no seams. Memory is bounded by the
window batch plus two float32 accumulators of the image size.
"""

from __future__ import annotations

from typing import Callable

import torch

from buildseg.settings.inference import OVERLAP, WINDOW


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    if length <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, length - window, step))
    return starts + [length - window]


def gaussian_weights(height: int, width: int, sigma_scale: float = 0.25) -> torch.Tensor:
    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-0.5 * (x / max(1.0, n * sigma_scale)) ** 2)

    w = axis(height)[:, None] * axis(width)[None, :]
    return (w / w.max()).clamp_min(1e-3)


def sliding_window_proba(
    predict_prob: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    window: int = WINDOW,
    overlap: float = OVERLAP,
    batch_size: int = 4,
) -> torch.Tensor:
    """Probability map of a (C, H, W) image, window by window: (H, W), or (K, H, W) when
    ``predict_prob`` returns K maps per window ((B, K, h, w))."""
    _, height, width = image.shape
    wh, ww = min(window, height), min(window, width)
    weights = gaussian_weights(wh, ww)
    acc = norm = None
    boxes = [(y, x) for y in window_starts(height, wh, overlap) for x in window_starts(width, ww, overlap)]
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        batch = torch.stack([image[:, y : y + wh, x : x + ww] for y, x in chunk])
        probs = predict_prob(batch).float().cpu()
        if acc is None:
            acc = torch.zeros((*probs.shape[1:-2], height, width), dtype=torch.float32)
            norm = torch.zeros((height, width), dtype=torch.float32)
        for (y, x), prob in zip(chunk, probs):
            acc[..., y : y + wh, x : x + ww] += prob * weights
            norm[y : y + wh, x : x + ww] += weights
    return acc / norm


def window_count(height: int, width: int, window: int, overlap: float) -> int:
    return len(window_starts(height, min(window, height), overlap)) * len(window_starts(width, min(window, width), overlap))

