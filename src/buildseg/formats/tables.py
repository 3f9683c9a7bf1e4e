"""The competition's CSV tables and the images/masks folder layout.

Training/validation: ``img_id,img_path,mask_rle`` (img_path relative to the CSV's folder), optionally
with ``source`` (the place or sensor a tile comes from: sampling balance, per-source scores) and
``gsd`` (metres per pixel; blank when unknown).
Test: ``img_id,img_path``. Submission: ``img_id,mask_rle`` in the test CSV's row order.
A folder dataset has ``images/`` and ``masks/`` whose files share stems.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from buildseg.atomic import atomic_open
from buildseg.errors import BuildsegError, RleError
from buildseg.formats import rle as rle_codec
from buildseg.formats.images import read_mask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Record:
    """One image of a dataset and where its mask comes from (RLE text or a mask file)."""

    img_id: str
    image_path: Path
    rle: str | None = None
    mask_path: Path | None = None
    source: str = ""  # the CSV or folder it came from, for error messages
    tile_source: str = ""  # the CSV's ``source`` column: the place or sensor (balancing, per-source Dice)
    gsd: float | None = None  # the CSV's ``gsd`` column: metres per pixel, None when unknown

    @property
    def has_mask(self) -> bool:
        return self.rle is not None or self.mask_path is not None

    def load_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The HxW 0/1 mask, checked against the image's shape."""
        if self.mask_path is not None:
            mask = read_mask(self.mask_path)
            if mask.shape != tuple(shape):
                raise BuildsegError(
                    f"mask {self.mask_path} is {mask.shape[0]}x{mask.shape[1]} but its image "
                    f"{self.image_path} is {shape[0]}x{shape[1]}; masks must match their images"
                )
            return mask
        if self.rle is None:
            raise BuildsegError(f"{self.img_id} in {self.source} has no mask (a test CSV was given where training data is needed)")
        try:
            return rle_codec.decode(self.rle, shape, img_id=self.img_id)
        except RleError as exc:
            raise RleError(f"{self.source}: {exc}") from None


def load_records(source: str | os.PathLike, require_masks: bool = False, masks: bool = True) -> list[Record]:
    """Records from a competition CSV or an images/[masks/] folder. ``masks=False``: images
    only; a ``mask_rle`` column or ``masks/`` folder is not looked at (``buildseg adapt``)."""
    path = Path(source)
    if not path.exists():
        raise BuildsegError(f"data not found: {source} (give a competition CSV or a folder with images/ and masks/"
                            f"{'; an imagery service URL needs --aoi FILE and, to train, --labels FILE' if '://' in str(source) else ''})")
    records = _read_folder(path, masks) if path.is_dir() else _read_csv(path, masks)
    if require_masks:
        missing = [r.img_id for r in records if not r.has_mask]
        if missing:
            raise BuildsegError(
                f"{path}: {len(missing)} images have no mask (e.g. {missing[0]}); training and evaluation need "
                "a mask_rle column or a masks/ folder"
            )
    return records


def _check_columns(path: Path, columns: Sequence[str], needed: Sequence[str], expected: str) -> None:
    if not columns:
        raise BuildsegError(f"{path} is empty: expected a header {expected} and one row per image")
    for name in needed:
        if name not in columns:
            raise BuildsegError(f"{path} has no '{name}' column (columns: {', '.join(columns)}); expected {expected}")


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a UTF-8 CSV, with errors that name the file."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # an RLE of a busy 1024 px mask passes 131,072 chars
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError as exc:
        raise BuildsegError(f"{path} is not UTF-8 text (byte {exc.start}): save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise BuildsegError(f"{path} is not a valid CSV: {exc}") from None


def _read_csv(path: Path, masks: bool = True) -> list[Record]:
    columns, rows = read_csv_rows(path)
    _check_columns(path, columns, ("img_id", "img_path"), "img_id,img_path[,mask_rle]")
    has_rle = masks and "mask_rle" in columns
    records = []
    for line, row in enumerate(rows, start=2):
        img_id = (row.get("img_id") or "").strip()
        img_path = (row.get("img_path") or "").strip()
        if not img_id or not img_path:
            raise BuildsegError(f"{path} line {line}: img_id and img_path must not be empty")
        rle = None
        if has_rle:
            value = row.get("mask_rle")
            rle = rle_codec.EMPTY if rle_codec.is_empty_rle(value) else value.strip()
            if rle != rle_codec.EMPTY:
                try:  # syntax now, so a bad row fails before a run starts; bounds need the image size
                    rle_codec.parse_runs(rle, img_id)
                except RleError as exc:
                    raise RleError(f"{path} line {line}: {exc}") from None
        records.append(Record(img_id, path.parent / img_path, rle=rle, source=str(path),
                              tile_source=(row.get("source") or "").strip(),
                              gsd=parse_gsd(row.get("gsd"), where=f"{path} line {line}")))
    if not records:
        raise BuildsegError(f"{path} has a header but no rows")
    _check_unique(records, path)
    return records


def parse_gsd(text: str | None, *, where: str) -> float | None:
    """Metres per pixel from a table cell: ``0.5``, ``~0.3``, ``0.54 (web-mercator z18)``; blank,
    ``unknown``, a bound (``<0.8``) or a range (``0.3-2.5``: a dataset-wide span, not this tile's) is None."""
    value = (text or "").strip().lstrip("~").strip()
    match = re.match(r"^(\d+(?:\.\d*)?|\.\d+)(?:\s*m\b)?(.*)$", value)
    if not value or value[0] in "<>" or value.lower().startswith("unknown") or (match and re.match(r"^\s*[-\u2013]\s*\d", match.group(2))):
        return None
    if match is None or float(match.group(1)) <= 0:
        raise BuildsegError(f"{where}: gsd {text!r} is not metres per pixel (write e.g. 0.5, or leave it blank when unknown)")
    return float(match.group(1))


def _read_folder(path: Path, read_masks: bool = True) -> list[Record]:
    images_dir = path / "images"
    if not images_dir.is_dir():
        raise BuildsegError(f"{path} is a folder without images/: a folder dataset needs images/ and (for training) masks/")
    masks_dir = path / "masks"
    masks = {}
    if read_masks and masks_dir.is_dir():
        masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise BuildsegError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if read_masks and masks_dir.is_dir():
        lonely = [p.name for p in images if p.stem not in masks]
        if lonely:
            raise BuildsegError(f"{len(lonely)} images in {images_dir} have no mask in {masks_dir} (e.g. {lonely[0]})")
    records = [Record(p.stem, p, mask_path=masks.get(p.stem), source=str(path)) for p in images]
    _check_unique(records, path)
    return records


def _check_unique(records: Sequence[Record], path: Path) -> None:
    seen: set[str] = set()
    for record in records:
        if record.img_id in seen:
            raise BuildsegError(f"{path}: img_id {record.img_id!r} appears more than once")
        seen.add(record.img_id)


def write_atomic_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Write a CSV atomically: an interrupted run never leaves a half-written submission."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return Path(path)


def write_submission(path: str | os.PathLike, img_ids: Sequence[str], rles: Sequence[str]) -> Path:
    """The competition submission: ``img_id,mask_rle``, ``-1`` for empty masks."""
    return write_atomic_csv(path, ("img_id", "mask_rle"), zip(img_ids, rles))


def read_rle_table(path: str | os.PathLike) -> dict[str, str]:
    """img_id -> mask_rle from a submission or truth CSV (empty spellings become ``-1``)."""
    path = Path(path)
    if not path.is_file():
        raise BuildsegError(f"CSV not found: {path}")
    columns, rows = read_csv_rows(path)
    _check_columns(path, columns, ("img_id", "mask_rle"), "img_id,mask_rle")
    table: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        img_id = (row.get("img_id") or "").strip()
        if img_id in table:
            raise BuildsegError(f"{path} line {line}: img_id {img_id!r} appears more than once; keep one row per image")
        value = row.get("mask_rle")
        table[img_id] = rle_codec.EMPTY if rle_codec.is_empty_rle(value) else value.strip()
    if not table:
        raise BuildsegError(f"{path} has a header but no rows")
    return table
