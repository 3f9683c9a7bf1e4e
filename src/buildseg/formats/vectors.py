"""Building footprints from vector files (GeoJSON, GeoPackage, Shapefile, GeoParquet, FlatGeobuf, ...).

Read with geopandas through pyogrio (GeoParquet through pyarrow). Only polygonal geometry is
kept; invalid polygons (self-intersections, bow-ties, as digitised by hand or exported from
OSM) are repaired with shapely's ``make_valid`` and counted, and their polygonal parts kept.
Reprojection to each scene's CRS happens in ``data/geo.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from buildseg.errors import BuildsegError

log = logging.getLogger("buildseg")

PARQUET = (".parquet", ".geoparquet")


@dataclass
class Footprints:
    """Polygons (a shapely array) in one CRS (a pyproj CRS, or None when the files have none)."""

    geometries: np.ndarray
    crs: object | None
    n_repaired: int
    sources: list[str]

    def to_crs(self, crs) -> np.ndarray:
        """The polygons in ``crs`` (unchanged when either CRS is unknown or they are equal)."""
        if crs is None or self.crs is None or len(self.geometries) == 0:
            return self.geometries
        import geopandas as gpd

        series = gpd.GeoSeries(self.geometries, crs=self.crs)
        if series.crs == crs:
            return self.geometries
        return np.asarray(series.to_crs(crs).values, dtype=object)


def read_vector(path: str | Path, *, flag: str, layer: str | None = None, layer_flag: str = "--layer"):
    """A vector file (any format GDAL reads, or GeoParquet) as a GeoDataFrame; a missing or
    unreadable file is one line naming ``flag`` (``--labels``, ``--existing``, ``--aoi``)."""
    try:
        import geopandas as gpd
    except ImportError:
        raise BuildsegError(f"{flag} needs the geo extra: pip install 'buildseg[geo]'") from None
    path = Path(path)
    if not path.exists():
        raise BuildsegError(f"{flag} {path} not found" if flag.startswith("--") else f"{flag} file not found: {path}")
    try:
        if path.suffix.lower() in PARQUET:
            return gpd.read_parquet(path)
        return gpd.read_file(path, layer=layer, engine="pyogrio")
    except Exception as exc:  # pyogrio/pyarrow raise many types; all mean "cannot read this file"
        detail = " ".join(str(exc).split())[:200]
        hint = f" (is {layer_flag} {layer!r} a layer of it?)" if layer else ""
        raise BuildsegError(f"{flag} {path}: cannot read it as a vector layer ({detail}){hint}") from None


def read_area(path: str | Path, *, flag: str, what: str, layer: str | None = None, allow_empty: bool = False):
    """The polygons of a vector file in their own CRS, repaired (a GeoDataFrame of geometry):
    an area to map or buildings already mapped. No CRS, or no polygon (unless
    ``allow_empty``), is one line."""
    frame = read_vector(path, flag=flag, layer=layer, layer_flag=f"{flag}-layer")
    if frame.crs is None:
        raise BuildsegError(f"{flag} {path} has no CRS: set one (e.g. ogr2ogr -a_srs EPSG:4326)")
    check_coordinates(frame, path=path, flag=flag)
    present = frame[frame.geometry.notna() & ~frame.geometry.is_empty]
    frame = present[present.geom_type.isin(["Polygon", "MultiPolygon"])]
    if frame.empty and not (allow_empty and present.empty):  # an empty file may mean "nothing mapped"; lines never do
        kinds = ", ".join(sorted(set(present.geom_type))) or "no geometries"
        raise BuildsegError(f"{flag} {path} holds no polygon (found {kinds}): give {what} as one or more polygons")
    frame = frame.set_geometry(frame.geometry.make_valid())
    return frame[["geometry"]].reset_index(drop=True)


def check_coordinates(frame, *, path: str | Path, flag: str) -> None:
    """Coordinates that cannot be in the file's geographic CRS (a GeoJSON holds EPSG:4326 unless
    it says otherwise, so projected metres without a ``crs`` member arrive as "degrees") are one
    line asking for the CRS, not a math error deep in a zoom or reprojection."""
    if frame.empty or not frame.crs.is_geographic:
        return
    x0, y0, x1, y1 = (float(v) for v in frame.total_bounds)
    if not all(np.isfinite([x0, y0, x1, y1])) or x0 < -180.5 or x1 > 360.5 or y0 < -90.5 or y1 > 90.5:
        raise BuildsegError(f"{flag} {path}: the coordinates are not longitude/latitude (x {x0:.6g} to {x1:.6g}, y "
                            f"{y0:.6g} to {y1:.6g}) but the file's CRS is {frame.crs.to_string()}: declare the CRS the "
                            "coordinates are in (e.g. ogr2ogr -a_srs EPSG:32633 fixed.gpkg in.geojson)")


def _polygonal(geometries: np.ndarray) -> np.ndarray:
    """Only the polygonal parts: Polygons and MultiPolygons, collections reduced to theirs."""
    import shapely

    out = []
    for geometry in geometries:
        if geometry is None or geometry.is_empty:
            continue
        kind = geometry.geom_type
        if kind in ("Polygon", "MultiPolygon"):
            out.append(geometry)
        elif kind == "GeometryCollection":
            parts = [g for g in shapely.get_parts(geometry) if g.geom_type in ("Polygon", "MultiPolygon")]
            if parts:
                out.append(shapely.union_all(parts))
    return np.asarray(out, dtype=object)


def read_footprints(paths: Sequence[str | Path], layer: str | None = None, allow_empty: bool = False) -> Footprints:
    """All polygons of ``paths``, in the CRS of the first file (the others reprojected to it).

    A file without polygons is an error for labels; ``allow_empty`` accepts it (a prediction
    of an area without buildings)."""
    import shapely

    if not paths:
        raise BuildsegError("no labels given: --labels needs at least one vector file")
    parts, crs, repaired = [], None, 0
    for raw in paths:
        path = Path(raw)
        frame = read_vector(path, flag="labels", layer=layer, layer_flag="--labels-layer")
        if frame.crs is not None:
            check_coordinates(frame, path=path, flag="--labels")
        if crs is None:
            crs = frame.crs
        elif frame.crs is not None and frame.crs != crs:
            frame = frame.to_crs(crs)
        geometries = np.asarray(frame.geometry.values, dtype=object)
        present = np.array([g is not None for g in geometries], dtype=bool)
        invalid = present.copy()
        invalid[present] = ~shapely.is_valid(geometries[present])
        if invalid.any():
            geometries = geometries.copy()
            geometries[invalid] = shapely.make_valid(geometries[invalid])
            repaired += int(invalid.sum())
        polygons = _polygonal(geometries)
        if len(polygons) == 0 and not (allow_empty and len(frame) == 0):
            kinds = sorted({g.geom_type for g in geometries if g is not None})
            raise BuildsegError(f"labels {path} has no polygons (found {', '.join(kinds) or 'no geometries'}); "
                                "footprints must be Polygon or MultiPolygon features")
        parts.append(polygons)
    geometries = np.concatenate(parts)
    log.info("labels: %d footprints from %d file(s)%s", len(geometries), len(paths),
             f", {repaired} invalid geometries repaired (make_valid)" if repaired else "")
    return Footprints(geometries, crs, repaired, [str(p) for p in paths])
