"""Building-level F1 (instance_metrics.py): a hand-checked scene, and random cases against an
independent brute-force maximum matching (every assignment enumerated)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from shapely.geometry import box

from buildseg.instance_metrics import InstanceCounts, greedy_match, match_masks, match_polygons, polygon_pairs


def rect(mask, y0, x0, y1, x1):
    mask[y0:y1, x0:x1] = 1


def test_hand_checked_case():
    """Two touching truths; one split prediction, one merged prediction, a sliver, an empty image."""
    truth = np.zeros((64, 64), np.uint8)
    rect(truth, 2, 2, 12, 12)  # A
    rect(truth, 2, 12, 12, 22)  # B touches A: 8-connected, they are ONE component in a mask
    rect(truth, 30, 30, 50, 50)  # C: predicted split in two halves (each IoU 0.5 -> exactly at threshold)
    rect(truth, 40, 2, 50, 12)  # D: predicted well
    pred = np.zeros_like(truth)
    rect(pred, 2, 2, 12, 22)  # AB merged: equals the single AB component
    rect(pred, 30, 30, 50, 40)  # left half of C: IoU 200/400 = 0.5
    rect(pred, 30, 41, 50, 50)  # right part of C: 180/400 = 0.45
    rect(pred, 41, 2, 50, 12)  # D: IoU 90/100
    rect(pred, 60, 60, 61, 64)  # a sliver: false positive
    result = match_masks(pred, truth)
    s = result.counts.summary()
    assert (s["n_true"], s["n_pred"], s["n_matched"]) == (3, 5, 3)
    assert s["precision"] == pytest.approx(3 / 5) and s["recall"] == 1.0 and s["f1"] == pytest.approx(6 / 8)
    assert s["mean_iou"] == pytest.approx((1.0 + 0.5 + 0.9) / 3)
    # as polygons, the touching truths are two buildings: the merged prediction matches neither well
    truth_polys = [box(2, 2, 12, 12), box(12, 2, 22, 12)]
    counts, matches = match_polygons([box(2, 2, 22, 12)], truth_polys)
    assert counts.n_matched == 1 and matches[0].iou == pytest.approx(0.5)  # ties: lower truth index wins
    counts, _ = match_polygons([box(2, 2, 22, 12)], truth_polys, threshold=0.51)
    assert counts.summary()["f1"] == 0.0
    # an empty image: nothing to find, nothing found
    empty = InstanceCounts().add(0, 0, []).summary()
    assert empty["f1"] == 1.0 and empty["precision"] == 1.0 and empty["recall"] == 1.0


def test_matching_does_not_depend_on_file_order():
    rng = np.random.default_rng(0)
    truth = [box(x, y, x + 10, y + 10) for x, y in rng.uniform(0, 100, (30, 2))]
    pred = [g.buffer(rng.uniform(-2, 2)) for g in truth[:25]] + [box(200, 200, 205, 205)]
    a, _ = match_polygons(pred, truth)
    b, _ = match_polygons(pred[::-1], truth[::-1])
    assert a.summary() == b.summary()


def brute_force_max_matching(truth, pred, threshold) -> tuple[int, float]:
    """(size, IoU sum) of the maximum matching, by enumerating every injective assignment; IoUs
    computed directly with shapely for every pair (no spatial index)."""
    iou = np.zeros((len(truth), len(pred)))
    for i, t in enumerate(truth):
        for j, p in enumerate(pred):
            inter = t.intersection(p).area
            iou[i, j] = inter / (t.area + p.area - inter) if inter else 0.0
    best = (0, 0.0)
    small, large = (truth, pred) if len(truth) <= len(pred) else (pred, truth)
    for perm in itertools.permutations(range(len(large)), len(small)):
        pairs = [(k, perm[k]) if small is truth else (perm[k], k) for k in range(len(small))]
        kept = [iou[i, j] for i, j in pairs if iou[i, j] >= threshold]
        best = max(best, (len(kept), sum(kept)))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_random_polygons_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    truth = [box(x, y, x + w, y + h) for x, y, w, h in
             zip(*rng.uniform(0, 40, (2, rng.integers(0, 6))), *rng.uniform(4, 12, (2, 6)))]
    pred = [box(x, y, x + w, y + h) for x, y, w, h in
            zip(*rng.uniform(0, 40, (2, rng.integers(0, 6))), *rng.uniform(4, 12, (2, 6)))]
    pred += [t.buffer(rng.uniform(-1, 1), join_style=2) for t in truth if rng.random() < 0.6]
    pred = pred[:6]
    counts, matches = match_polygons(pred, truth, 0.5)
    size, iou_sum = brute_force_max_matching(truth, pred, 0.5)
    assert counts.n_matched == size
    assert counts.iou_sum == pytest.approx(iou_sum)


@pytest.mark.parametrize("seed", range(10))
def test_mask_iou_equals_polygon_iou_of_the_same_buildings(seed):
    """Masks and their polygons (rasterio.features.shapes) score the same F1 and IoUs."""
    from rasterio.features import shapes
    from shapely.geometry import shape

    rng = np.random.default_rng(seed)
    truth, pred = np.zeros((96, 96), np.uint8), np.zeros((96, 96), np.uint8)
    for mask in (truth, pred):
        for _ in range(rng.integers(0, 8)):
            y, x = rng.integers(0, 80, 2)
            rect(mask, y, x, y + rng.integers(3, 16), x + rng.integers(3, 16))
    by_mask = match_masks(pred, truth).counts.summary()

    def polygons(mask):
        from shapely.ops import unary_union

        parts = [shape(g) for g, _ in shapes(mask, mask=mask > 0, connectivity=8)]
        merged = unary_union(parts) if parts else None  # 8-connected pieces touching at corners = one building
        return [] if merged is None else list(getattr(merged, "geoms", [merged]))

    by_polygon = match_polygons(polygons(pred), polygons(truth))[0].summary()
    for key in ("n_true", "n_pred", "n_matched", "f1"):
        assert by_mask[key] == by_polygon[key], key
    if by_mask["n_matched"]:
        assert by_mask["mean_iou"] == pytest.approx(by_polygon["mean_iou"])


def test_greedy_takes_highest_iou_first():
    matches = greedy_match([(0, 0, 0.6), (0, 1, 0.9), (1, 1, 0.7), (1, 0, 0.55)])
    assert [(m.truth, m.pred) for m in matches] == [(0, 1), (1, 0)]


def test_polygon_pairs_skip_touching_only():
    assert polygon_pairs([box(0, 0, 1, 1)], [box(1, 0, 2, 1)]) == []


# -- through evaluate ----------------------------------------------------------------------
def test_evaluate_scores_csv_vectors_and_mask_geotiff_alike(tmp_path, capsys):
    """The same scene as RLE CSVs, as vector files (another CRS for the prediction) and as
    a mask GeoTIFF gives the same building F1; --details has one row per building."""
    import csv
    import json

    gpd = pytest.importorskip("geopandas")
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    from buildseg.cli import main
    from buildseg.footprints.polygons import mask_polygons
    from buildseg.formats import rle

    rng = np.random.default_rng(5)
    truth, pred = np.zeros((128, 128), np.uint8), np.zeros((128, 128), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, 110, 2)
        h, w = rng.integers(4, 18, 2)
        rect(truth, y, x, y + h, x + w)
        if rng.random() < 0.8:
            dy, dx = rng.integers(-3, 4, 2)
            rect(pred, max(0, y + dy), max(0, x + dx), y + dy + h, x + dx + w)
    rect(pred, 120, 0, 123, 3)
    with open(tmp_path / "truth.csv", "w", newline="") as f:
        csv.writer(f).writerows([("img_id", "mask_rle"), ("a", rle.encode(truth))])
    with open(tmp_path / "pred.csv", "w", newline="") as f:
        csv.writer(f).writerows([("img_id", "mask_rle"), ("a", rle.encode(pred))])
    assert main(["evaluate", "--pred", str(tmp_path / "pred.csv"), "--truth", str(tmp_path / "truth.csv"),
                 "--shape", "128", "128", "--json", "--details", str(tmp_path / "d.csv")]) == 0
    by_csv = json.loads(capsys.readouterr().out)
    assert {"dice", "f1", "precision", "recall", "n_true", "n_pred", "n_matched", "mean_iou",
            "pixel_precision", "pixel_recall"} <= set(by_csv)
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert len(rows) == by_csv["n_true"] + by_csv["n_pred"]
    assert sum(1 for r in rows if r["side"] == "truth" and r["iou"]) == by_csv["n_matched"]

    transform = from_origin(500000.0, 4100000.0, 0.5, 0.5)
    gpd.GeoDataFrame(geometry=mask_polygons(truth, transform), crs="EPSG:32633").to_file(tmp_path / "truth.gpkg")
    gpd.GeoDataFrame(geometry=mask_polygons(pred, transform), crs="EPSG:32633").to_crs("EPSG:4326").to_file(
        tmp_path / "pred.geojson")
    assert main(["evaluate", "--pred", str(tmp_path / "pred.geojson"), "--truth", str(tmp_path / "truth.gpkg"),
                 "--json"]) == 0
    by_vector = json.loads(capsys.readouterr().out)
    with rasterio.open(tmp_path / "pred.tif", "w", driver="GTiff", height=128, width=128, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as dst:
        dst.write(pred[None])
    assert main(["evaluate", "--pred", str(tmp_path / "pred.tif"), "--truth", str(tmp_path / "truth.gpkg"), "--json"]) == 0
    by_raster = json.loads(capsys.readouterr().out)
    for key in ("n_true", "n_pred", "n_matched", "f1"):
        assert by_csv[key] == by_vector[key] == by_raster[key], key
    assert by_csv["mean_iou"] == pytest.approx(by_vector["mean_iou"], abs=1e-6)
    assert main(["evaluate", "--pred", str(tmp_path / "pred.tif"), "--truth", str(tmp_path / "truth.csv")]) == 2
    assert "both be CSVs or both footprints" in capsys.readouterr().err
