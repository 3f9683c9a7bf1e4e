"""UNet decoder over any timm feature pyramid, with deep-supervision heads.

The decoder walks the encoder's features from the deepest up. Each block upsamples to the
*actual* size of its skip feature (not a fixed factor of 2), so odd sizes line up by
construction. Encoders whose shallowest feature is at stride 2 or 4 (ResNet, ConvNeXt)
get extra skip-less blocks until the output is at full resolution.

The net returns a list of logits: the final full-resolution head first, then one 1x1 head
per earlier decoder block (coarse resolutions) when deep supervision is on, then, with fitted
per-image heads (models/image_heads.py), their (B, n, 1, 1) outputs.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from buildseg.errors import BuildsegError
from buildseg.models.blocks import attention_layer, conv_norm_act
from buildseg.models.image_heads import ImageHeads, pool, pooled_dim

DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16, 16, 16)


def scaled_channels(n_blocks: int, width: float) -> list[int]:
    """The default decoder widths x ``width``, each rounded to a multiple of 8 (at least 8).

    Multiples of 8 keep the convolutions on whole SIMD vectors in oneDNN/OpenVINO. The
    default plan spends 83% of a lite0 UNet's multiply-adds in the decoder; ``width`` 0.5
    quarters that share's cost (benchmarks/decoder_cost.py).
    """
    if not 0.0 < width <= 4.0:
        raise BuildsegError(f"decoder_width must be in (0, 4], got {width}")
    return [max(8, int(round(c * width / 8)) * 8) for c in DEFAULT_DECODER_CHANNELS[:n_blocks]]


class DecoderBlock(nn.Module):
    """Upsample to the skip's size (or x2), concatenate the skip, two conv-norm-act."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, norm: str, dropout: float, attention: str | None, upsample: str):
        super().__init__()
        self.upsample = upsample
        self.convs = nn.Sequential(conv_norm_act(in_ch + skip_ch, out_ch, norm), conv_norm_act(out_ch, out_ch, norm))
        self.attention = attention_layer(attention, out_ch)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        align = dict(align_corners=False) if self.upsample == "bilinear" else {}
        x = F.interpolate(x, size=size, mode=self.upsample, **align)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.dropout(self.attention(self.convs(x)))


def decoder_plan(reductions: Sequence[int]) -> int:
    """How many decoder blocks reach full resolution from these feature strides."""
    if any(b <= a for a, b in zip(reductions, reductions[1:])):
        raise BuildsegError(
            f"encoder features are not a pyramid (strides {list(reductions)}), e.g. a plain ViT; a UNet needs "
            "strides that grow stage by stage: pick a CNN/ConvNeXt/RegNet/EfficientNet/Swin-type encoder"
        )
    lowest = reductions[0]
    if lowest < 1 or lowest & (lowest - 1):
        raise BuildsegError(f"encoder's first feature stride {lowest} is not a power of two")
    return (len(reductions) - 1) + int(math.log2(lowest))


class UNet(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        *,
        decoder_channels: Sequence[int] | None,
        width: float,
        norm: str,
        dropout: float,
        attention: str | None,
        upsample: str,
        deep_supervision: bool,
        out_channels: int,
        image_outputs: Sequence[str] = (),
    ) -> None:
        """Keyword-only and without defaults: the defaults live in ``ModelCard`` alone."""
        super().__init__()
        if not 0.0 <= dropout <= 0.5:
            raise BuildsegError(f"dropout must be in [0, 0.5], got {dropout}")
        if upsample not in ("nearest", "bilinear"):
            raise BuildsegError(f"upsample must be nearest or bilinear, got {upsample!r}")
        self.encoder = encoder
        channels = list(encoder.feature_info.channels())
        reductions = list(encoder.feature_info.reduction())
        self.stride = int(reductions[-1])
        n_blocks = decoder_plan(reductions)
        if decoder_channels is None:
            decoder_channels = scaled_channels(n_blocks, width)
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != n_blocks:
            raise BuildsegError(
                f"decoder_channels has {len(decoder_channels)} entries but this encoder needs {n_blocks} decoder "
                f"blocks (feature strides {reductions}); e.g. {list(DEFAULT_DECODER_CHANNELS[:n_blocks])}"
            )
        skips = channels[:-1][::-1] + [0] * (n_blocks - (len(channels) - 1))
        ins = [channels[-1]] + decoder_channels[:-1]
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o, norm, dropout, attention, upsample) for i, s, o in zip(ins, skips, decoder_channels)
        )
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, 1)
        self.aux_heads = (nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in decoder_channels[:-1])
                          if deep_supervision else None)
        self.image_heads = ImageHeads(image_outputs, pooled_dim(channels)) if image_outputs else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.encoder(x)
        skips = features[:-1][::-1]
        y = features[-1]
        aux = []
        for k, block in enumerate(self.blocks):
            y = block(y, skips[k] if k < len(skips) else None)
            if self.aux_heads is not None and k < len(self.aux_heads):
                aux.append(self.aux_heads[k](y))
        # final first, then auxiliary heads from the finest to the coarsest, then the per-image outputs (B, n, 1, 1)
        final = self.head(y)
        if self.image_heads is None:
            return [final] + aux[::-1]
        return [final] + aux[::-1] + [self.image_heads(pool(features, final))[:, :, None, None]]
