"""Per-image outputs of a segmentation network: does the tile hold a building, and at what pixel size was it taken.

Both read one vector per image, pooled from the network it sits on: the mean and the maximum
of every encoder stage's features, and the footprint map's largest logit and mean
probability (what the old "empty if the max probability is below E" rule used). Each head is a
small two-layer perceptron over that vector, standardised first.

The heads are fitted *after* training, on the frozen network (training/image_heads.py), so the
pixel outputs of a model are the same with or without them. Their weights are buffers, not
parameters: no optimiser, no DDP gradient and no fine-tuning touches them; a network trained
further (``train --init``) drops them, since they describe the exact features they were fitted on.

The outputs travel as extra constant channels of the model's output map (one per head, the
head's logit broadcast over the image), so every engine, precision, TTA transform, sliding
window and export carries them without a second graph output. Names, in output order:

* ``tile``: the logit that the image holds any building pixel;
* ``scale``: log2 of the image's pixel size over the pixel size the model was trained at
  (0: the model's own GSD; +1: pixels twice as large).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from buildseg.errors import BuildsegError

IMAGE_OUTPUTS = ("tile", "scale")
HIDDEN = 32  # units of each head's hidden layer


MAP_STATS = ("max logit", "mean probability", "share above 0.5")  # of the footprint map, last in the vector


def pooled_dim(channels: Sequence[int]) -> int:
    """Length of the pooled vector for encoder stages of these channel counts."""
    return 2 * int(sum(channels)) + len(MAP_STATS)


def column_groups(channels: Sequence[int]) -> dict[str, slice]:
    """Where each part of the pooled vector lies: ``stage0`` ... (mean then max of that encoder
    stage, shallowest first) and ``map`` (:data:`MAP_STATS`)."""
    groups, start = {}, 0
    for k, c in enumerate(channels):
        groups[f"stage{k}"] = slice(start, start + 2 * int(c))
        start += 2 * int(c)
    groups["map"] = slice(start, start + len(MAP_STATS))
    return groups


def pool(features: Sequence[torch.Tensor], footprint_logits: torch.Tensor) -> torch.Tensor:
    """(B, D) summary of one forward pass: mean and max of each stage, then :data:`MAP_STATS`."""
    parts = []
    for f in features:
        f = f.float()
        parts += [f.mean(dim=(2, 3)), f.amax(dim=(2, 3))]
    logits = footprint_logits.float()[:, :1]
    parts += [logits.amax(dim=(1, 2, 3))[:, None], torch.sigmoid(logits).mean(dim=(1, 2, 3))[:, None],
              (logits > 0).float().mean(dim=(1, 2, 3))[:, None]]
    return torch.cat(parts, dim=1)


def check_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in IMAGE_OUTPUTS]
    if unknown or len(set(names)) != len(names):
        raise BuildsegError(f"image_outputs {names}: each at most once, from {', '.join(IMAGE_OUTPUTS)}")
    return [n for n in IMAGE_OUTPUTS if n in names]  # the output order is fixed


class ImageHeads(nn.Module):
    """The fitted heads, one (B, 1) logit or value each, concatenated in ``names`` order."""

    def __init__(self, names: Sequence[str], dim: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.names = check_names(names)
        for name in self.names:
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
            self.register_buffer(f"{name}_w1", torch.zeros(hidden, dim))
            self.register_buffer(f"{name}_b1", torch.zeros(hidden))
            self.register_buffer(f"{name}_w2", torch.zeros(1, hidden))
            self.register_buffer(f"{name}_b2", torch.zeros(1))

    def head(self, name: str) -> dict[str, torch.Tensor]:
        """One head's tensors by their short names (``mean``, ``std``, ``w1``, ``b1``, ``w2``, ``b2``)."""
        return {k: getattr(self, f"{name}_{k}") for k in ("mean", "std", "w1", "b1", "w2", "b2")}

    def set_head(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            getattr(self, f"{name}_{key}").copy_(value.detach().to(getattr(self, f"{name}_{key}")))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.cat([run_head(self.head(name), pooled) for name in self.names], dim=1)


def run_head(t: dict[str, torch.Tensor], pooled: torch.Tensor) -> torch.Tensor:
    """One head on a (B, D) pooled batch: standardise, hidden layer (ReLU), one output."""
    z = (pooled.float() - t["mean"]) / t["std"]
    return torch.relu(z @ t["w1"].T + t["b1"]) @ t["w2"].T + t["b2"]
