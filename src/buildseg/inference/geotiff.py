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
from buildseg.formats.stretch import Stretch, fit_stretch
from buildseg.inference.segmenter import Segmenter

log = logging.getLogger("buildseg")


@dataclass
class GeoResult:
    mask_path: Path
    geojson_path: Path | None
    n_polygons: int
    crs: str | None
    area_unit: str | None


STRETCHES = ("percentile", "none")


def raster_stretch(src, bands: list[int], mode: str = "percentile", percentiles: tuple[float, float] = (2.0, 98.0),
                   sample: int = 1024) -> Stretch | None:
    """The 2-98 percentile stretch per band, from a decimated read of the whole raster.

    None for 8-bit rasters and for ``mode="none"`` (values are then clipped to 0-255).
    Nodata pixels (the raster's mask), non-finite values and pixels that are 0 in every
    band (fill) are left out of the percentiles.
    """
    if mode not in STRETCHES:
        raise BuildsegError(f"unknown stretch {mode!r}; use {' or '.join(STRETCHES)}")
    if mode == "none" or all(src.dtypes[b - 1] == "uint8" for b in bands):
        return None
    scale = max(1, -(-max(src.height, src.width) // sample))
    shape = (len(bands), -(-src.height // scale), -(-src.width // scale))
    data = src.read(bands, out_shape=shape, masked=True)
    fitted = fit_stretch(np.ma.getdata(data), np.ma.getmaskarray(data).any(axis=0), percentiles)
    if fitted is None:
        log.warning("%s has no valid pixels to stretch: values are clipped to 0-255", src.name)
        return None
    log.info("stretching %s band values %s..%s to 0..255", Path(src.name).name,
             np.round(fitted.low, 2).tolist(), np.round(fitted.high, 2).tolist())
    return fitted


def _to_uint8(block: np.ndarray, stretch: Stretch | None) -> np.ndarray:
    if stretch is not None:
        return stretch.apply(block)
    if block.dtype == np.uint8:
        return block
    return np.clip(block, 0, 255).astype(np.uint8)


def predict_geotiff(
    segmenter: Segmenter,
    src_path: str | Path,
    mask_path: str | Path,
    geojson_path: str | Path | None = None,
    block: int = 2048,
    margin: int = 64,
    simplify: float = 0.0,
    stretch: str = "percentile",
) -> GeoResult:
    try:
        import rasterio
        from rasterio.windows import Window
    except ImportError:
        raise BuildsegError("GeoTIFF input needs the geo extra: pip install 'buildseg[geo]'") from None
    src_path, mask_path = Path(src_path), Path(mask_path)
    if not src_path.is_file():
        raise BuildsegError(f"GeoTIFF not found: {src_path}")
    try:
        src = rasterio.open(src_path)
    except rasterio.errors.RasterioIOError as exc:
        raise BuildsegError(f"cannot open {src_path} as a raster: {' '.join(str(exc).split())[:200]}") from None
    with src:
        if src.count < segmenter.in_chans:
            raise BuildsegError(f"{src_path} has {src.count} bands but the model expects {segmenter.in_chans}")
        if src.crs is None:
            warnings.warn(f"{src_path} has no CRS: the mask keeps its pixel grid and polygons are in pixel coordinates")
        profile = dict(driver="GTiff", height=src.height, width=src.width, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform, compress="deflate", tiled=True, blockxsize=256, blockysize=256)
        bands = list(range(1, segmenter.in_chans + 1))
        try:
            scaling = raster_stretch(src, bands, stretch)
        except rasterio.errors.RasterioIOError as exc:
            raise BuildsegError(f"cannot read {src_path}: the file is damaged ({' '.join(str(exc).split())[:160]}); "
                                "re-export it") from None
        polygons, border_polygons = [], []
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = mask_path.with_name(f".{mask_path.name}.tmp")
        try:
            with rasterio.open(tmp, "w", **profile) as dst:
                for y in range(0, src.height, block):
                    for x in range(0, src.width, block):
                        h, w = min(block, src.height - y), min(block, src.width - x)
                        ctx = Window(x - margin, y - margin, w + 2 * margin, h + 2 * margin)
                        try:
                            raw = src.read(bands, window=ctx, boundless=True, fill_value=0)
                        except rasterio.errors.RasterioIOError as exc:
                            raise BuildsegError(f"cannot read {src_path} at pixels x={x}, y={y} ({w}x{h}): the file is "
                                                f"damaged there ({' '.join(str(exc).split())[:160]}); re-export it") from None
                        image = _to_uint8(raw, scaling).transpose(1, 2, 0)
                        prob = segmenter.predict_proba(np.ascontiguousarray(image))[margin : margin + h, margin : margin + w]
                        mask = segmenter.finish(prob)
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
