"""Training augmentation (albumentations), chosen by name (``data.augmentations``).

Crops are cut by the dataset at the image's own resolution, then augmented. The names:

* ``d4``: flips and quarter turns (any orientation is as likely as any other from above);
* ``colour``: mild brightness/contrast and hue/saturation jitter (RGB only);
* ``hsv``: stronger hue/saturation/value shifts, for sensors and seasons not seen in training;
* ``gamma``: random gamma (haze, exposure);
* ``clahe``: local contrast equalisation, now and then;
* ``blur``: a Gaussian blur or a sharpening (resampled and over-sharpened products);
* ``jpeg``: JPEG artefacts (quality 40-90: web tiles, compressed archives);
* ``histmatch``: randomised histogram matching, applied by the dataset to the crop before
  the pipeline: half the crops take the per-channel colour distribution of a random other
  training image (scikit-image's ``match_histograms``), blended 50-100%, so a source's
  colours are not a cue for its buildings;
* ``scale``: random ground sample distance, applied by the dataset before the crop is cut
  (a window of ``crop x s`` px resized to ``crop``, ``s`` log-uniform in ``data.scale_range``),
  so buildings are seen larger and smaller than in the training imagery (sources range from
  0.3 m to 1 m per pixel).
* ``cutmix``: a box from another crop of the batch, image and masks alike, in half the
  samples (``data/mixing.py``; applied by the training step to whole batches).

The photometric ones apply to 3-band (RGB) input only. The ablation (benchmarks/README.md)
decides the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from buildseg.settings.train import AUGMENTATIONS  # noqa: F401 (the names this module builds)

if TYPE_CHECKING:
    import albumentations as A

PHOTOMETRIC = {"colour", "hsv", "gamma", "clahe", "blur", "jpeg", "histmatch"}
REFERENCE_SIDE = 96  # histmatch references are thumbnails: a colour distribution needs no detail
MAX_REFERENCES = 256  # thumbnails kept in memory (about 7 MB), drawn from the training images


def reference_thumbnails(paths: Sequence[Path], *, seed: int = 0) -> list[np.ndarray]:
    """Small RGB thumbnails of up to :data:`MAX_REFERENCES` random images: histmatch's references."""
    from buildseg.formats.images import read_rgb

    picks = np.random.default_rng(seed).permutation(len(paths))[:MAX_REFERENCES]
    thumbs = []
    for i in picks:
        image = read_rgb(paths[int(i)])
        scale = REFERENCE_SIDE / max(image.shape[:2])
        thumbs.append(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image)
    return thumbs


def match_colours(image: np.ndarray, reference: np.ndarray, blend: float = 1.0) -> np.ndarray:
    """``image`` with each channel's histogram matched to ``reference``'s (scikit-image's
    ``match_histograms``), blended with the original by ``blend`` (1: fully matched)."""
    from skimage.exposure import match_histograms

    matched = match_histograms(image, reference, channel_axis=-1)
    mixed = blend * matched + (1.0 - blend) * image.astype(np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def random_histogram_match(image: np.ndarray, references: Sequence[np.ndarray], rng: np.random.Generator,
                           p: float = 0.5) -> np.ndarray:
    """histmatch: with probability ``p``, a random reference's colours, blended 50-100%."""
    if not references or rng.random() >= p:
        return image
    reference = references[int(rng.integers(len(references)))]
    return match_colours(image, reference, float(rng.uniform(0.5, 1.0)))


def train_transform(augment: bool = True, colour: bool = True, names: tuple[str, ...] | list[str] = ("d4", "colour")
                    ) -> A.Compose:
    """The albumentations pipeline for a crop (``scale`` and ``histmatch`` are the dataset's,
    not listed here)."""
    import albumentations as A  # here, not at the top: it imports torch, and the CLI's parser reads this module

    steps: list[A.BasicTransform] = []
    if not augment:
        return A.Compose(steps)
    names = set(names)
    if not colour:
        names -= PHOTOMETRIC
    if "d4" in names:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    if "colour" in names:
        steps += [
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=10, val_shift_limit=5, p=0.3),
        ]
    if "hsv" in names:
        steps.append(A.HueSaturationValue(hue_shift_limit=12, sat_shift_limit=25, val_shift_limit=20, p=0.5))
    if "gamma" in names:
        steps.append(A.RandomGamma(gamma_limit=(70, 150), p=0.4))
    if "clahe" in names:
        steps.append(A.CLAHE(clip_limit=(1.0, 3.0), p=0.15))
    if "blur" in names:
        steps.append(A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.Sharpen(alpha=(0.1, 0.3), p=1.0)], p=0.3))
    if "jpeg" in names:
        steps.append(A.ImageCompression(quality_range=(40, 90), p=0.3))
    return A.Compose(steps)
