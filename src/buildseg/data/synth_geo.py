"""Synthetic GeoTIFF scenes with vector footprints, for tests and examples.

A scene from :func:`buildseg.data.synth.make_scene`, written as a GeoTIFF in a projected CRS
(UTM 33N by default) at any pixel size, optionally 16-bit (values scaled like a 12-bit
sensor) and with a nodata border; its buildings are polygonised and written as a vector file
in another CRS (EPSG:4326 by default), optionally with one invalid (bow-tie) polygon added,
as hand-digitised data often has. Exactly what the geo training path must cope with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from buildseg.data.synth import make_scene


@dataclass
class GeoScene:
    raster: Path
    labels: Path
    crs: str
    pixel: float
    mask: np.ndarray  # the building mask on the raster's grid (before the nodata border)


def write_geo_scene(raster: str | Path, labels: str | Path, size: int = 512, pixel: float = 0.5, seed: int = 0,
                    crs: str = "EPSG:32633", labels_crs: str = "EPSG:4326", sixteen_bit: bool = False,
                    nodata_border: int = 0, invalid_polygon: bool = False, origin: tuple[float, float] = (500000.0, 4100000.0),
                    bands: int = 3) -> GeoScene:
    """Write the scene GeoTIFF and its footprints; returns paths and the truth mask."""
    import geopandas as gpd
    import rasterio
    from rasterio.features import shapes
    from rasterio.transform import from_origin
    from shapely.geometry import Polygon, shape

    rng = np.random.default_rng(seed)
    image, mask = make_scene(rng, size)
    raster, labels = Path(raster), Path(labels)
    transform = from_origin(origin[0], origin[1], pixel, pixel)
    data = image.transpose(2, 0, 1).astype(np.uint16 if sixteen_bit else np.uint8)
    if bands > 3:
        extra = (data.mean(axis=0, keepdims=True)).astype(data.dtype)
        data = np.concatenate([data] + [extra] * (bands - 3))
    if sixteen_bit:
        data = data * 16 + 100  # a 12-bit-like range with an offset
    nodata = 0
    if nodata_border:
        b = nodata_border
        data[:, :b], data[:, -b:], data[:, :, :b], data[:, :, -b:] = nodata, nodata, nodata, nodata
    raster.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(raster, "w", driver="GTiff", height=size, width=size, count=data.shape[0], dtype=data.dtype,
                       crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(data)
    polygons = [shape(g) for g, _ in shapes(mask, mask=mask > 0, transform=transform, connectivity=4)]
    if invalid_polygon:  # a bow-tie inside the scene: repaired by make_valid
        x0, y0 = origin[0] + size * pixel * 0.1, origin[1] - size * pixel * 0.1
        d = 10 * pixel
        polygons.append(Polygon([(x0, y0), (x0 + d, y0 - d), (x0 + d, y0), (x0, y0 - d)]))
    frame = gpd.GeoDataFrame({"id": range(len(polygons))}, geometry=polygons, crs=crs).to_crs(labels_crs)
    labels.parent.mkdir(parents=True, exist_ok=True)
    if labels.suffix.lower() in (".parquet", ".geoparquet"):
        frame.to_parquet(labels)
    else:
        frame.to_file(labels, engine="pyogrio")
    return GeoScene(raster, labels, crs, pixel, mask)
