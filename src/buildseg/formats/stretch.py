"""Mapping 11/12/16-bit and float imagery onto the 0-255 the models were trained on.

One rule for every reader (PNG/TIFF tiles and GeoTIFF scenes): a linear per-band map of the
2nd..98th percentile of the valid pixels onto 0..255, clipped. Shifting 12-bit data by 8 bits
(``>> 8``) would leave it nearly black; clipping 16-bit data to 255 saturates it. Valid pixels
are finite and not 0 in every band (fill); a caller with a nodata mask excludes those too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERCENTILES = (2.0, 98.0)


@dataclass(frozen=True)
class Stretch:
    """A per-band linear map of raster values onto 0-255."""

    low: np.ndarray  # (bands,) value mapped to 0
    high: np.ndarray  # (bands,) value mapped to 255

    def apply(self, block: np.ndarray) -> np.ndarray:
        """(bands, H, W) values -> uint8; NaN -> 0."""
        low, high = self.low[:, None, None], self.high[:, None, None]
        scaled = (block.astype(np.float32) - low) * (255.0 / (high - low))
        return np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8)

    def apply_hwc(self, image: np.ndarray) -> np.ndarray:
        """(H, W, bands) values -> uint8."""
        return np.ascontiguousarray(self.apply(image.transpose(2, 0, 1)).transpose(1, 2, 0))


def fit_stretch(bands_first: np.ndarray, invalid: np.ndarray | None = None,
                percentiles: tuple[float, float] = PERCENTILES) -> Stretch | None:
    """The stretch of a (bands, H, W) sample; None when it has no valid pixel.

    ``invalid`` (H, W) marks nodata pixels to leave out; non-finite pixels and pixels that
    are 0 in every band are left out as well.
    """
    data = bands_first.reshape(bands_first.shape[0], -1)
    valid = np.isfinite(data).all(axis=0) & (data != 0).any(axis=0)
    if invalid is not None:
        valid &= ~invalid.reshape(-1)
    if not valid.any():
        return None
    values = data[:, valid].astype(np.float64)
    low, high = np.percentile(values, percentiles, axis=1)
    high = np.maximum(high, low + 1e-6)
    return Stretch(low.astype(np.float32), high.astype(np.float32))


def image_to_uint8(image: np.ndarray, sample: int = 1024) -> np.ndarray:
    """An (H, W[, C]) array of any dtype as uint8: unchanged when uint8, 0/255 for bool,
    else the percentile stretch fitted on the image itself (decimated to ``sample`` px)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    hwc = image if image.ndim == 3 else image[:, :, None]
    step = max(1, -(-max(hwc.shape[:2]) // sample))
    stretch = fit_stretch(hwc[::step, ::step].transpose(2, 0, 1))
    if stretch is None:
        out = np.zeros(hwc.shape, dtype=np.uint8)
    else:
        out = stretch.apply_hwc(hwc)
    return out if image.ndim == 3 else out[:, :, 0]
