"""Decoded-image store: each training image and mask is decoded once; crops read windows.

Decoding a 1024x1024 PNG costs about 30 ms; reading a 224x224 window of the same image
from an uncompressed array costs microseconds. A training epoch over the competition set
cuts about 150,000 crops from 7,140 images, so decoding the image again for every crop
leaves a GPU waiting for the loader. The store decodes every image once:

* ``disk``: one uncompressed ``.npy`` per image (HxWxC uint8) and per mask (bit-packed
  along rows), memory-mapped by every DataLoader worker and rank; the OS page cache does
  the rest. Kept outside the dataset folder (default ``~/.cache/buildseg/decoded``, or
  ``$XDG_CACHE_HOME``), keyed by the image's absolute path, size and modification time, its
  mask's source (RLE text or mask file, size and mtime) and the channel count, so a changed
  image or mask is decoded again. Entries are written to a temporary file and renamed, and
  the build holds an exclusive lock on the store, so several workers, ranks or processes
  building at once produce one valid store, each entry built once.
* ``ram``: the same arrays in memory, decoded before the loader starts its workers (which
  share the pages on Linux's fork); for datasets that fit ``ram_fraction`` of the RAM.

Any ``OSError`` while building (full disk, read-only or missing cache folder) raises
:class:`StoreUnavailable`; the trainer then warns and decodes per crop, never reading a
half-written entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from buildseg.atomic import atomic_open
from buildseg.formats.images import image_size, read_image
from buildseg.formats.tables import Record
from buildseg.runtime import user_cache_dir
from buildseg.runtime.locks import folder_lock

log = logging.getLogger("buildseg")
STORE_VERSION = 1
CACHE_MODES = ("auto", "disk", "ram", "none")


class StoreUnavailable(Exception):
    """The store cannot be built here (disk full, read-only, ...); decode per crop instead."""


def default_cache_dir() -> Path:
    return user_cache_dir("decoded")


def _mask_source(record: Record) -> str:
    if record.mask_path is not None:
        st = record.mask_path.stat()
        return f"file:{record.mask_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return "rle:" + hashlib.sha1((record.rle or "-1").encode()).hexdigest()


def entry_key(record: Record, in_chans: int) -> str:
    """Changes whenever the decoded arrays would: image bytes (size, mtime), mask, channels."""
    st = record.image_path.stat()
    text = f"v{STORE_VERSION}|{record.image_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{in_chans}|{_mask_source(record)}"
    return hashlib.sha1(text.encode()).hexdigest()[:32]


def decoded_bytes(records: Sequence[Record], in_chans: int) -> int:
    """Size of the decoded set (images + bit-packed masks), from the image headers."""
    total = 0
    for record in records:
        h, w = image_size(record.image_path)
        total += h * w * in_chans + h * ((w + 7) // 8)
    return total


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_mode(mode: str, records: Sequence[Record], in_chans: int, ram_fraction: float) -> str:
    """``auto``: ``ram`` when the decoded set fits ``ram_fraction`` of the RAM, else ``disk``."""
    if mode != "auto":
        return mode
    return "ram" if decoded_bytes(records, in_chans) <= ram_fraction * total_ram() else "disk"


def _decode(record: Record, in_chans: int) -> tuple[np.ndarray, np.ndarray]:
    image = read_image(record.image_path, in_chans)
    mask = record.load_mask(image.shape[:2])
    return image, np.packbits(mask.astype(bool), axis=1)


@dataclass
class StoreStats:
    entries: int
    built: int
    bytes: int
    mode: str
    folder: Path | None


class DecodedStore:
    """Decoded images and masks of ``records``, read by window."""

    def __init__(self, records: Sequence[Record], in_chans: int = 3, mode: str = "disk",
                 cache_dir: str | Path | None = None) -> None:
        if mode not in ("disk", "ram"):
            raise ValueError(f"store mode must be disk or ram, got {mode!r}")
        self.records = list(records)
        self.in_chans = in_chans
        self.mode = mode
        self.folder = Path(cache_dir) if cache_dir else default_cache_dir()
        self.shapes: list[tuple[int, int]] = []
        self._keys: list[str] = []
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # ram: all; disk: this process's memmaps

    # -- building ----------------------------------------------------------------------
    def build(self, progress: bool = False) -> StoreStats:
        """Decode what is missing (disk: under the store's lock, atomically per entry)."""
        if self.mode == "ram":
            for i, record in enumerate(tqdm(self.records, desc="decoding to RAM", disable=not progress, leave=False)):
                self._arrays[i] = _decode(record, self.in_chans)
            self.shapes = [image.shape[:2] for image, _ in (self._arrays[i] for i in range(len(self.records)))]
            size = sum(a.nbytes + m.nbytes for a, m in self._arrays.values())
            return StoreStats(len(self.records), len(self.records), size, "ram", None)
        try:
            with folder_lock(self.folder):  # one builder at a time; the next finds the entries done
                built = self._build_disk(progress)
        except OSError as exc:
            raise StoreUnavailable(f"cannot build the decoded-image store in {self.folder}: {exc}") from None
        size = sum(self._paths(k)[0].stat().st_size + self._paths(k)[1].stat().st_size for k in self._keys)
        return StoreStats(len(self.records), built, size, "disk", self.folder)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.image.npy", self.folder / f"{key}.mask.npy"

    def _build_disk(self, progress: bool) -> int:
        self._keys = [entry_key(r, self.in_chans) for r in self.records]
        built = 0
        for record, key in tqdm(list(zip(self.records, self._keys)), desc="decoded-image store", disable=not progress,
                                leave=False):
            image_path, mask_path = self._paths(key)
            if not (image_path.is_file() and mask_path.is_file()):
                image, mask_bits = _decode(record, self.in_chans)
                _save_atomic(mask_path, mask_bits)
                _save_atomic(image_path, image)  # written last: its presence marks a complete entry
                built += 1
        self.shapes = [tuple(np.load(self._paths(k)[0], mmap_mode="r").shape[:2]) for k in self._keys]
        return built

    # -- reading -----------------------------------------------------------------------
    def _entry(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        entry = self._arrays.get(index)
        if entry is None:  # disk: opened lazily in each worker process
            image_path, mask_path = self._paths(self._keys[index])
            entry = (np.load(image_path, mmap_mode="r"), np.load(mask_path, mmap_mode="r"))
            self._arrays[index] = entry
        return entry

    def window(self, index: int, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(image HxWxC uint8, mask HxW uint8 0/1) of the window, clipped to the image."""
        image, bits = self._entry(index)
        crop = np.array(image[y : y + h, x : x + w])
        byte0 = x // 8
        row_bits = np.unpackbits(bits[y : y + h, byte0 : (x + w + 7) // 8], axis=1)
        start = x - byte0 * 8
        return crop, np.ascontiguousarray(row_bits[:, start : start + crop.shape[1]])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.mode == "disk":
            state["_arrays"] = {}  # memmaps are reopened in each worker, never pickled as copies
        return state


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        np.save(handle, array)


def open_store(records: Sequence[Record], in_chans: int, mode: str, cache_dir: str | None, ram_fraction: float,
               progress: bool = False) -> DecodedStore | None:
    """The store for ``mode`` (auto/disk/ram/none), built; None (with a warning) where it cannot be."""
    mode = choose_mode(mode, records, in_chans, ram_fraction)
    if mode == "none":
        return None
    store = DecodedStore(records, in_chans, mode, cache_dir)
    try:
        stats = store.build(progress)
    except StoreUnavailable as exc:
        log.warning("%s; decoding every crop instead (--cache none)", exc)
        return None
    where = f" in {stats.folder}" if stats.folder else ""
    log.info("decoded-image store (%s%s): %d images, %d decoded now, %.1f MB", stats.mode, where, stats.entries,
             stats.built, stats.bytes / 1e6)
    return store


def build_disk_store(data: str | Path, *, in_chans: int, cache_dir: str | Path | None) -> StoreStats:
    """``buildseg cache``: decode a training set into the disk store ahead of a run."""
    from buildseg.errors import BuildsegError
    from buildseg.formats.tables import load_records

    store = DecodedStore(load_records(data, require_masks=True), in_chans, "disk", cache_dir)
    try:
        return store.build(progress=True)
    except StoreUnavailable as exc:
        raise BuildsegError(f"{exc}; pass --cache-dir DIR on a writable disk with room") from None
