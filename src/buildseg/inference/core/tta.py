"""Test-time augmentation over the dihedral group: predict on flipped/rotated copies,
undo each transform on the output, average the probabilities."""

from __future__ import annotations

from typing import Callable

import torch

from buildseg.errors import BuildsegError
from buildseg.settings.inference import TTA_MODES


def transforms(mode: str) -> list[tuple[int, bool]]:
    """(quarter turns, horizontal flip) pairs of a mode."""
    if mode == "none":
        return [(0, False)]
    if mode == "flip":
        return [(0, False), (0, True)]
    if mode == "d4":
        return [(k, f) for k in range(4) for f in (False, True)]
    raise BuildsegError(f"unknown TTA mode {mode!r}; use {', '.join(TTA_MODES)}")


def forward_transform(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def inverse_transform(y: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    if turns:
        y = torch.rot90(y, -turns, dims=(-2, -1))
    return y.flip(-1) if flip else y


def predict_tta(predict_prob: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean probability over the mode's transforms; ``predict_prob`` maps images to probabilities."""
    total = None
    ops = transforms(mode)
    for turns, flip in ops:
        prob = inverse_transform(predict_prob(forward_transform(images, turns, flip)), turns, flip)
        total = prob if total is None else total + prob
    return total / len(ops)
