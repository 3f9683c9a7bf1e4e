"""The notes' architecture, reproduced: "ResNetBackbone-UNet".

ResNet-50 features without its last two children (avgpool, fc), i.e. the 2048-channel
stride-32 map; bilinear upsampling of that map to the input size; double_conv 2048->64;
then a plain 4-level UNet (64-128-256-512) of double_conv blocks with max-pooling down and
bilinear upsampling up; a 1x1 conv to one channel. Optional batch norm and dropout 0.2 as
the notes tried. Built through timm (``out_indices`` = last stage), so any timm encoder
works, and fixed to run at any batch and input size (the wrapper pads to stride 32).

It exists to reproduce the notes and measure why the default UNet is better: every skip
connection of this UNet carries the same upsampled stride-32 information, so it cannot
recover detail the backbone discarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def double_conv(in_ch: int, out_ch: int, batch_norm: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, o in ((in_ch, out_ch), (out_ch, out_ch)):
        layers.append(nn.Conv2d(i, o, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(o))
        layers.append(nn.ReLU(inplace=True))
    if dropout > 0:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class SeedUNet(nn.Module):
    def __init__(self, encoder: nn.Module, *, batch_norm: bool, dropout: float, out_channels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.stride = int(encoder.feature_info.reduction()[-1])
        top = int(encoder.feature_info.channels()[-1])
        self.entry = double_conv(top, 64, batch_norm, dropout)
        self.down = nn.ModuleList(double_conv(a, b, batch_norm, dropout) for a, b in ((64, 128), (128, 256), (256, 512)))
        self.up = nn.ModuleList(double_conv(a + b, b, batch_norm, dropout) for a, b in ((512, 256), (256, 128), (128, 64)))
        self.head = nn.Conv2d(64, out_channels, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        deep = self.encoder(x)[-1]
        y = self.entry(F.interpolate(deep, size=x.shape[-2:], mode="bilinear", align_corners=False))
        skips = [y]
        for down in self.down:
            y = down(F.max_pool2d(y, 2))
            skips.append(y)
        skips.pop()
        for up in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        return [self.head(y)]
