"""Tiles without a pixel size, predicted at the size the model estimates for them.

A CSV or folder of tiles says nothing of their GSD, so a model trained at 0.5 m sees drone
tiles at 0.05 m as they are, and finds little it knows. A model with a ``scale`` head
(models/image_heads.py) says, from each tile's first pass, how far its pixel size is from the
model's. The job always reports that estimate; with ``predict --gsd-estimate`` each tile is
also resampled to the model's pixel size by it and predicted again, its probabilities coming
back at its own size (the same path as ``--gsd``).

Opt-in, measured per place with the head held out (benchmarks/README.md, "Per-image heads"):
on places 2x or more from 0.5 m it gained more than the known GSD did, and on places near
0.5 m it lost (the estimate is off by a factor 1.5, median). A dead band (resample only
estimates 2x or more away) was measured too and did worse on both.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

log = logging.getLogger("buildseg")

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
    return 1.0 if estimate is None else 2.0 ** estimate


@dataclass
class ScaleReport:
    """What the estimates said over a job: each estimated tile's log2 scale, and how many were
    resampled (``act``: ``--gsd-estimate``)."""

    model_gsd: float | None
    act: bool = False
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
        said = (f"pixel size: {len(metres)} tiles without a GSD; the model estimates {mid:.2g} m/px (median; 10-90%: "
                f"{low:.2g}-{high:.2g}; off by 1.5x typically)")
        if self.act:
            return f"{said}; {self.resampled} resampled to its {self.model_gsd:g} m by the estimate (--gsd-estimate)"
        return (f"{said}; give --gsd (or a gsd column) when you know it, or --gsd-estimate to resample by the "
                f"estimate (it pays far from {self.model_gsd:g} m and costs near it)")
