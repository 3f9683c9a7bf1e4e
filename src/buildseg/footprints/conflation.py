"""Conflation: predicted footprints against buildings already mapped (an OpenStreetMap extract,
a cadastre), so mappers get only what is new.

The rule, in the predicted layer's CRS (the existing layer is reprojected to it):

* a predicted footprint P is **mapped** when some existing building E has
  ``IoU(P, E) >= match_iou`` (the same building), or when existing buildings cover at least
  ``match_overlap`` of P's area (one predicted blob over several mapped houses, or a mapped
  outline drawn a little larger); otherwise P is **new**;
* an existing building E is **unconfirmed** when no prediction has ``IoU(P, E) >= match_iou``
  and predictions cover less than ``match_overlap`` of E's area: a possible demolition, or
  imagery older than the map.

``docs/prediction.md`` draws the rule. Areas are planar in the predicted layer's CRS (a
scene's UTM zone, or pixels); only ratios of areas enter the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

EDITOR_CRS = "EPSG:4326"


@dataclass(frozen=True)
class ConflationRule:
    """The thresholds (their defaults: ``--match-iou`` and ``--match-overlap``, settings/predict.py)."""

    match_iou: float
    match_overlap: float


@dataclass
class Conflated:
    predicted: object  # GeoDataFrame: the predicted footprints with status, best_iou, covered
    unconfirmed: object  # GeoDataFrame: existing buildings no prediction supports

    def counts(self) -> dict[str, int]:
        status = self.predicted["status"] if len(self.predicted) else []
        return {"new": int(np.sum(np.asarray(status) == "new")), "mapped": int(np.sum(np.asarray(status) == "mapped")),
                "unconfirmed": len(self.unconfirmed)}


def read_existing(path: str | Path, layer: str | None = None):
    """The mapped buildings: polygons of any vector file GDAL reads, in their own CRS."""
    from buildseg.formats.vectors import read_area

    return read_area(path, flag="--existing", what="the mapped buildings", layer=layer, allow_empty=True)


def conflate(predicted, existing, rule: ConflationRule) -> Conflated:
    """``predicted`` with ``status`` (new | mapped), ``best_iou`` and ``covered`` (the share of
    its area under existing buildings), and the existing buildings nothing predicted supports."""
    if existing.crs is not None and predicted.crs is not None and existing.crs != predicted.crs:
        existing = existing.to_crs(predicted.crs)
    pred_geoms = np.asarray(predicted.geometry.values, dtype=object)
    exist_geoms = np.asarray(existing.geometry.values, dtype=object)
    pred_iou, pred_cover = _best_iou_and_cover(pred_geoms, exist_geoms)
    exist_iou, exist_cover = _best_iou_and_cover(exist_geoms, pred_geoms)
    mapped = (pred_iou >= rule.match_iou) | (pred_cover >= rule.match_overlap)
    out = predicted.copy()
    out["status"] = np.where(mapped, "mapped", "new")
    out["best_iou"], out["covered"] = np.round(pred_iou, 4), np.round(pred_cover, 4)
    unsupported = (exist_iou < rule.match_iou) & (exist_cover < rule.match_overlap)
    unconfirmed = existing[unsupported].copy()
    unconfirmed["status"] = "unconfirmed"
    unconfirmed["best_iou"], unconfirmed["covered"] = np.round(exist_iou[unsupported], 4), np.round(exist_cover[unsupported], 4)
    return Conflated(out, unconfirmed.reset_index(drop=True))


def _best_iou_and_cover(these: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each geometry of ``these``: its best IoU with one of ``others``, and the share of its
    area covered by the union of the ``others`` it touches."""
    import shapely

    best = np.zeros(len(these))
    cover = np.zeros(len(these))
    if not len(these) or not len(others):
        return best, cover
    tree = shapely.STRtree(others)
    left, right = tree.query(these, predicate="intersects")
    if not len(left):
        return best, cover
    inter = shapely.area(shapely.intersection(these[left], others[right]))
    union = shapely.area(these[left]) + shapely.area(others[right]) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    np.maximum.at(best, left, iou)
    for k in np.unique(left):
        touching = others[right[left == k]]
        area = shapely.area(these[k])
        if area > 0:
            cover[k] = shapely.area(shapely.intersection(these[k], shapely.union_all(touching))) / area
    return best, cover


def editor_frame(frame):
    """Footprints for mapping editors (JOSM, iD via plugins, QGIS): EPSG:4326, ``building=yes``
    and the mean probability as ``confidence``."""
    import geopandas as gpd

    out = gpd.GeoDataFrame({"building": ["yes"] * len(frame),
                            "confidence": np.round(np.asarray(frame["mean_prob"] if "mean_prob" in frame else
                                                              np.full(len(frame), np.nan), dtype=float), 3)},
                           geometry=frame.geometry.values, crs=frame.crs)
    if "status" in frame:
        out["status"] = frame["status"].values
    return out.to_crs(EDITOR_CRS) if out.crs is not None else out
