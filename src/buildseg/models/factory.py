"""One model wrapper for every architecture: normalisation, padding, deep-supervision output.

:class:`SegmentationModel` takes raw pixel values (uint8 or float in 0..255, NCHW), so
normalisation travels with the weights (checkpoint, ONNX) and no caller can get it wrong.
It pads any HxW to a multiple of the encoder's total stride and crops the logits back, so
the output always has the input's size. Padding is ``reflect`` (the image continues
naturally into the margin) where the margin is smaller than the image, else zeros.

Training with deep supervision returns ``[final, aux...]``; everything else returns one
logit tensor (B,C,H,W), one channel per target (``card.targets``: the footprint first, then
e.g. the contact zone between buildings), then one constant channel per fitted per-image head
(``card.image_outputs``, models/image_heads.py; ``output_names`` lists them all). With
``ds_ensemble`` the inference output is the logit of the mean sigmoid over all heads
(upsampled), the notes' "deep supervision ensemble".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from buildseg.errors import BuildsegError
from buildseg.models.card import ARCHS, ModelCard

__all__ = ["ModelCard", "SegmentationModel", "build_model", "build_net", "without_image_heads"]
MIN_SIZE = 16
MIN_IMAGE_STD = 8.0  # grey levels: input_norm="image" never divides by less


class SegmentationModel(nn.Module):
    def __init__(self, net: nn.Module, card: ModelCard) -> None:
        super().__init__()
        self.net = net
        self.card = card
        self.stride = int(net.stride)
        self.ds_ensemble = card.ds_ensemble
        mean = torch.tensor(card.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(card.std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise BuildsegError(f"model input must be a batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.card.in_chans:
            raise BuildsegError(
                f"the image has {x.shape[1]} channels but the model ({self.card.encoder}) expects "
                f"{self.card.in_chans} (in_chans); give {self.card.in_chans}-channel images or retrain with in_chans={x.shape[1]}"
            )
        if min(x.shape[-2:]) < MIN_SIZE:
            raise BuildsegError(
                f"image of {x.shape[-2]}x{x.shape[-1]} px is too small: below {MIN_SIZE} px padding to the encoder's "
                f"stride {self.stride} would dominate; use tiles of at least {MIN_SIZE} px (ideally >= {self.stride})"
            )

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw 0..255 pixels -> the encoder's input scale: by the dataset's statistics, or by
        each image's own (``input_norm="image"``; the std floored at :data:`MIN_IMAGE_STD`
        grey levels, so a flat tile is not amplified into noise)."""
        if self.card.input_norm != "image":
            return (x - self.mean) / self.std
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True).clamp(min=MIN_IMAGE_STD)
        return (x - mean) / std

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if getattr(torch.compiler, "is_exporting", lambda: False)():  # one branch-free graph for every size (ONNX needs H, W >= stride)
            return F.pad(x, (0, pw, 0, ph), mode="reflect")
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if ph < h and pw < w else "constant"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input(x)
        h, w = x.shape[-2:]
        x = self._standardise(x.float())
        x = self._pad(x)
        hp, wp = x.shape[-2:]
        outs = list(self.net(x))
        image = outs.pop() if self.card.image_outputs else None
        if self.training:
            return [_crop(o, h, w, hp, wp) for o in outs] if len(outs) > 1 else _crop(outs[0], h, w, hp, wp)
        pixels = self._pixel_logits(outs, h, w, hp, wp)
        if image is None:
            return pixels
        return torch.cat([pixels, image.to(pixels.dtype).expand(-1, -1, pixels.shape[-2], pixels.shape[-1])], dim=1)

    @property
    def output_names(self) -> list[str]:
        """The output channels in order: one per target (footprint first), then one per image output."""
        return list(self.card.targets) + list(self.card.image_outputs)

    def _pixel_logits(self, outs: list[torch.Tensor], h: int, w: int, hp: int, wp: int) -> torch.Tensor:
        if self.ds_ensemble and len(outs) > 1:
            # A running sum, not a stack: no (heads x B x C x H x W) tensor. The coarse heads are
            # upsampled on the padded grid, by the exact factor of their stride, and the sum is
            # cropped once: resizing a cropped head to an odd (h, w) takes a scale that is not a
            # whole number, which OpenVINO's dynamic-shape graph computed differently from its
            # static one (up to 0.27 in a logit), so a block's mask depended on the compile path.
            total = torch.sigmoid(outs[0].float())
            for o in outs[1:]:
                total = total + torch.sigmoid(_upsample_planes(o.float(), tuple(outs[0].shape[-2:])))
            return _crop(torch.logit(total / len(outs), eps=1e-6), h, w, hp, wp)
        return _crop(outs[0], h, w, hp, wp)


def _crop(o: torch.Tensor, h: int, w: int, hp: int, wp: int) -> torch.Tensor:
    """The part of a head (at any stride) that covers the unpadded (h, w) image of a padded
    (hp, wp) input."""
    return o[..., : -(-h * o.shape[-2] // hp), : -(-w * o.shape[-1] // wp)]


def _upsample_planes(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of every (batch, channel) plane, with the batch folded into channels.

    The result is the same as ``F.interpolate(x, size)`` (each plane is resized on its own),
    but a 1-channel head no longer leaves a compiled CPU kernel's vector lanes empty: in
    OpenVINO, which vectorises resizing across channels, the four upsampled heads of the
    deep-supervision ensemble went from 19% of a lite0 UNet's OpenVINO time to 5% (see
    benchmarks/README.md, issue 12).
    """
    b, c = x.shape[:2]
    planes = F.interpolate(x.reshape(1, b * c, x.shape[-2], x.shape[-1]), size=size, mode="bilinear", align_corners=False)
    return planes.reshape(b, c, size[0], size[1])


def _normalisation(encoder: nn.Module, in_chans: int) -> tuple[list[float], list[float]]:
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    mean = list(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = list(cfg.get("std", (0.229, 0.224, 0.225)))
    if len(mean) != in_chans:  # extra bands (NIR...) or gray: use the average statistics
        mean = [sum(mean) / len(mean)] * in_chans
        std = [sum(std) / len(std)] * in_chans
    return mean, std


def build_net(card: ModelCard, weights: str = "none") -> nn.Module:
    from buildseg.models.encoders import create_encoder

    if card.arch == "unet":
        from buildseg.models.unet import UNet

        encoder = create_encoder(card.encoder, card.in_chans, weights)
        return UNet(encoder, decoder_channels=card.decoder_channels, width=card.decoder_width, norm=card.norm,
                    dropout=card.dropout, attention=card.attention, upsample=card.upsample,
                    deep_supervision=card.deep_supervision, out_channels=card.out_channels,
                    image_outputs=card.image_outputs)
    if card.image_outputs:
        raise BuildsegError(f"per-image heads ({', '.join(card.image_outputs)}) need arch unet, not {card.arch}")
    if card.arch == "seed_unet":
        from buildseg.models.seed_unet import SeedUNet

        if card.deep_supervision:
            raise BuildsegError("seed_unet has a single head: deep supervision needs arch unet")
        encoder = create_encoder(card.encoder, card.in_chans, weights, last_only=True)
        return SeedUNet(encoder, batch_norm=card.norm == "batch", dropout=card.dropout, out_channels=card.out_channels)
    if card.arch.startswith("smp."):
        from buildseg.models.smp_adapter import build_smp

        return build_smp(card, weights)
    raise BuildsegError(f"unknown arch {card.arch!r}; choose one of {', '.join(ARCHS)} or smp.<Name> (needs segmentation-models-pytorch)")


def build_model(card: ModelCard, weights: str = "none") -> SegmentationModel:
    """Build the network for ``card``, fill in its normalisation, wrap it."""
    net = build_net(card, weights)
    if not card.mean:
        encoder = getattr(net, "encoder", None)
        card.mean, card.std = _normalisation(encoder, card.in_chans)
    model = SegmentationModel(net, card)
    encoder = getattr(net, "encoder", None)
    if card.style_mix > 0 and encoder is not None and hasattr(encoder, "feature_info"):
        from buildseg.models.style_mix import attach_style_mix

        model.style_mix = attach_style_mix(encoder, card.style_mix)  # a child module: train()/eval() reach it
    return model


def without_image_heads(model: SegmentationModel) -> SegmentationModel:
    """``model`` without its fitted per-image heads, for work that changes the network (``adapt``):
    the heads describe the features they were fitted on (models/image_heads.py)."""
    if not model.card.image_outputs:
        return model
    card = ModelCard.from_dict({**model.card.to_dict(), "image_outputs": []})
    new = build_model(card)
    new.load_state_dict({k: v for k, v in model.state_dict().items() if ".image_heads." not in k})
    return new.train(model.training)
