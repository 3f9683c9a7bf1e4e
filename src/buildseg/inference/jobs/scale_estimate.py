"""Tiles without a pixel size, predicted at the size the model estimates for them.

A CSV or folder of tiles says nothing of their GSD, so a model trained at 0.5 m sees drone
tiles at 0.05 m as they are, and finds nothing it knows. A model with a ``scale`` head
(models/image_heads.py) says, from each tile's first pass, how far its pixel size is from the
model's; where that is :data:`DEAD_BAND` or more, the tile is resampled to the model's pixel
size by that estimate and predicted again, and its probabilities come back at its own size
(the same path as ``--gsd``). Inside the band the first pass stands: near the model's GSD the
estimate's error (a factor 1.5, median) would cost more than it buys. Measured per place
with the head held out: benchmarks/README.md, "Per-image heads".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

log = logging.getLogger("buildseg")

DEAD_BAND = 2.0  # the estimate must be this factor from the model's GSD before a tile is resampled
LOGIT_CLIP = 1e-6


def log2_scale(maps: np.ndarray, targets: Sequence[str]) -> float | None:
    """log2(tile GSD / model GSD) from one image's output maps (probabilities), or None when
    the model has no scale head."""
    if "scale" not in targets or maps.ndim != 3:
        return None
    p = float(np.clip(maps[list(targets).index("scale")].mean(), LOGIT_CLIP, 1 - LOGIT_CLIP))
    return math.log(p / (1 - p))  # the engines return sigmoid(output); the head's output is the log2 itself


def resample_factor(estimate: float | None) -> float:
    """Model pixels per tile pixel for a tile of this estimate (1: predict it as it is)."""
    if estimate is None or abs(estimate) < math.log2(DEAD_BAND):
        return 1.0
    return 2.0 ** estimate


@dataclass
class ScaleReport:
    """What the estimates said over a job: each estimated tile's metres per pixel, and how many
    were resampled."""

    model_gsd: float | None
    estimates: list[float] = field(default_factory=list)  # log2(tile GSD / model GSD), per estimated tile
    resampled: int = 0

    def add(self, estimate: float, factor: float) -> None:
        self.estimates.append(estimate)
        self.resampled += int(factor != 1.0)

    def line(self) -> str | None:
        """One line for the user, or None when nothing was estimated."""
        if not self.estimates or not self.model_gsd:
            return None
        metres = self.model_gsd * 2.0 ** np.array(self.estimates)
        low, mid, high = np.percentile(metres, [10, 50, 90])
        return (f"pixel size: {len(metres)} tiles without a GSD; the model estimates {mid:.2g} m/px (median; 10-90%: "
                f"{low:.2g}-{high:.2g}); {self.resampled} estimated {DEAD_BAND:g}x or more from its {self.model_gsd:g} "
                "m were resampled to it. Give --gsd (or a gsd column) when you know it; --no-gsd-estimate turns "
                "this off")
