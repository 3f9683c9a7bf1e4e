"""Large GeoTIFFs: block-by-block prediction into a georeferenced mask and building polygons.

The raster is processed in blocks of ``block`` pixels, each read with a context margin
(boundless read, so edges get zeros) and predicted with the Segmenter (which blends
overlapping windows itself when the block is larger than its window); only the block's
centre is written. Memory is bounded by one block plus its margin. Polygons come from
``rasterio.features.shapes`` per block; those touching a block border are merged across
blocks with shapely at the end. Areas are in m^2 for projected CRSs in metres; for
geographic CRSs the area is left out (it would need a geodesic computation), and for a
raster without a CRS coordinates and areas are in pixels (with a warning).

Rasters that are not 8-bit (11/12/16-bit, float) are mapped to 0-255 with one per-band
2-98 percentile stretch for the whole raster (``stretch="none"``: clip to 0-255 instead).

Post-processing runs per block, so a component cut by a block border is judged by its
part in each block for ``min_area``; use blocks much larger than buildings (default 2048).
Needs the ``geo`` extra (rasterio, shapely).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from buildseg.atomic import atomic_open
from buildseg.errors import BuildsegError
from buildseg.formats.rasters import check_bands, open_raster, raster_stretch, read_window, require_rasterio, scene_grid
from buildseg.inference.segmenter import Segmenter

log = logging.getLogger("buildseg")


@dataclass
class GeoResult:
    mask_path: Path
    geojson_path: Path | None
    n_polygons: int
    crs: str | None
    area_unit: str | None


def predict_geotiff(
    segmenter: Segmenter,
    src_path: str | Path,
    mask_path: str | Path,
    geojson_path: str | Path | None = None,
    block: int = 2048,
    margin: int = 64,
    simplify: float = 0.0,
    stretch: str = "percentile",
    gsd: float | None = None,
    bands: list[int] | None = None,
) -> GeoResult:
    """Predict a raster block by block into a mask GeoTIFF on the raster's own grid.

    ``gsd`` (metres per pixel): each block is read resampled to it, predicted, and the
    probabilities are resampled back to the raster's pixels, so a model trained at 0.5 m
    applies to 0.3 m imagery. ``bands``: the 1-based bands to read (default 1..in_chans).
    Nodata pixels (mask, nodata value, alpha, all-zero fill) are never buildings.
    """
    import cv2
    from rasterio.windows import Window

    src_path, mask_path = Path(src_path), Path(mask_path)
    bands = list(bands) if bands else list(range(1, segmenter.in_chans + 1))
    if len(bands) != segmenter.in_chans:
        raise BuildsegError(f"--bands {','.join(map(str, bands))} gives {len(bands)} channels but the model expects "
                            f"{segmenter.in_chans}")
    with open_raster(src_path) as src:
        check_bands(src, bands, src_path)
        if src.crs is None:
            warnings.warn(f"{src_path} has no CRS: the mask keeps its pixel grid and polygons are in pixel coordinates")
        grid = scene_grid(src, gsd, src_path)
        if grid.resampled:
            log.info("predicting %s at %g m per pixel (resampled x%.3g), written back on its own grid", src_path.name,
                     gsd, 1 / grid.step_x)
        profile = dict(driver="GTiff", height=src.height, width=src.width, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform, compress="deflate", tiled=True, blockxsize=256, blockysize=256)
        scaling = raster_stretch(src, bands, stretch)
        polygons, border_polygons = [], []
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = mask_path.with_name(f".{mask_path.name}.tmp")
        try:
            with require_rasterio().open(tmp, "w", **profile) as dst:
                for y in range(0, src.height, block):
                    for x in range(0, src.width, block):
                        h, w = min(block, src.height - y), min(block, src.width - x)
                        size = (h + 2 * margin, w + 2 * margin)
                        rows, cols = max(1, round(size[0] / grid.step_y)), max(1, round(size[1] / grid.step_x))
                        image, valid = read_window(src, bands, grid, (y - margin) / grid.step_y, (x - margin) / grid.step_x,
                                                   rows, cols, scaling)
                        prob = segmenter.predict_proba(image)
                        if grid.resampled:
                            prob = cv2.resize(prob, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                            valid = cv2.resize(valid.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0
                        inner = (slice(margin, margin + h), slice(margin, margin + w))
                        mask = segmenter.finish(np.ascontiguousarray(prob[inner]))
                        mask[~valid[inner]] = 0
                        window = Window(x, y, w, h)
                        dst.write(mask[None], window=window)
                        if geojson_path is not None and mask.any():
                            _polygonize(mask, src.window_transform(window), polygons, border_polygons)
            tmp.replace(mask_path)
        finally:
            tmp.unlink(missing_ok=True)
        crs = src.crs
        unit = _area_unit(crs)
    n = 0
    if geojson_path is not None:
        n = _write_geojson(Path(geojson_path), polygons, border_polygons, crs, unit, simplify)
    return GeoResult(mask_path, Path(geojson_path) if geojson_path else None, n, crs.to_string() if crs else None, unit)


def _polygonize(mask: np.ndarray, transform, polygons: list, border_polygons: list) -> None:
    from rasterio.features import shapes
    from shapely.geometry import shape

    height, width = mask.shape
    inverse = ~transform  # map -> pixel coordinates of this block
    for geometry, _ in shapes(mask, mask=mask > 0, transform=transform, connectivity=8):
        polygon = shape(geometry)
        cols_rows = [inverse @ c for c in polygon.exterior.coords]
        touches = any(c <= 0 or r <= 0 or c >= width or r >= height for c, r in cols_rows)
        (border_polygons if touches else polygons).append(polygon)


def _area_unit(crs) -> str | None:
    if crs is None:
        return "px^2"
    if crs.is_projected and (crs.linear_units or "").lower() in ("metre", "meter", "m"):
        return "m^2"
    return None


def _write_geojson(path: Path, polygons, border_polygons, crs, unit: str | None, simplify: float) -> int:
    from shapely.geometry import mapping
    from shapely.ops import unary_union

    if border_polygons:  # buildings cut by block borders: merge their parts
        merged = unary_union(border_polygons)
        polygons = polygons + (list(merged.geoms) if hasattr(merged, "geoms") else [merged])
    features = []
    for i, polygon in enumerate(polygons):
        if simplify > 0:
            polygon = polygon.simplify(simplify, preserve_topology=True)
        props = {"id": i}
        if unit == "m^2":
            props["area_m2"] = round(float(polygon.area), 3)
        elif unit == "px^2":
            props["area_px"] = float(polygon.area)
        features.append({"type": "Feature", "properties": props, "geometry": mapping(polygon)})
    collection = {"type": "FeatureCollection", "features": features}
    if crs is not None:
        collection["crs"] = {"type": "name", "properties": {"name": crs.to_string()}}
    with atomic_open(path, "w") as handle:
        handle.write(json.dumps(collection))
    return len(features)
