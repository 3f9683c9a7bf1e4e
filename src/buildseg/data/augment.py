"""Training augmentation (albumentations): native-scale random crops, D4 flips, mild colour.

Crops are cut at the image's own resolution (no resizing of 1024 tiles): the test tiles
of the competition are 224x224 crops at the same 0.5 m/px, so scale must not change.
Images smaller than the crop are zero-padded (mask padded with background).
"""

from __future__ import annotations

import albumentations as A
import cv2


def train_transform(crop_size: int, augment: bool = True, colour: bool = True) -> A.Compose:
    """Pad, crop, D4 flips; colour jitter only for RGB (``colour``): it is not defined for other bands."""
    steps: list[A.BasicTransform] = [
        A.PadIfNeeded(min_height=crop_size, min_width=crop_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
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
