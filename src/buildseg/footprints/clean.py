"""From raw pixel-staircase parts to clean footprints: area filter, simplification,
right-angle regularisation, repair; with the attributes GIS users expect.

* ``min_area_m2`` drops buildings smaller than this ground area (pixels x pixel area when the
  CRS is not in metres).
* ``simplify``: Douglas-Peucker tolerance in CRS units; by default one pixel, which removes the
  staircase (a footprint file is several times smaller) and moves no edge by more than a
  pixel. 0 keeps the exact pixel outlines.
* ``regularize``: right angles (and 45 degrees) with the ``buildingregulariser`` package
  (``pip install 'buildseg[footprints]'``, installed by ``make``), its simplification at the
  same tolerance (one pixel when ``simplify`` is 0).

Every footprint carries ``area_m2`` (when the CRS is in metres; else ``area`` in CRS units),
``mean_prob`` (the mean predicted probability over its pixels) and ``source`` (the scene).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from buildseg.errors import BuildsegError
from buildseg.footprints.polygons import Part
from buildseg.formats.rasters import mercator_scale


@dataclass
class FootprintOptions:
    min_area_m2: float = 0.0
    simplify: float | None = None  # CRS units; None: one pixel; 0: off
    regularize: bool = False


def _regularize(polygons: np.ndarray, crs, tolerance: float) -> np.ndarray:
    """Right-angled footprints, one per input (multi-part footprints regularised part by part)."""
    try:
        import geopandas as gpd
        from buildingregulariser import regularize_geodataframe
    except ImportError:
        raise BuildsegError("--regularize needs the buildingregulariser package: pip install 'buildseg[footprints]'") from None
    import shapely

    parts, owner = shapely.get_parts(polygons, return_index=True)

    def run(geometries) -> np.ndarray:
        frame = gpd.GeoDataFrame(geometry=list(geometries), crs=crs)
        out = regularize_geodataframe(frame, simplify=True, simplify_tolerance=tolerance,
                                      parallel_threshold=2 * tolerance, num_cores=1)
        return np.asarray(out.geometry.values, dtype=object)

    regular = run(parts)
    if len(regular) != len(parts):  # the package dropped or split a part: redo one by one, keeping the originals
        regular = np.array([(lambda r: r[0] if len(r) == 1 else p)(run([p])) for p in parts], dtype=object)
    out = np.empty(len(polygons), dtype=object)
    for k in range(len(polygons)):
        mine = regular[owner == k]
        out[k] = mine[0] if len(mine) == 1 else shapely.union_all(mine)
    return out


def clean_footprints(parts: Sequence[Part], crs, pixel_size: float, metres_per_unit: float | None,
                     options: FootprintOptions, source: str):
    """A GeoDataFrame of the footprints of ``parts`` (one scene) in ``crs``.

    ``pixel_size``: the raster's pixel size in CRS units; ``metres_per_unit``: None when the
    CRS is not in metres (areas are then in CRS units, and ``min_area_m2`` counts pixels).
    """
    import geopandas as gpd
    import shapely

    polygons = np.array([p.polygon for p in parts], dtype=object)
    mean_prob = np.array([p.mean_prob for p in parts], dtype=np.float64)
    if len(polygons) and options.min_area_m2 > 0:
        area = shapely.area(polygons)
        scale = mercator_scale(crs, shapely.get_y(shapely.centroid(polygons))) ** 2
        area_m2 = area * scale * metres_per_unit**2 if metres_per_unit else area / pixel_size**2  # pixels as a stand-in
        keep = area_m2 >= options.min_area_m2
        polygons, mean_prob = polygons[keep], mean_prob[keep]
    tolerance = pixel_size if options.simplify is None else options.simplify
    if len(polygons) and tolerance > 0 and not options.regularize:
        polygons = shapely.simplify(polygons, tolerance, preserve_topology=True)
    if len(polygons) and options.regularize:
        polygons = _regularize(polygons, crs, tolerance if tolerance > 0 else pixel_size)
    if len(polygons):
        invalid = ~shapely.is_valid(polygons)
        polygons[invalid] = shapely.make_valid(polygons[invalid])
        keep = ~shapely.is_empty(polygons)
        polygons, mean_prob = polygons[keep], mean_prob[keep]
    area = shapely.area(polygons) if len(polygons) else np.zeros(0)
    if metres_per_unit and len(polygons):  # on the ground: Web Mercator's metres shrink by cos(latitude)
        area = area * mercator_scale(crs, shapely.get_y(shapely.centroid(polygons))) ** 2
    columns = {"area_m2": np.round(area * metres_per_unit**2, 3)} if metres_per_unit else {"area": area}
    return gpd.GeoDataFrame({**columns, "mean_prob": np.round(mean_prob, 4), "source": [source] * len(polygons)},
                            geometry=list(polygons), crs=crs)
