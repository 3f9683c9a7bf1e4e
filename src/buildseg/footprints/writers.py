"""Footprint layers and mask rasters in GIS formats, written atomically.

The format follows the file extension: ``.gpkg`` (GeoPackage, the default), ``.parquet`` /
``.geoparquet`` (GeoParquet), ``.fgb`` (FlatGeobuf), ``.geojson`` / ``.json`` (GeoJSON).
Each file is written beside its target under a temporary name and renamed into place, so a
crash never leaves a half-written layer. Masks are Cloud-Optimised GeoTIFFs (GDAL's COG
driver: tiled, deflate, nearest-neighbour overviews), which QGIS and web viewers stream.
"""

from __future__ import annotations

from pathlib import Path

from buildseg.atomic import atomic_path
from buildseg.errors import BuildsegError

DRIVERS = {".gpkg": "GPKG", ".fgb": "FlatGeobuf", ".geojson": "GeoJSON", ".json": "GeoJSON"}
PARQUET = (".parquet", ".geoparquet")
SUFFIXES = tuple(DRIVERS) + PARQUET


def check_footprint_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise BuildsegError(f"footprints {path}: unknown format {path.suffix or '(no extension)'}; "
                            f"use one of {', '.join(SUFFIXES)}")
    return path


def write_footprints(frame, path: str | Path) -> Path:
    """Write a GeoDataFrame as the format its extension names; atomic."""
    path = check_footprint_path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in PARQUET:
            frame.to_parquet(tmp)
        else:
            frame.to_file(tmp, driver=DRIVERS[path.suffix.lower()], engine="pyogrio", layer="buildings"
                          if path.suffix.lower() == ".gpkg" else None)
    return path


def to_cog(src_path: Path, dst_path: Path) -> None:
    """Copy a GeoTIFF to a Cloud-Optimised GeoTIFF (deflate, nearest overviews); atomic."""
    from rasterio.shutil import copy

    with atomic_path(dst_path) as tmp:
        copy(src_path, tmp, driver="COG", COMPRESS="DEFLATE", RESAMPLING="NEAREST", OVERVIEW_RESAMPLING="NEAREST")
