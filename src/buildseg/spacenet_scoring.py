"""SpaceNet's building F1 on SpaceNet CSVs, with the rules of SpaceNet's scorer.

* Images: every ImageId in either file. An image only in the truth counts its buildings as
  false negatives, one only in the proposals its buildings as false positives; ``POLYGON
  EMPTY`` rows list an image without adding a building.
* Minimum area (SpaceNet 2: 20 px², the default for pixel WKT): truth buildings of smaller
  area are dropped, proposals of that area *or less* are dropped, before matching.
* Matching per image at IoU >= the threshold. ``matching="spacenet"`` (the default here) is
  the scorer's own, order-dependent rule: proposals in decreasing confidence, each taking the
  remaining truth of highest IoU. ``matching="buildseg"`` is buildseg's order-free rule
  (highest IoU pair first, ``instance_metrics``). They count the same unless truth buildings
  overlap each other; see ``instance_metrics`` for why.
* Totals add TP/FP/FN over images (per AOI with ``group_by="aoi"``), then precision, recall
  and F1, as SpaceNet's per-AOI table does.

Differences from solaris' ``spacenet_buildings_2`` (which SpaceNet's later challenges used):
solaris matches at IoU strictly above the threshold (an IoU of exactly 0.5 is a miss there;
SpaceNet's own ``evalTools`` uses >=, as here), sorts equal confidences in an unspecified
order (here: file order), and does not repair invalid proposals (here ``buffer(0)``, as
``evalTools`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from buildseg.errors import BuildsegError
from buildseg.formats import spacenet
from buildseg.formats.tables import write_atomic_csv
from buildseg.instance_metrics import (
    IOU_THRESHOLD,
    InstanceCounts,
    Match,
    area_kept,
    confidence_order_match,
    greedy_match,
    polygon_pairs,
)
from buildseg.settings.evaluate import GROUPS, MATCHING

SPACENET_MIN_AREA = 20.0  # SpaceNet 2's rule, in px² (pixel WKT)
DETAILS_HEADER = ("image", "aoi", "tp", "fp", "fn", "precision", "recall", "f1")


def spacenet_ratios(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall, F1 as SpaceNet's scorer writes them per image: 0 where undefined
    (an image empty in both files scores 0, not 1)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision * recall > 0 else 0.0
    return precision, recall, f1


@dataclass
class ImageScore:
    image: str
    counts: InstanceCounts
    matches: list[Match]


def kept_by_area(image: spacenet.SpaceNetImage | None, *, min_area: float, truth: bool) -> tuple[list, list[float]]:
    """(polygons, confidences) that take part under SpaceNet's area rule (``area_kept``)."""
    if image is None or not image.polygons:
        return [], []
    keep = area_kept([g.area for g in image.polygons], min_area=min_area, truth=truth)
    return [g for g, k in zip(image.polygons, keep) if k], [c for c, k in zip(image.confidence, keep) if k]


def score_image(image: str, truth: spacenet.SpaceNetImage | None, pred: spacenet.SpaceNetImage | None, *,
                iou_threshold: float, min_area: float, matching: str) -> ImageScore:
    """One image's counts under the chosen matching rule."""
    truth_polys, _ = kept_by_area(truth, min_area=min_area, truth=True)
    pred_polys, confidence = kept_by_area(pred, min_area=min_area, truth=False)
    pairs = polygon_pairs(truth_polys, pred_polys)
    if matching == "spacenet":
        matches = confidence_order_match(pairs, confidence, iou_threshold)
    else:
        matches = greedy_match(pairs, iou_threshold)
    return ImageScore(image, InstanceCounts().add(len(truth_polys), len(pred_polys), matches), matches)


def evaluate_spacenet(pred: str | Path, truth: str | Path, *, iou_threshold: float = IOU_THRESHOLD,
                      min_area: float | None = None, matching: str | None = None, group_by: str | None = None,
                      details: str | Path | None = None) -> dict:
    """Building F1 of a SpaceNet proposal CSV against a SpaceNet truth CSV.

    JSON keys as ``evaluation.evaluate_vectors`` (``f1``, ``precision``, ``recall``, ``n_true``,
    ``n_pred``, ``n_matched``, ``mean_iou``, ``iou_threshold``) plus ``n_images``,
    ``min_area``, ``matching``, ``geometry`` and, with ``group_by``, ``groups``: group ->
    the same keys. ``details``: one row per image (DETAILS_HEADER).
    """
    matching = matching or MATCHING[0]
    if matching not in MATCHING:
        raise BuildsegError(f"--matching {matching!r}: choose one of {', '.join(MATCHING)}")
    if group_by is not None and group_by not in GROUPS:
        raise BuildsegError(f"--group-by {group_by!r}: choose one of {', '.join(GROUPS)}")
    columns = {}
    for flag, path in (("--pred", pred), ("--truth", truth)):
        if not Path(path).is_file():
            raise BuildsegError(f"{flag} {path}: file not found")
        columns[flag] = spacenet.spacenet_columns(path)
        if columns[flag] is None:
            raise BuildsegError(f"{flag} {path} is not a SpaceNet CSV: it needs the columns {spacenet.IMAGE_ID} and "
                                f"{spacenet.PIXEL_WKT} (or {spacenet.GEO_WKT}); give both files in SpaceNet's format")
    geometry = spacenet.shared_geometry(pred, truth, columns["--pred"], columns["--truth"])
    if min_area is None:
        min_area = SPACENET_MIN_AREA if geometry == spacenet.PIXEL_WKT else 0.0
    truth_images = spacenet.read_spacenet(truth, geometry)
    pred_images = spacenet.read_spacenet(pred, geometry)
    images = list(truth_images) + [k for k in pred_images if k not in truth_images]
    scores = [score_image(k, truth_images.get(k), pred_images.get(k), iou_threshold=iou_threshold,
                          min_area=min_area, matching=matching) for k in images]
    total = InstanceCounts()
    for score in scores:
        total += score.counts
    summary = {**total.summary(), "iou_threshold": iou_threshold, "n_images": len(images), "min_area": min_area,
               "matching": matching, "geometry": geometry}
    if group_by == "aoi":
        groups: dict[str, InstanceCounts] = {}
        for score in scores:
            group = groups.setdefault(spacenet.aoi_of(score.image), InstanceCounts())
            group += score.counts  # in place: the dict holds the same object
        summary["groups"] = {name: counts.summary() for name, counts in sorted(groups.items())}
    if details is not None:
        rows = []
        for score in scores:
            c = score.counts
            tp, fp, fn = c.n_matched, c.n_pred - c.n_matched, c.n_true - c.n_matched
            rows.append((score.image, spacenet.aoi_of(score.image), tp, fp, fn,
                         *(round(v, 6) for v in spacenet_ratios(tp, fp, fn))))
        write_atomic_csv(details, DETAILS_HEADER, rows)
    return summary


def group_table(groups: dict[str, dict]) -> str:
    """The per-group summary as an aligned text table."""
    width = max([len("group"), *map(len, groups)])
    lines = [f"{'group':<{width}} {'TP':>7} {'FP':>7} {'FN':>7} {'precision':>9} {'recall':>7} {'F1':>7}"]
    for name, s in groups.items():
        tp = s["n_matched"]
        lines.append(f"{name:<{width}} {tp:>7} {s['n_pred'] - tp:>7} {s['n_true'] - tp:>7} {s['precision']:>9.4f} "
                     f"{s['recall']:>7.4f} {s['f1']:>7.4f}")
    return "\n".join(lines)

