"""Optional: segmentation_models_pytorch architectures (``arch: smp.<Name>``) over timm encoders.

These run through the same training and prediction pipeline. They have a single head, so
deep supervision is not available for them.
"""

from __future__ import annotations

import torch
from torch import nn

from buildseg.errors import BuildsegError


class SmpNet(nn.Module):
    stride = 32

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.encoder = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.model(x)]


def build_smp(card, weights: str) -> nn.Module:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise BuildsegError(f"arch {card.arch!r} needs segmentation-models-pytorch: pip install 'buildseg[smp]'") from None
    if card.deep_supervision:
        raise BuildsegError(f"{card.arch} has one head: deep supervision is only available for arch unet")
    name = card.arch.split(".", 1)[1]
    if str(weights).lower() not in ("none", "imagenet"):
        raise BuildsegError("smp architectures take --weights imagenet or none (local weight files: use arch unet)")
    try:
        model = smp.create_model(
            arch=name,
            encoder_name=f"tu-{card.encoder}",
            encoder_weights="imagenet" if str(weights).lower() == "imagenet" else None,
            in_channels=card.in_chans,
            classes=card.out_channels,
        )
    except (KeyError, ValueError) as exc:
        raise BuildsegError(f"segmentation_models_pytorch cannot build {name!r} with encoder {card.encoder!r}: {exc}") from None
    return SmpNet(model)
