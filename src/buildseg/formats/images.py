"""Reading and writing images with errors that name the file.

OpenCV decodes PNG/JPEG/TIFF quickly and releases the GIL, which matters in DataLoader
workers. Whatever is on disk (grayscale, RGBA, 16-bit) is converted to uint8 RGB rather
than rejected, because real datasets mix all of these.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from buildseg.errors import BuildsegError

cv2.setNumThreads(1)  # parallelism comes from DataLoader workers, not from inside cv2


def _read_raw(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise BuildsegError(f"{what} file not found: {path} (check img_path in the CSV, relative to the CSV's folder)")
    image = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise BuildsegError(f"cannot decode {what} {path}: the file is corrupt or not an image; re-export or remove it")
    return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    return np.clip(image, 0, 255).astype(np.uint8)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An HxWx3 uint8 RGB array; grayscale is replicated, alpha dropped, 16-bit scaled."""
    path = Path(path)
    image = _to_uint8(_read_raw(path, "image"))
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    channels = image.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise BuildsegError(f"image {path} has {channels} channels; buildseg reads 1 (gray), 3 (RGB) or 4 (RGBA)")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """An HxW uint8 0/1 mask; any non-zero value (1, 255, any channel) is building."""
    path = Path(path)
    mask = _read_raw(path, "mask")
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return (mask > 0).astype(np.uint8)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file header, without decoding pixels."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise BuildsegError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise BuildsegError(f"cannot read image header of {path}: {exc}") from None
    return height, width


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an RGB (HxWx3) or single-channel uint8 array as PNG."""
    image = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(os.fspath(path), image):
        raise BuildsegError(f"could not write {path}")


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """Prediction in red over the image; with a truth mask, its outline in green."""
    out = image.astype(np.float32).copy()
    red = np.array([255, 40, 40], dtype=np.float32)
    sel = pred.astype(bool)
    out[sel] = (1 - alpha) * out[sel] + alpha * red
    out = out.astype(np.uint8)
    if truth is not None:
        contours, _ = cv2.findContours(truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (40, 255, 40), 1)
    return out
