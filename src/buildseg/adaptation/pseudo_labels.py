"""Pseudo-labels from a teacher's probabilities: confident pixels become targets, the rest
are ignored.

Self-training learns from the teacher's confident decisions only; a pixel the teacher is
unsure about (probability between ``low`` and ``high``) carries no loss, so the student is
not taught the teacher's guesses. Building pixels (p >= ``high``) and background pixels
(p <= ``low``) are kept with weight 1. The loss averages over kept pixels only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from buildseg.adaptation.settings import CONFIDENT_HIGH, CONFIDENT_LOW


@dataclass(frozen=True)
class PseudoLabels:
    targets: torch.Tensor  # float 0/1, the teacher's decision
    weights: torch.Tensor  # float 0/1: 1 where the teacher is confident

    @property
    def kept_fraction(self) -> float:
        return float(self.weights.mean())


def select(probabilities: torch.Tensor, *, low: float = CONFIDENT_LOW, high: float = CONFIDENT_HIGH) -> PseudoLabels:
    """Targets and weights of ``probabilities`` (any shape): 1 where p >= high, 0 where p <= low,
    weight 0 in between."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"pseudo-label thresholds need 0 <= low < high <= 1, got low={low}, high={high}")
    building = probabilities >= high
    confident = building | (probabilities <= low)
    return PseudoLabels(building.float(), confident.float())


def masked_bce(logits: torch.Tensor, labels: PseudoLabels) -> torch.Tensor:
    """Binary cross-entropy averaged over the confident pixels (zero when there are none)."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels.targets, reduction="none")
    return (losses * labels.weights).sum() / labels.weights.sum().clamp(min=1.0)
