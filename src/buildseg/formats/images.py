"""Reading and writing images with errors that name the file.

OpenCV decodes PNG/JPEG/TIFF quickly and releases the GIL, which matters in DataLoader
workers. Whatever is on disk (grayscale, RGBA, 16-bit) is converted to uint8 rather than
rejected, because real datasets mix all of these; masks follow the rule in :func:`read_mask`.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from buildseg.errors import BuildsegError
from buildseg.formats.stretch import image_to_uint8

cv2.setNumThreads(1)  # parallelism comes from DataLoader workers, not from inside cv2
try:  # unreadable files are reported by buildseg in one line; OpenCV's own log would add several
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
except AttributeError:  # older OpenCV builds without the logging module
    pass


def _read_raw(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise BuildsegError(f"{what} file not found: {path} (check img_path in the CSV, relative to the CSV's folder)")
    image = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if (image is None or image.size == 0) and path.suffix.lower() in (".tif", ".tiff"):
        image = _read_tiff_bands(path)  # more bands than OpenCV reads
    if image is None or image.size == 0:
        raise BuildsegError(f"cannot decode {what} {path}: the file is corrupt or not an image; re-export or remove it")
    return image


def _read_tiff_bands(path: Path) -> np.ndarray | None:
    """An (H, W, bands) array of a multi-band TIFF through rasterio (the geo extra), or None."""
    try:
        import rasterio
    except ImportError:
        return None
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a plain TIFF is "not georeferenced": expected here
            with rasterio.open(path) as src:
                return np.ascontiguousarray(src.read().transpose(1, 2, 0))
    except Exception:  # rasterio raises several error types for corrupt files
        return None


def read_image(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """An HxWx``channels`` uint8 array.

    ``channels=3``: RGB; grayscale is replicated and alpha dropped. Other counts (1, 4 for
    RGB+NIR or RGBA, N-band TIFFs): the file must have exactly that many channels, in file
    order (RGB[A] for colour PNGs). Data that is not 8-bit (11/12/16-bit, float) is mapped
    with the per-band 2-98 percentile stretch that GeoTIFF prediction uses
    (:mod:`buildseg.formats.stretch`).
    """
    path = Path(path)
    raw = _read_raw(path, "image")
    if raw.dtype.kind == "f" and not np.isfinite(raw).any():
        raise BuildsegError(f"image {path} has no finite pixel (all NaN/inf): re-export it or remove it from the data")
    image = image_to_uint8(raw)
    if image.ndim == 2:
        image = image[:, :, None]
    have = image.shape[2]
    if have in (3, 4):  # OpenCV's BGR[A] -> RGB[A]
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if have == 3 else cv2.COLOR_BGRA2RGBA)
    if channels == 3:
        if have == 1:
            return np.ascontiguousarray(np.repeat(image, 3, axis=2))
        if have in (3, 4):
            return np.ascontiguousarray(image[:, :, :3])
        raise BuildsegError(f"image {path} has {have} channels; an RGB model reads 1 (gray), 3 (RGB) or 4 (RGBA), "
                            f"or train with in_chans={have}")
    if have != channels:
        raise BuildsegError(f"image {path} has {have} channels but the model expects {channels} (in_chans); "
                            f"give {channels}-channel images or train with in_chans={have}")
    return np.ascontiguousarray(image)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An HxWx3 uint8 RGB array (see :func:`read_image`)."""
    return read_image(path, 3)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """An HxW uint8 0/1 mask.

    The rule: a pixel is building where any colour channel is non-zero (gray, or R/G/B of
    a colour mask: white, red or any colour on black). The alpha channel of an RGBA mask
    is used only when every colour channel is 0 everywhere (buildings drawn as opaque
    pixels on a transparent layer); an opaque RGBA mask is read from its colours, never
    as "all building".
    """
    path = Path(path)
    mask = _read_raw(path, "mask")
    if mask.ndim == 3:
        colour = mask[:, :, : min(3, mask.shape[2])].max(axis=2)
        if mask.shape[2] == 4 and not colour.any():
            colour = mask[:, :, 3]
        mask = colour
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
    """Write a gray (HxW or HxWx1), RGB or RGBA uint8 array as PNG, atomically."""
    from buildseg.atomic import atomic_open

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    image = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise BuildsegError(f"could not encode {path} as PNG")
    with atomic_open(path, "wb") as handle:
        handle.write(encoded.tobytes())


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
