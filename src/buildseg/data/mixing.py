"""CutMix for segmentation: crops mixed across the images of a batch (``cutmix`` in ``data.augmentations``).

A sample takes a random box from another sample of the batch (the batch rolled by one), in
the image and in every target map alike, so the label under each pixel stays the pixel's
own. Mixing across images puts buildings of one source beside the ground of another: the
model cannot lean on a scene's overall look, which is what changes from city to city.
Mixup (blending two images) is not offered: blended masks are soft targets, which the Dice
and Lovasz terms and the ignore labels of the multi-target maps are not defined for.

It runs on whole batches in the training step (``Trainer._step``), seeded by the step, so a
resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch

CUTMIX_P = 0.5  # share of the samples that receive a box
CUTMIX_AREA = (0.1, 0.5)  # the box's share of the crop, uniform in this range


def cut_mix(images: torch.Tensor, masks: torch.Tensor, *, generator: torch.Generator, p: float = CUTMIX_P,
            area: tuple[float, float] = CUTMIX_AREA) -> tuple[torch.Tensor, torch.Tensor]:
    """New (images, masks): with probability ``p`` each sample i gets a box of sample i-1's
    image and masks (box area uniform in ``area``, aspect ratio log-uniform in [1/2, 2], the
    box inside the crop). ``images`` (B, C, H, W) and ``masks`` (B, ..., H, W) share H and W.
    A batch of one is returned unchanged (nothing to mix with); the inputs are not modified."""
    batch = images.shape[0]
    if batch < 2:
        return images, masks
    height, width = images.shape[-2:]
    if masks.shape[-2:] != (height, width) or masks.shape[0] != batch:
        raise ValueError(f"cut_mix: masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    chosen = torch.rand(batch, generator=generator) < p
    share = torch.empty(batch).uniform_(*area, generator=generator)
    aspect = torch.exp(torch.empty(batch).uniform_(-math.log(2), math.log(2), generator=generator))
    corner = torch.rand(batch, 2, generator=generator)
    source_images, source_masks = images.roll(1, dims=0), masks.roll(1, dims=0)
    images, masks = images.clone(), masks.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        box_h = min(height, max(1, round(math.sqrt(float(share[i]) * height * width * float(aspect[i])))))
        box_w = min(width, max(1, round(float(share[i]) * height * width / box_h)))
        y = int(float(corner[i, 0]) * (height - box_h + 1))
        x = int(float(corner[i, 1]) * (width - box_w + 1))
        images[i, ..., y:y + box_h, x:x + box_w] = source_images[i, ..., y:y + box_h, x:x + box_w]
        masks[i, ..., y:y + box_h, x:x + box_w] = source_masks[i, ..., y:y + box_h, x:x + box_w]
    return images, masks
