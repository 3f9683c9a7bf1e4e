"""A picture of what a run found, so that a mapper sees it without opening QGIS.

``OUT/overview.png`` (an AOI or many-scene run; a GeoTIFF run: ``<mask>_overview.png`` beside
its mask): the imagery, downsampled so that its longer side is at most :data:`MAX_SIDE` pixels
(read through the rasters' overviews where they have them), in the first raster's CRS, with the
footprints' outlines drawn over it: one colour per status with ``--existing`` (new, mapped,
unconfirmed) and a legend with their counts. ``overview.json`` beside it holds those counts and
what was drawn, for ``buildseg report --run OUT``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from buildseg.atomic import atomic_open

MAX_SIDE = 2000  # px: the picture's longer side at most
STATUS_COLOURS = {"new": (255, 48, 48), "mapped": (48, 144, 255), "unconfirmed": (255, 200, 0)}
FOUND = "buildings"  # the one status of a run without --existing
FOUND_COLOUR = (255, 48, 48)
OUTLINE = 2  # px
LEGEND_PX = 18  # the legend's text height


def _canvas(rasters: Sequence[str | Path], max_side: int):
    """(crs, transform, height, width) of a grid over all rasters, longer side <= max_side,
    pixels no smaller than the finest raster's."""
    import rasterio
    from affine import Affine
    from rasterio.warp import transform_bounds

    crs, bounds, native = None, [], []
    for path in rasters:
        with rasterio.open(path) as src:
            crs = crs or src.crs
            box = transform_bounds(src.crs, crs, *src.bounds) if src.crs and crs and src.crs != crs else src.bounds
            bounds.append(box)
            native.append((box[2] - box[0]) / src.width)
    left, bottom = min(b[0] for b in bounds), min(b[1] for b in bounds)
    right, top = max(b[2] for b in bounds), max(b[3] for b in bounds)
    size = max(max(right - left, top - bottom) / max_side, min(native))  # never finer than the imagery
    width, height = max(1, math.ceil((right - left) / size)), max(1, math.ceil((top - bottom) / size))
    return crs, Affine(size, 0, left, 0, -size, top), height, width


def _stretched(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """uint8 as it is; other types by each band's 2-98 percentiles of its valid pixels."""
    if data.dtype == np.uint8:
        return data
    out = np.zeros(data.shape, np.uint8)
    for band in range(data.shape[0]):
        values = data[band][valid]
        if values.size:
            low, high = np.percentile(values, (2, 98))
            out[band] = np.clip((data[band].astype(np.float64) - low) / max(high - low, 1e-9) * 255, 0, 255)
    return out


def imagery(rasters: Sequence[str | Path], max_side: int = MAX_SIDE):
    """(H, W, 3) uint8 picture of the rasters on one grid, and that grid (crs, transform)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    crs, transform, height, width = _canvas(rasters, max_side)
    picture = np.zeros((3, height, width), np.uint8)
    for path in rasters:
        with rasterio.open(path) as src:
            bands = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
            factor = max(1.0, transform.a / abs(src.transform.a))  # source pixels per picture pixel
            shape = (max(1, round(src.height / factor)), max(1, round(src.width / factor)))
            data, valid = _read_small(src, bands, shape, Resampling.average)
            small = src.transform * src.transform.scale(src.width / shape[1], src.height / shape[0])
            data = _stretched(data, valid)
            data[:, ~valid] = 0
            for band in range(3):
                layer = np.zeros((height, width), np.uint8)
                reproject(data[band], layer, src_transform=small, src_crs=src.crs or crs, dst_transform=transform,
                          dst_crs=crs, resampling=Resampling.nearest, src_nodata=0, dst_nodata=0)
                picture[band] = np.where(layer > 0, layer, picture[band])
    return picture.transpose(1, 2, 0), crs, transform


def _read_small(src, bands: list[int], shape: tuple[int, int], resampling):
    """The raster at ``shape``: through its overviews, except an imagery service's area (its
    VRT's overviews would be other zooms' tiles, not fetched yet): read at its own zoom, whose
    tiles the run has cached, in strips, each pixel of the picture one pixel of the area."""
    from rasterio.windows import Window

    from buildseg.formats.tile_services import service_url_of

    if not service_url_of(src.name):
        return src.read(bands, out_shape=(3, *shape), resampling=resampling), src.read_masks(1, out_shape=shape) > 0
    step_y, step_x = src.height / shape[0], src.width / shape[1]
    rows = np.minimum((np.arange(shape[0]) * step_y).astype(int), src.height - 1)
    cols = np.minimum((np.arange(shape[1]) * step_x).astype(int), src.width - 1)
    data, valid = np.zeros((3, *shape), src.dtypes[0]), np.zeros(shape, bool)
    strip = 1024
    for top in range(0, src.height, strip):
        picked = np.nonzero((rows >= top) & (rows < top + strip))[0]
        if not picked.size:
            continue
        window = Window(0, top, src.width, min(strip, src.height - top))
        block, masks = src.read(bands, window=window), src.read_masks(1, window=window)
        data[:, picked] = block[:, rows[picked] - top][:, :, cols]
        valid[picked] = masks[rows[picked] - top][:, cols] > 0
    return data, valid


def _rings(geometry):
    if geometry is None or geometry.is_empty:
        return []
    polygons = getattr(geometry, "geoms", [geometry])
    return [np.asarray(p.exterior.coords) for p in polygons if p.geom_type == "Polygon"]


def write_overview(rasters: Sequence[str | Path], footprints: dict[str, object], out: str | Path, *,
                   max_side: int = MAX_SIDE) -> Path:
    """Draw ``footprints`` (status -> GeoDataFrame) over the rasters' imagery into ``out``
    (PNG), with a legend; ``overview.json``-style counts go beside it (``<out>.json``)."""
    from PIL import Image, ImageDraw

    picture, crs, transform = imagery(rasters, max_side)
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    inverse = ~transform
    counts = {}
    for status, frame in footprints.items():
        colour = STATUS_COLOURS.get(status, FOUND_COLOUR)
        counts[status] = int(len(frame))
        if not len(frame):
            continue
        frame = frame.to_crs(crs) if frame.crs is not None and crs is not None and frame.crs != crs else frame
        for geometry in frame.geometry:
            for ring in _rings(geometry):
                cols, rows = inverse * (ring[:, 0], ring[:, 1])
                draw.line(list(zip(cols.tolist(), rows.tolist())), fill=colour, width=OUTLINE)
    _legend(draw, counts)
    out = Path(out)
    with atomic_open(out, "wb") as handle:
        image.save(handle, format="PNG")
    about = {"picture": out.name, "size_px": list(image.size), "counts": counts, "imagery": [str(r) for r in rasters],
             "colours": {s: STATUS_COLOURS.get(s, FOUND_COLOUR) for s in counts}}
    with atomic_open(out.with_suffix(".json"), "w") as handle:
        json.dump(about, handle, indent=1)
    return out


def _legend(draw, counts: dict[str, int]) -> None:
    """Coloured squares and counts in the top-left corner, on a white box."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=LEGEND_PX)
    rows, line = list(counts.items()), LEGEND_PX + 6
    width = max((draw.textlength(f"{status}: {n}", font=font) for status, n in rows), default=0)
    draw.rectangle([4, 4, 22 + LEGEND_PX + width, 12 + line * len(rows)], fill=(255, 255, 255))
    for k, (status, n) in enumerate(rows):
        y = 8 + line * k
        draw.rectangle([8, y, 8 + LEGEND_PX, y + LEGEND_PX], fill=STATUS_COLOURS.get(status, FOUND_COLOUR))
        draw.text((14 + LEGEND_PX, y), f"{status}: {n}", fill=(0, 0, 0), font=font)
