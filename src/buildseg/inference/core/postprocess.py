"""Post-processing tuned for the competition metric.

Under per-image Dice with both-empty images dropped, a speck of false positives on an
empty tile costs a whole 0, so removing small components and declaring weak tiles empty
is worth more than most model changes. Components come from OpenCV (8-connectivity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage


@dataclass
class PostProcess:
    threshold: float = 0.5
    min_area: int = 0  # components smaller than this many pixels are removed
    fill_holes: bool = False
    empty_max_prob: float = 0.0  # tile declared empty if its max probability is below this
    empty_min_area: int = 0  # tile declared empty if fewer pixels remain than this
    contact_threshold: float = 0.5  # models with a contact channel: seeds of the watershed split are below it
    tile_threshold: float = 0.0  # models with a tile head: an image (or window) whose building probability is below
    # this is empty (0: off); chosen on place-held-out folds for a packaged model (benchmarks/tile_decision.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "PostProcess":
        data = data or {}
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def remove_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_area`` pixels."""
    if min_area <= 1 or not mask.any():
        return mask.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # background
    return keep[labels].astype(np.uint8)


def apply(prob: np.ndarray, pp: PostProcess) -> np.ndarray:
    """Probability map (HxW, 0..1) -> binary uint8 mask."""
    if pp.empty_max_prob > 0 and float(prob.max()) < pp.empty_max_prob:
        return np.zeros(prob.shape, dtype=np.uint8)
    mask = (prob > pp.threshold).astype(np.uint8)
    if pp.fill_holes:
        mask = ndimage.binary_fill_holes(mask).astype(np.uint8)
    mask = remove_small_components(mask, pp.min_area)
    if pp.empty_min_area > 0 and int(mask.sum()) < pp.empty_min_area:
        mask[:] = 0
    return mask
