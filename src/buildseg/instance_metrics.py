"""Building-level scores: footprints matched one-to-one at IoU >= 0.5, as SpaceNet scores them.

A *building* is a connected component of a mask (8-connected, like the polygons
``rasterio.features.shapes`` draws) or a polygon of a vector file. Matching rule: every
(truth, prediction) pair with IoU >= ``threshold`` is a candidate; candidates are taken in
order of decreasing IoU (ties: lower truth index, then lower prediction index), and a pair
is matched when neither side is matched yet. The result does not depend on file order
(solaris' evaluator walks the proposals in file order, so reordering a file can change its
score). At thresholds >= 0.5 this greedy matching is also a maximum matching whenever the
buildings of each side do not overlap each other: a building then has at most one partner
above the threshold.

Then true positives are matched pairs, false positives unmatched predictions, false negatives
unmatched truths; precision, recall and F1 follow, and ``mean_iou`` is the mean IoU of the
matched pairs. Counts add up over images and scenes (:class:`InstanceCounts`).

SpaceNet's scorer matches differently (:func:`confidence_order_match`): it walks the
proposals in decreasing confidence and gives each the remaining truth of highest IoU. When
the truth buildings do not overlap each other, a proposal has at most one truth at IoU >= 0.5,
so both rules count the same TP/FP/FN and differ only in *which* of two overlapping proposals
is the match; with overlapping truths the counts can differ too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from buildseg.formats.components import label_buildings

IOU_THRESHOLD = 0.5


@dataclass
class Match:
    truth: int  # index of the truth building
    pred: int  # index of the predicted building
    iou: float


def greedy_match(pairs: Sequence[tuple[int, int, float]], threshold: float = IOU_THRESHOLD) -> list[Match]:
    """One-to-one matches from candidate (truth, pred, iou) pairs, highest IoU first."""
    ordered = sorted((p for p in pairs if p[2] >= threshold), key=lambda p: (-p[2], p[0], p[1]))
    used_t, used_p, matches = set(), set(), []
    for t, p, iou in ordered:
        if t not in used_t and p not in used_p:
            used_t.add(t)
            used_p.add(p)
            matches.append(Match(int(t), int(p), float(iou)))
    return matches


def confidence_order_match(pairs: Sequence[tuple[int, int, float]], confidence: Sequence[float],
                           threshold: float = IOU_THRESHOLD) -> list[Match]:
    """SpaceNet's rule: proposals in decreasing ``confidence`` (ties: file order), each matched
    to the not yet matched truth of highest IoU (ties: lower truth index) when that IoU is
    >= ``threshold``; a proposal whose best remaining truth is below it is a false positive."""
    by_pred: dict[int, list[tuple[int, float]]] = {}
    for t, p, iou in pairs:
        by_pred.setdefault(int(p), []).append((int(t), float(iou)))
    order = sorted(range(len(confidence)), key=lambda p: (-float(confidence[p]), p))
    used_t: set[int] = set()
    matches = []
    for p in order:
        remaining = [(t, iou) for t, iou in by_pred.get(p, ()) if t not in used_t]
        if not remaining:
            continue
        t, iou = min(remaining, key=lambda c: (-c[1], c[0]))
        if iou >= threshold:
            used_t.add(t)
            matches.append(Match(t, p, iou))
    return matches


@dataclass
class InstanceCounts:
    """Building counts that add up across images/scenes."""

    n_true: int = 0
    n_pred: int = 0
    n_matched: int = 0
    iou_sum: float = 0.0

    def add(self, n_true: int, n_pred: int, matches: Sequence[Match]) -> "InstanceCounts":
        self.n_true += n_true
        self.n_pred += n_pred
        self.n_matched += len(matches)
        self.iou_sum += sum(m.iou for m in matches)
        return self

    def __iadd__(self, other: "InstanceCounts") -> "InstanceCounts":
        self.n_true += other.n_true
        self.n_pred += other.n_pred
        self.n_matched += other.n_matched
        self.iou_sum += other.iou_sum
        return self

    def summary(self) -> dict[str, float | int]:
        """precision, recall, f1 (1.0 when both sides are empty: nothing to find, nothing wrong), mean_iou."""
        tp, fp, fn = self.n_matched, self.n_pred - self.n_matched, self.n_true - self.n_matched
        precision = tp / (tp + fp) if tp + fp else (1.0 if self.n_true == 0 else 0.0)
        recall = tp / (tp + fn) if tp + fn else (1.0 if self.n_pred == 0 else 0.0)
        f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
        return {"f1": f1, "precision": precision, "recall": recall, "n_true": self.n_true, "n_pred": self.n_pred,
                "n_matched": tp, "mean_iou": self.iou_sum / tp if tp else float("nan")}


# -- masks ---------------------------------------------------------------------------------
def mask_pairs(truth_labels: np.ndarray, n_true: int, pred_labels: np.ndarray, n_pred: int) -> list[tuple[int, int, float]]:
    """(truth, pred, iou) for every overlapping pair of components (0-based indices), from one
    joint histogram of the two label images."""
    if n_true == 0 or n_pred == 0:
        return []
    t, p = truth_labels.ravel().astype(np.int64), pred_labels.ravel().astype(np.int64)
    both = (t > 0) & (p > 0)
    joint = np.bincount(t[both] * (n_pred + 1) + p[both], minlength=(n_true + 1) * (n_pred + 1))
    joint = joint.reshape(n_true + 1, n_pred + 1)
    area_t = np.bincount(t, minlength=n_true + 1)
    area_p = np.bincount(p, minlength=n_pred + 1)
    ti, pi = np.nonzero(joint)
    inter = joint[ti, pi]
    iou = inter / (area_t[ti] + area_p[pi] - inter)
    return [(int(a) - 1, int(b) - 1, float(c)) for a, b, c in zip(ti, pi, iou)]


@dataclass
class MaskResult:
    counts: InstanceCounts
    matches: list[Match] = field(default_factory=list)
    truth_labels: np.ndarray | None = None
    pred_labels: np.ndarray | None = None


def area_kept(area: np.ndarray, *, min_area: float, truth: bool) -> np.ndarray:
    """SpaceNet's area rule, the one place it is written: truth buildings of area >= min_area
    take part, predicted ones of area > min_area; nothing of zero area does."""
    area = np.asarray(area, dtype=np.float64)
    return (area > 0) & (area >= min_area if truth else area > min_area)


def drop_small(labels: np.ndarray, count: int, *, min_area: float, truth: bool) -> tuple[np.ndarray, int]:
    """Labels without the buildings SpaceNet's area rule drops (truth: area < min_area;
    predictions: area <= min_area), relabelled 1..kept in the old order."""
    if min_area <= 0 or count == 0:
        return labels, count
    keep = area_kept(np.bincount(labels.ravel(), minlength=count + 1)[1:], min_area=min_area, truth=truth)
    new_label = np.zeros(count + 1, dtype=labels.dtype)
    new_label[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return new_label[labels], int(keep.sum())


def match_masks(pred: np.ndarray, truth: np.ndarray, threshold: float = IOU_THRESHOLD, min_area: float = 0) -> MaskResult:
    """Building matching of one predicted mask against its truth mask; ``min_area`` drops
    small buildings first as SpaceNet does (:func:`drop_small`)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    t_labels, n_t = drop_small(*label_buildings(truth), min_area=min_area, truth=True)
    p_labels, n_p = drop_small(*label_buildings(pred), min_area=min_area, truth=False)
    matches = greedy_match(mask_pairs(t_labels, n_t, p_labels, n_p), threshold)
    return MaskResult(InstanceCounts().add(n_t, n_p, matches), matches, t_labels, p_labels)


# -- polygons ------------------------------------------------------------------------------
def polygon_pairs(truth: Sequence, pred: Sequence) -> list[tuple[int, int, float]]:
    """(truth, pred, iou) for every intersecting pair, candidates from a shapely STRtree."""
    import shapely

    truth, pred = np.asarray(truth, dtype=object), np.asarray(pred, dtype=object)
    if len(truth) == 0 or len(pred) == 0:
        return []
    tree = shapely.STRtree(pred)
    t_idx, p_idx = tree.query(truth, predicate="intersects")
    inter = shapely.area(shapely.intersection(truth[t_idx], pred[p_idx]))
    union = shapely.area(truth[t_idx]) + shapely.area(pred[p_idx]) - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return [(int(a), int(b), float(c)) for a, b, c in zip(t_idx, p_idx, iou) if c > 0]


def match_polygons(pred: Sequence, truth: Sequence, threshold: float = IOU_THRESHOLD) -> tuple[InstanceCounts, list[Match]]:
    """Building matching of predicted polygons against truth polygons (one CRS); filter them
    with :func:`kept_polygons` first for SpaceNet's area rule."""
    matches = greedy_match(polygon_pairs(truth, pred), threshold)
    return InstanceCounts().add(len(truth), len(pred), matches), matches


def kept_polygons(polygons: Sequence, *, min_area: float, truth: bool) -> np.ndarray:
    """The polygons SpaceNet's area rule keeps: truth of area >= min_area, predictions of
    area > min_area (no filter at 0)."""
    polygons = np.asarray(polygons, dtype=object)
    if min_area <= 0 or len(polygons) == 0:
        return polygons
    import shapely

    return polygons[area_kept(shapely.area(polygons), min_area=min_area, truth=truth)]
