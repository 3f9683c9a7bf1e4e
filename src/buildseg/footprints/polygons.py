"""Polygons from building masks, block by block, with buildings cut by block borders joined.

A building is an 8-connected component of the mask, the same rule the building F1 uses on
masks (``formats.components.label_buildings``), so a mask and its polygons score alike.
GDAL's polygoniser (``rasterio.features.shapes``) traces pixel edges, so polygons are exact
pixel staircases in map coordinates; simplification and regularisation come after
(``footprints/clean.py``).

Large rasters are predicted in blocks. Each block's components become :class:`Part`\\ s that
carry their probability sum and pixel count; parts touching the block's border are kept
aside and, at the end, parts that touch each other across a border are unioned into one
building (:func:`join_border_parts`), so a building cut by a block border comes out as one
footprint with its mean probability over all its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from buildseg.formats.components import label_buildings


@dataclass
class Part:
    """A building (or a piece of one cut by a block border)."""

    polygon: object  # shapely Polygon / MultiPolygon in map coordinates
    prob_sum: float  # sum of the predicted probability over its pixels
    pixels: int

    @property
    def mean_prob(self) -> float:
        return self.prob_sum / self.pixels if self.pixels else float("nan")


def _valid(polygon):
    import shapely

    return polygon if polygon.is_valid else shapely.make_valid(polygon)


def mask_polygons(mask: np.ndarray, transform=None) -> list:
    """Shapely polygons of the buildings of a 0/1 mask, in the coordinates of ``transform``
    (pixel coordinates when None); invalid rings (pixels touching at a corner) repaired."""
    return [p.polygon for p in mask_parts(mask, None, transform)]


def mask_parts(mask: np.ndarray, prob: np.ndarray | None, transform=None,
               labelled: tuple[np.ndarray, int] | None = None) -> list[Part]:
    """One :class:`Part` per 8-connected component of ``mask`` (probabilities from ``prob``),
    in label order; ``labelled`` passes :func:`label_buildings`' result when the caller has it."""
    from rasterio.features import shapes
    from rasterio.transform import IDENTITY
    from scipy import ndimage
    from shapely.geometry import shape
    from shapely.ops import unary_union

    labels, count = labelled if labelled is not None else label_buildings(mask)
    if count == 0:
        return []
    labels = labels.astype(np.int32)
    index = np.arange(1, count + 1)
    pixels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    sums = ndimage.sum(prob, labels, index) if prob is not None else pixels.astype(np.float64)
    pieces: dict[int, list] = {}
    for geometry, value in shapes(labels, mask=labels > 0, transform=transform or IDENTITY, connectivity=8):
        pieces.setdefault(int(value), []).append(shape(geometry))
    parts = []
    for k in index:
        polys = pieces[int(k)]
        polygon = polys[0] if len(polys) == 1 else unary_union(polys)
        parts.append(Part(_valid(polygon), float(sums[k - 1]), int(pixels[k - 1])))
    return parts


def block_parts(mask: np.ndarray, prob: np.ndarray, transform) -> tuple[list[Part], list[Part]]:
    """(inner, border) parts of one block: border parts touch the block's edge."""
    inner, border = [], []
    if not mask.any():
        return inner, border
    labels, count = label_buildings(mask)
    edge = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    for k, part in enumerate(mask_parts(mask, prob, transform, (labels, count)), start=1):
        (border if k in edge else inner).append(part)
    return inner, border


def join_border_parts(parts: list[Part]) -> list[Part]:
    """Union the parts that touch (share an edge or a corner) into one building each."""
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not parts:
        return []
    geoms = np.array([p.polygon for p in parts], dtype=object)
    tree = shapely.STRtree(geoms)
    a, b = tree.query(geoms, predicate="intersects")
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(parts), len(parts)))
    n, group = connected_components(graph, directed=False)
    joined = []
    for g in range(n):
        members = [parts[i] for i in np.nonzero(group == g)[0]]
        polygon = members[0].polygon if len(members) == 1 else _valid(shapely.union_all([m.polygon for m in members]))
        joined.append(Part(polygon, sum(m.prob_sum for m in members), sum(m.pixels for m in members)))
    return joined
