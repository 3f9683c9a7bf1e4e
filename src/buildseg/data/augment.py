"""Training augmentation (albumentations): D4 flips and quarter turns, mild colour.

Crops are cut by the dataset at the image's own resolution (no resizing of 1024 tiles):
the test tiles of the competition are 224x224 crops at the same 0.5 m/px, so scale must
not change. Images smaller than the crop are zero-padded (mask padded with background).
"""

from __future__ import annotations

import albumentations as A


def train_transform(augment: bool = True, colour: bool = True) -> A.Compose:
    """Augmentation of a crop (the crop itself is cut by the dataset, before this): D4 flips
    and quarter turns; colour jitter only for RGB (``colour``), where it is defined."""
    steps: list[A.BasicTransform] = []
    if augment:
        steps += [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
        ]
    if augment and colour:
        steps += [
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=10, val_shift_limit=5, p=0.3),
        ]
    return A.Compose(steps)
