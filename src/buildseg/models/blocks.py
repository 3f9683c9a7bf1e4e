"""Small building blocks shared by the decoders: conv-norm-act, norms, scSE attention."""

from __future__ import annotations

from torch import nn

from buildseg.errors import BuildsegError

NORMS = ("batch", "group", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm, GroupNorm (for batch sizes of 1-2) or nothing."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= 4 or g == 1)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise BuildsegError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


def conv_norm_act(in_ch: int, out_ch: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=norm == "none"),
        norm_layer(norm, out_ch),
        nn.ReLU(inplace=True),
    )


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation (Roy et al., 2018)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )
        self.spatial = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.channel(x) + x * self.spatial(x)


def attention_layer(kind: str | None, channels: int) -> nn.Module:
    if kind in (None, "none", ""):
        return nn.Identity()
    if kind == "scse":
        return SCSE(channels)
    raise BuildsegError(f"unknown attention {kind!r}; choose scse or none")
