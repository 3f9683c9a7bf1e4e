"""Datasets over competition records.

* :class:`TrainCropDataset` samples random native-scale crops. Its indices are
  ``(epoch, i)`` pairs (see :class:`EpochSampler`) and every sample's augmentation is
  seeded from ``(seed, epoch, i)``; so the data stream does not depend on the number of
  workers and a resumed run sees exactly the samples an uninterrupted run would.
* :class:`GridTileDataset` cuts held-out images into a centred grid of non-overlapping
  tiles (empty tiles included), the way the competition's test tiles were made.

Images and masks come back as uint8 tensors (CHW / 1HW); the model normalises. That keeps
worker-to-main transfers 4x smaller than float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from buildseg.data.augment import random_histogram_match, reference_thumbnails, train_transform
from buildseg.data.targets import target_stack
from buildseg.formats.images import read_image
from buildseg.formats.tables import Record

if TYPE_CHECKING:
    from buildseg.data.store import DecodedStore


class MaskCache:
    """Decodes each mask once per process and keeps it bit-packed (1 bit per pixel)."""

    def __init__(self) -> None:
        self._packed: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}

    def get(self, record: Record, shape: tuple[int, int]) -> np.ndarray:
        hit = self._packed.get(record.img_id)
        if hit is None or hit[1] != shape:
            mask = record.load_mask(shape)
            self._packed[record.img_id] = (np.packbits(mask, axis=None), shape)
            return mask
        packed, _ = hit
        return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape)


def to_tensors(image: np.ndarray, mask: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    mask_t = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask[None]))
    return image_t, mask_t


EMPTY_TRIES = 10  # windows drawn in search of building-free ground for an "empty" crop


class TrainCropDataset(Dataset):
    """Random crops of ``crop_size`` from each training image, ``crops_per_image`` per epoch.

    Crop first, then augment: the window is drawn from the sample's seed, read (from the
    decoded-image store when one is given, else from the freshly decoded file), zero-padded
    to ``crop_size`` when the image is smaller (centred, mask padded with background), and
    only then flipped, rotated by quarter turns and colour-jittered. These transforms need no
    context beyond the crop; a transform that does (arbitrary rotation, rescaling) must read
    a margin around the window. Both paths give bit-identical samples (tested).
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        crop_size: int = 224,
        crops_per_image: int = 1,
        augment: bool = True,
        seed: int = 0,
        in_chans: int = 3,
        store: "DecodedStore | None" = None,
        targets: Sequence[str] = ("footprint",),
        augmentations: Sequence[str] = ("d4", "colour"),
        scale_range: Sequence[float] = (0.6, 1.6),
        record_weights: np.ndarray | None = None,
        target_gsd: float | None = None,
        gsd_jitter: float = 0.0,
        empty_crops: float = 0.0,
    ) -> None:
        self.records = list(records)
        self.empty_crops = empty_crops  # share of crops sought on building-free ground (EMPTY_TRIES windows)
        self.record_weights = record_weights  # per-record draw probabilities (data/corpus.py); None: in turn
        self.target_gsd = target_gsd  # tiles of known GSD are resampled to it (times a jitter of +-gsd_jitter)
        self.gsd_jitter = gsd_jitter if augment else 0.0
        self.targets = list(targets)
        self.scale_range = tuple(scale_range) if augment and "scale" in augmentations else None
        self.crop_size = crop_size
        self.crops_per_image = int(crops_per_image) if crops_per_image > 0 else self.auto_crops(self.records, crop_size)
        self.seed = seed
        self.in_chans = in_chans
        self.store = store
        self.references = (reference_thumbnails([r.image_path for r in self.records], seed=seed)
                           if augment and "histmatch" in augmentations and in_chans == 3 else [])
        self.transform = train_transform(augment, colour=in_chans == 3, names=augmentations)
        self.masks = MaskCache()

    @staticmethod
    def auto_crops(records: Sequence[Record], crop_size: int) -> int:
        """Crops per image so that an epoch covers about the training area once."""
        from buildseg.formats.images import image_size

        sample = records[: min(len(records), 8)]
        area = sum(h * w for h, w in (image_size(r.image_path) for r in sample)) / max(1, len(sample))
        return max(1, round(area / crop_size**2))

    def __len__(self) -> int:
        return len(self.records) * self.crops_per_image

    def _window(self, rng: np.random.Generator, height: int, width: int, size: int | None = None) -> tuple[int, int]:
        size = size or self.crop_size
        y = int(rng.integers(0, max(0, height - size) + 1))
        x = int(rng.integers(0, max(0, width - size) + 1))
        return y, x

    def _scale(self, rng: np.random.Generator, r: int) -> float:
        """Window side over crop side: towards the target GSD for a tile of known GSD, times the
        "scale" augmentation's factor. A window of c*s px resized to c is another GSD."""
        factor = 1.0
        gsd = self.records[r].gsd
        if self.target_gsd and gsd:
            factor = self.target_gsd / gsd * float(np.exp(rng.uniform(-self.gsd_jitter, self.gsd_jitter)))
        if self.scale_range is not None:
            low, high = np.log(self.scale_range[0]), np.log(self.scale_range[1])
            factor *= float(np.exp(rng.uniform(low, high)))
        return factor

    def crop(self, key: tuple[int, int] | int) -> tuple[np.ndarray, np.ndarray, int]:
        """The unaugmented (image, mask) window of sample ``key``, padded, and the sample's seed."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        rng = np.random.default_rng(sample_seed)
        if self.record_weights is None:
            r = index % len(self.records)
        else:
            r = int(np.random.default_rng([sample_seed, 2]).choice(len(self.records), p=self.record_weights))
        out = self.crop_size
        factor = self._scale(rng, r)
        shape = self.store.shapes[r] if self.store is not None else None
        full = None
        if shape is None:
            full = read_image(self.records[r].image_path, self.in_chans)
            shape = full.shape[:2]
        # at most 1.5x the tile's side: a 2 cm drone tile seen at 0.5 m would be a speck in a black crop
        c = max(8, min(int(round(out * factor)), int(1.5 * max(out, *shape[:2]))))
        tries = EMPTY_TRIES if self.empty_crops and rng.random() < self.empty_crops else 1
        for _ in range(tries):  # the last window is kept when none of the tries is building-free
            y, x = self._window(rng, *shape, size=c)
            if full is None:
                image, mask = self.store.window(r, y, x, c, c)
            else:
                image = full[y : y + c, x : x + c]
                mask = self.masks.get(self.records[r], full.shape[:2])[y : y + c, x : x + c]
            if not mask.any():
                break
        image, mask = _pad_to(image, c), _pad_to(mask, c)
        if c != out:
            image, mask = _resize(image, out, cv2.INTER_AREA if c > out else cv2.INTER_LINEAR), _resize(mask, out, cv2.INTER_NEAREST)
        return image, mask, sample_seed

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask, sample_seed = self.crop(key)
        self.transform.set_random_seed(sample_seed)
        if self.references:
            image = random_histogram_match(image, self.references, np.random.default_rng([sample_seed, 1]))
        out = self.transform(image=image, mask=mask)
        image_t, mask_t = to_tensors(out["image"], out["mask"])
        if self.targets != ["footprint"]:
            mask_t = torch.from_numpy(target_stack(out["mask"], self.targets))
        return image_t, mask_t


def _resize(array: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    out = cv2.resize(array, (size, size), interpolation=interpolation)
    return out[:, :, None] if array.ndim == 3 and out.ndim == 2 else out


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the first two axes to ``size``, centred (as albumentations' PadIfNeeded)."""
    h, w = array.shape[:2]
    if h >= size and w >= size:
        return np.ascontiguousarray(array)
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((size, size, *array.shape[2:]), dtype=array.dtype)
    out[top : top + h, left : left + w] = array
    return out


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` pairs: a DistributedSampler's order for this epoch.

    With one process it is a seeded shuffle. ``skip`` drops the first samples of the
    epoch, which is how a run resumed mid-epoch continues where it stopped.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.inner = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=world_size > 1
        )
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.inner)[self.skip :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def grid_offsets(length: int, tile: int) -> list[tuple[int, int]]:
    """(offset, size) of centred non-overlapping tiles along one axis.

    Remainders shorter than a tile are dropped (split evenly on both sides); an axis
    shorter than a tile gives one tile of the whole axis, padded later.
    """
    if length <= tile:
        return [(0, length)]
    count = length // tile
    start = (length - count * tile) // 2
    return [(start + k * tile, tile) for k in range(count)]


class GridTileDataset(Dataset):
    """Non-overlapping ``tile`` x ``tile`` tiles of whole images, for validation.

    Each item is ``(image, mask, valid)`` where tiles of images smaller than ``tile`` are
    zero-padded and ``valid`` = (height, width) of the real pixels, so that scoring uses
    the real pixels only.
    """

    def __init__(self, records: Sequence[Record], *, tile: int = 224, in_chans: int = 3,
                 target_gsd: float | None = None) -> None:
        from buildseg.formats.images import image_size

        self.records = list(records)
        self.tile = tile
        self.in_chans = in_chans
        self.target_gsd = target_gsd  # images of known GSD are resampled to it before tiling, as training saw them
        self.masks = MaskCache()
        self.tiles: list[tuple[int, int, int, int, int]] = []
        for r, record in enumerate(self.records):
            height, width = self._resampled_size(record, image_size(record.image_path))
            for y, h in grid_offsets(height, tile):
                for x, w in grid_offsets(width, tile):
                    self.tiles.append((r, y, x, h, w))
        self._last: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.tiles)

    def tile_sources(self) -> list[str]:
        """Each tile's source (the CSV's ``source`` column), for per-source scores."""
        return [self.records[r].tile_source for r, *_ in self.tiles]

    def tile_id(self, index: int) -> str:
        r, y, x, _, _ = self.tiles[index]
        return f"{self.records[r].img_id}@{y},{x}"

    def _resampled_size(self, record: Record, size: tuple[int, int]) -> tuple[int, int]:
        if not (self.target_gsd and record.gsd):
            return size
        ratio = record.gsd / self.target_gsd
        return max(1, int(round(size[0] * ratio))), max(1, int(round(size[1] * ratio)))

    def _load(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        if self._last is None or self._last[0] != r:  # tiles are ordered by image: cache one
            image = read_image(self.records[r].image_path, self.in_chans)
            mask = self.masks.get(self.records[r], image.shape[:2])
            height, width = self._resampled_size(self.records[r], image.shape[:2])
            if (height, width) != image.shape[:2]:
                shrink = height < image.shape[0]
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
                image = image[:, :, None] if image.ndim == 2 else image
                mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
            self._last = (r, image, mask)
        return self._last[1], self._last[2]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r, y, x, h, w = self.tiles[index]
        image, mask = self._load(r)
        image_tile = np.zeros((self.tile, self.tile, image.shape[2]), dtype=np.uint8)
        mask_tile = np.zeros((self.tile, self.tile), dtype=np.uint8)
        image_tile[:h, :w] = image[y : y + h, x : x + w]
        mask_tile[:h, :w] = mask[y : y + h, x : x + w]
        image_t, mask_t = to_tensors(image_tile, mask_tile)
        return image_t, mask_t, torch.tensor([h, w])


def split_records(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out whole images (never crops of a training image) for validation."""
    records = list(records)
    if len(records) < 2:
        return records, records
    n_val = min(len(records) - 1, max(1, int(round(len(records) * val_fraction))))
    order = np.random.default_rng(seed).permutation(len(records))
    val_idx = set(order[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val
