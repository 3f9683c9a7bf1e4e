"""Polygons from building masks.

A building is an 8-connected component of the mask, the same rule the building F1 uses on
masks (``instance_metrics.label_buildings``), so a mask and its polygons score alike.
GDAL's polygoniser (``rasterio.features.shapes``) traces pixel edges, so polygons are exact
pixel staircases in map coordinates; simplification and regularisation come after.
"""

from __future__ import annotations

import numpy as np


def mask_polygons(mask: np.ndarray, transform=None) -> list:
    """Shapely polygons of the buildings of a 0/1 mask, in the coordinates of ``transform``
    (pixel coordinates when None); invalid rings (pixels touching at a corner) repaired."""
    import shapely
    from rasterio.features import shapes
    from rasterio.transform import IDENTITY
    from shapely.geometry import shape

    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    polygons = [shape(g) for g, _ in shapes(mask, mask=mask > 0, transform=transform or IDENTITY, connectivity=8)]
    return [p if p.is_valid else shapely.make_valid(p) for p in polygons]
