"""Batch-norm statistics re-estimated on target imagery (AdaBN).

A model trained on some cities normalises each layer with those cities' feature statistics;
on imagery of another sensor or season they are off, and re-estimating them on the target
is the cheapest adaptation there is. It helps sometimes and hurts sometimes (small or
unrepresentative target sets), so ``buildseg adapt`` measures it rather than assuming it.

Only the running mean and variance (and the batch counter) change: the affine weights and
every other parameter stay as they were, dropout stays off.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> int:
    """Replace every batch norm's running statistics by their cumulative average over
    ``batches`` (uint8 image tensors); returns the images seen. The model is left in eval mode."""
    norms = batch_norms(model)
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    model.eval()
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average: every batch weighs the same
        module.train()
    seen = 0
    try:
        for images in batches:
            model(images.to(device))
            seen += len(images)
    finally:
        for module, momentum in saved:
            module.momentum = momentum
        model.eval()
    return seen
