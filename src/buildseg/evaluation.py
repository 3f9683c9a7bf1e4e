"""Scoring predictions against truth: the competition Dice (pixels) and building-level F1.

* CSV against CSV (``evaluate_csv``): per-image pixel counts for the competition Dice, and
  per-image connected components for the building F1 (``instance_metrics``).
* Footprints against footprints (``evaluate_vectors``): any file geopandas reads, or a mask
  GeoTIFF (its buildings polygonised), reprojected to the truth's CRS; building F1 only.

JSON keys: ``dice``, ``n_scored``, ``iou``, ``micro_iou``, ``empty_fp_rate``, ``pixel_precision``,
``pixel_recall`` (pixels) and ``f1``, ``precision``, ``recall``, ``n_true``, ``n_pred``,
``n_matched``, ``mean_iou``, ``iou_threshold`` (buildings).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from buildseg.errors import BuildsegError, RleError
from buildseg.formats import rle
from buildseg.formats.images import image_size
from buildseg.formats.tables import load_records, read_csv_rows, read_rle_table, write_atomic_csv
from buildseg.instance_metrics import IOU_THRESHOLD, InstanceCounts, Match, kept_polygons, match_masks, match_polygons
from buildseg.metrics import image_counts, summarize

log = logging.getLogger("buildseg")


def truth_masks(truth_csv: str | Path, shape: tuple[int, int] | None = None) -> dict[str, tuple[str, tuple[int, int]]]:
    """img_id -> (rle, (H, W)). A dataset CSV (with img_path) takes sizes from the images;
    a bare ``img_id,mask_rle`` CSV uses ``shape`` (default 224x224, the test tiles)."""
    truth_csv = Path(truth_csv)
    if not truth_csv.is_file():
        raise BuildsegError(f"truth CSV not found: {truth_csv} (give img_id,mask_rle or a dataset CSV with img_path)")
    columns, _ = read_csv_rows(truth_csv)
    if "img_path" in columns:
        records = load_records(truth_csv, require_masks=True)
        return {r.img_id: (r.rle or rle.EMPTY, shape or image_size(r.image_path)) for r in records}
    table = read_rle_table(truth_csv)
    size = shape or (224, 224)
    return {k: (v, size) for k, v in table.items()}


DETAILS_HEADER = ("image", "side", "building", "area", "matched_building", "iou")


def _detail_rows(image: str, areas_true: np.ndarray, areas_pred: np.ndarray, matches: list[Match]) -> list[tuple]:
    """One row per building: its side, index, area, partner and IoU (empty when unmatched)."""
    by_true = {m.truth: m for m in matches}
    by_pred = {m.pred: m for m in matches}
    rows = []
    for side, areas, lookup, partner in (("truth", areas_true, by_true, "pred"), ("pred", areas_pred, by_pred, "truth")):
        for k, area in enumerate(areas):
            m = lookup.get(k)
            rows.append((image, side, k, round(float(area), 3), "" if m is None else getattr(m, partner),
                         "" if m is None else round(m.iou, 4)))
    return rows


def _pixel_keys(summary: dict) -> dict:
    """Pixel precision/recall renamed: ``precision``/``recall`` are the building-level ones."""
    summary = dict(summary)
    summary["pixel_precision"] = summary.pop("precision")
    summary["pixel_recall"] = summary.pop("recall")
    return summary


def evaluate_csv(pred_csv: str | Path, truth_csv: str | Path, shape: tuple[int, int] | None = None,
                 iou_threshold: float = IOU_THRESHOLD, details: str | Path | None = None, min_area: float = 0) -> dict:
    """Competition Dice and building F1 per image; every truth id must have a prediction.
    ``min_area`` (pixels) applies SpaceNet's area rule to the buildings, not to the Dice."""
    truth = truth_masks(truth_csv, shape)
    pred = read_rle_table(pred_csv)
    missing = [k for k in truth if k not in pred]
    if missing:
        raise BuildsegError(f"{pred_csv} has no row for {len(missing)} of {len(truth)} truth images (e.g. {missing[0]})")
    extra = len(set(pred) - set(truth))
    if extra:
        log.warning("%s has %d ids that are not in the truth; ignored", pred_csv, extra)
    counts = np.zeros((len(truth), 3), dtype=np.int64)
    buildings, rows = InstanceCounts(), []
    for i, (img_id, (truth_rle, size)) in enumerate(truth.items()):
        try:
            g = rle.decode(truth_rle, size, img_id=img_id)
        except RleError as exc:
            raise BuildsegError(f"{truth_csv}: {exc}") from None
        try:
            p = rle.decode(pred[img_id], size, img_id=img_id)
        except RleError as exc:
            raise BuildsegError(f"{pred_csv}: {exc}") from None
        counts[i] = image_counts(p, g)
        result = match_masks(p, g, iou_threshold, min_area)
        buildings += result.counts
        if details is not None:
            rows += _detail_rows(img_id, np.bincount(result.truth_labels.ravel())[1:],
                                 np.bincount(result.pred_labels.ravel())[1:], result.matches)
    if details is not None:
        write_atomic_csv(details, DETAILS_HEADER, rows)
    return {**_pixel_keys(summarize(counts)), **buildings.summary(), "iou_threshold": iou_threshold}


VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet", ".geoparquet", ".gml", ".kml")
RASTER_SUFFIXES = (".tif", ".tiff")


def is_footprint_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VECTOR_SUFFIXES + RASTER_SUFFIXES


def footprints_of(path: str | Path, crs=None):
    """(polygons, crs) of a vector file, or of a mask GeoTIFF's buildings (8-connected
    components polygonised); reprojected to ``crs`` when given."""
    from buildseg.formats.vectors import read_footprints

    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        from buildseg.footprints.polygons import mask_polygons
        from buildseg.formats.rasters import open_raster

        with open_raster(path) as src:
            mask = src.read(1) > 0
            polygons, source_crs = mask_polygons(mask.astype(np.uint8), src.transform), src.crs
        if crs is not None and source_crs is not None and source_crs != crs and polygons:
            import geopandas as gpd

            polygons = list(gpd.GeoSeries(polygons, crs=source_crs).to_crs(crs).values)
        return np.asarray(polygons, dtype=object), crs or source_crs
    footprints = read_footprints([path], allow_empty=True)
    return footprints.to_crs(crs), crs or footprints.crs


def evaluate_vectors(pred: str | Path, truth: str | Path, iou_threshold: float = IOU_THRESHOLD,
                     details: str | Path | None = None, min_area: float = 0) -> dict:
    """Building F1 of predicted footprints against truth footprints, in the truth's CRS;
    ``min_area`` (the truth CRS's square units) applies SpaceNet's area rule first."""
    truth_polys, crs = footprints_of(truth)
    pred_polys, _ = footprints_of(pred, crs)
    truth_polys = kept_polygons(truth_polys, min_area=min_area, truth=True)
    pred_polys = kept_polygons(pred_polys, min_area=min_area, truth=False)
    counts, matches = match_polygons(pred_polys, truth_polys, iou_threshold)
    if details is not None:
        areas = (np.array([g.area for g in truth_polys]), np.array([g.area for g in pred_polys]))
        write_atomic_csv(details, DETAILS_HEADER, _detail_rows(Path(pred).name, *areas, matches))
    return {**counts.summary(), "iou_threshold": iou_threshold}


def evaluate(settings) -> dict:
    """``buildseg evaluate``: score ``settings.pred`` against ``settings.truth`` (an
    :class:`~buildseg.settings.evaluate.EvaluateSettings`), whichever pair of formats they are:
    SpaceNet CSVs (the SpaceNet scorer's rules), footprints (vector files or mask GeoTIFFs), or
    competition CSVs. Mixed pairs are one line naming both files."""
    from buildseg.formats.spacenet import spacenet_columns

    pred, truth = settings.pred, settings.truth
    spacenet = [spacenet_columns(pred) is not None, spacenet_columns(truth) is not None]
    if any(spacenet) and not all(spacenet):
        one, other = (("--pred", pred), ("--truth", truth)) if spacenet[0] else (("--truth", truth), ("--pred", pred))
        raise BuildsegError(f"{one[0]} {one[1]} is a SpaceNet CSV but {other[0]} {other[1]} is not: give both in "
                            "SpaceNet's format (ImageId, BuildingId, PolygonWKT_Pix[, Confidence])")
    if not all(spacenet) and (settings.matching or settings.group_by):
        flag = "--matching" if settings.matching else "--group-by"
        raise BuildsegError(f"{flag} applies to SpaceNet CSVs (ImageId, PolygonWKT_Pix); --pred {pred} is not one")
    vectors = [is_footprint_file(pred), is_footprint_file(truth)]
    if any(vectors) and not all(vectors):
        raise BuildsegError(f"--pred {pred} and --truth {truth} must both be CSVs or both footprints "
                            "(vector files or mask GeoTIFFs)")
    if all(spacenet):
        from buildseg.spacenet_scoring import evaluate_spacenet

        return evaluate_spacenet(pred, truth, iou_threshold=settings.iou, min_area=settings.min_area,
                                 matching=settings.matching, group_by=settings.group_by, details=settings.details)
    if all(vectors):
        return evaluate_vectors(pred, truth, settings.iou, settings.details, min_area=settings.min_area or 0)
    return evaluate_csv(pred, truth, settings.shape, settings.iou, settings.details, min_area=settings.min_area or 0)


def summary_lines(summary: dict, settings) -> list[str]:
    """What ``buildseg evaluate`` prints of a summary."""
    lines = []
    if "groups" in summary:
        from buildseg.spacenet_scoring import group_table

        lines.append(group_table(summary["groups"]))
    if "matching" in summary:
        lines.append(f"SpaceNet CSVs: {summary['n_images']} images, {summary['geometry']}, min area "
                     f"{summary['min_area']:g}, {summary['matching']} matching")
    if "dice" in summary:
        lines.append(f"competition Dice {summary['dice']:.4f} over {summary['n_scored']} of {summary['n']} images "
                     f"(both-empty dropped); IoU {summary['iou']:.4f}, pixel precision {summary['pixel_precision']:.4f}, "
                     f"pixel recall {summary['pixel_recall']:.4f}, empty-tile FP rate {summary['empty_fp_rate']:.3f}")
    lines.append(f"buildings (IoU >= {settings.iou:g}): F1 {summary['f1']:.4f}, precision {summary['precision']:.4f}, "
                 f"recall {summary['recall']:.4f}; {summary['n_matched']} matched of {summary['n_true']} true and "
                 f"{summary['n_pred']} predicted, mean IoU of matches {summary['mean_iou']:.3f}")
    if settings.details:
        lines.append(f"{'per-image' if 'matching' in summary else 'per-building'} table: {settings.details}")
    return lines
