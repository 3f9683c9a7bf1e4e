"""SpaceNet CSVs: `evaluate` reproduces SpaceNet's scorer, `predict --format spacenet` writes its proposals.

SpaceNet's public sample files (solaris' SN2_sample_preds/truth.csv) are not reachable from
here, so the scorer's case is reproduced by hand: every rule the scorer has (POLYGON Z,
POLYGON EMPTY, images in one file only, the 20 px² area rule on both sides with its < and
<=, confidence order, AOI totals) is in ``CASE`` with the counts worked out by hand. An
independent brute-force scorer, written from SpaceNet's description (proposals in decreasing
confidence, each against every remaining truth), is compared with ``evaluate`` on random
images with overlapping buildings and tied confidences.
"""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import shapely
from shapely.geometry import box

from buildseg.cli import main
from buildseg.spacenet_scoring import evaluate_spacenet, spacenet_ratios


def wkt(x0, y0, x1, y1, z=False) -> str:
    """A rectangle's pixel WKT, as SpaceNet's truth writes it (POLYGON Z) or as proposals do."""
    ring = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    if z:
        return "POLYGON Z ((" + ", ".join(f"{x} {y} 0" for x, y in ring) + "))"
    return "POLYGON ((" + ", ".join(f"{x} {y}" for x, y in ring) + "))"


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


TRUTH_HEADER = ("ImageId", "BuildingId", "PolygonWKT_Pix", "PolygonWKT_Geo")
PRED_HEADER = ("ImageId", "BuildingId", "PolygonWKT_Pix", "Confidence")

# image -> (truth rectangles, [(proposal rectangle, confidence)], expected (tp, fp, fn) under spacenet, under buildseg)
CASE = {
    # T0, T1 matched by P0 (IoU 0.9) and P1 (80/120); P2 overlaps T0 but T0 is taken: FP.
    # T2 (area 16 < 20) is dropped; T3 (area exactly 20) is kept and missed: FN.
    # P3 (area exactly 20) is dropped (proposals need > 20); P4 (25 px²) hits nothing: FP.
    "AOI_1_Test_img1": ([(0, 0, 10, 10), (20, 0, 30, 10), (50, 50, 54, 54), (70, 70, 74, 75)],
                        [((0, 0, 10, 9), 0.9), ((22, 0, 32, 10), 0.8), ((0, 0, 10, 8), 0.7), ((50, 50, 54, 55), 0.95),
                         ((60, 60, 65, 65), 0.6)],
                        (2, 2, 1), (2, 2, 1)),
    # POLYGON EMPTY on both sides: listed, nothing counted (SpaceNet's F1 for it: 0).
    "AOI_1_Test_img2": ([], [], (0, 0, 0), (0, 0, 0)),
    # Only in the truth: both buildings are false negatives.
    "AOI_1_Test_img3": ([(0, 0, 10, 10), (30, 30, 40, 40)], None, (0, 0, 2), (0, 0, 2)),
    # Only in the proposals: a false positive.
    "AOI_2_Other_img4": (None, [((0, 0, 10, 10), 0.5)], (0, 1, 0), (0, 1, 0)),
    # Overlapping truths, where the rules differ. T0 = 10x10, T1 = its top 10x6.
    # P_b (10x4, conf 0.9): IoU T1 40/60, T0 0.4. P_a (10x7, conf 0.5): IoU T1 60/70, T0 0.7.
    # spacenet: P_b takes T1, then P_a takes T0: 2 TP. buildseg (highest IoU first): T1-P_a
    # (0.857) first, then P_b's only candidate T1 is taken: 1 TP, 1 FP, 1 FN.
    "AOI_2_Other_img5": ([(0, 0, 10, 10), (0, 0, 10, 6)], [((0, 0, 10, 4), 0.9), ((0, 0, 10, 7), 0.5)],
                         (2, 0, 0), (1, 1, 1)),
}


@pytest.fixture()
def case_files(tmp_path):
    truth_rows, pred_rows = [], []
    for image, (truths, preds, _, _) in CASE.items():
        if truths is not None:
            truth_rows += [(image, k, wkt(*t, z=True), "POLYGON EMPTY") for k, t in enumerate(truths)] or \
                [(image, -1, "POLYGON EMPTY", "POLYGON EMPTY")]
        if preds is not None:
            pred_rows += [(image, k, wkt(*p), c) for k, (p, c) in enumerate(preds)] or [(image, -1, "POLYGON EMPTY", 1)]
    random.Random(0).shuffle(pred_rows)  # the scorer's order is the confidence, not the file
    return (write_csv(tmp_path / "pred.csv", PRED_HEADER, pred_rows),
            write_csv(tmp_path / "truth.csv", TRUTH_HEADER, truth_rows))


def read_details(path) -> dict[str, tuple[int, int, int]]:
    with open(path, newline="") as handle:
        return {r["image"]: (int(r["tp"]), int(r["fp"]), int(r["fn"])) for r in csv.DictReader(handle)}


@pytest.mark.parametrize("matching, column", [("spacenet", 2), ("buildseg", 3)])
def test_evaluate_reproduces_the_scorer_case_per_image(case_files, tmp_path, capsys, matching, column):
    pred, truth = case_files
    details = tmp_path / "details.csv"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--matching", matching,
                 "--details", str(details), "--group-by", "aoi", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = {image: spec[column] for image, spec in CASE.items()}
    assert read_details(details) == expected
    tp, fp, fn = (sum(v[i] for v in expected.values()) for i in range(3))
    assert (summary["n_matched"], summary["n_pred"] - tp, summary["n_true"] - tp) == (tp, fp, fn)
    assert summary["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert summary["min_area"] == 20 and summary["matching"] == matching and summary["n_images"] == len(CASE)
    for aoi, counts in summary["groups"].items():
        mine = [v for k, v in expected.items() if k.startswith(aoi + "_")]
        g_tp = sum(v[0] for v in mine)
        assert (counts["n_matched"], counts["n_pred"] - g_tp, counts["n_true"] - g_tp) == \
            (g_tp, sum(v[1] for v in mine), sum(v[2] for v in mine))
    assert set(summary["groups"]) == {"AOI_1_Test", "AOI_2_Other"}


def test_details_write_spacenets_per_image_ratios(case_files, tmp_path):
    pred, truth = case_files
    details = tmp_path / "d.csv"
    evaluate_spacenet(pred, truth, details=details)
    with open(details, newline="") as handle:
        rows = {r["image"]: r for r in csv.DictReader(handle)}
    assert float(rows["AOI_1_Test_img2"]["f1"]) == 0.0  # empty in both: SpaceNet writes 0
    assert float(rows["AOI_1_Test_img1"]["precision"]) == pytest.approx(0.5)
    assert spacenet_ratios(2, 2, 1) == pytest.approx((0.5, 2 / 3, 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)))


def test_min_area_flag_changes_the_rule_on_both_sides(case_files, tmp_path):
    pred, truth = case_files
    off = evaluate_spacenet(pred, truth, min_area=0)
    # at 0, img1's T2 (16 px²) and P3 (20 px², overlapping T2 at 16/20) come back and match
    on = evaluate_spacenet(pred, truth)
    assert off["n_true"] == on["n_true"] + 1 and off["n_pred"] == on["n_pred"] + 1
    assert off["n_matched"] == on["n_matched"] + 1


# -- an independent scorer on random cases -------------------------------------------------
def reference_scorer(truths, preds, threshold=0.5, min_area=20.0):
    """SpaceNet's loop as its documentation states it, with nothing shared with buildseg:
    every proposal of area > min_area, in decreasing confidence (ties: file order), is
    compared with every remaining truth of area >= min_area; the best IoU >= threshold
    (ties: the first truth) is a true positive and that truth leaves the pool."""
    pool = [g for g in truths if g.area >= min_area and g.area > 0]
    order = sorted((k for k, (g, _) in enumerate(preds) if g.area > min_area), key=lambda k: (-preds[k][1], k))
    remaining, tp = list(range(len(pool))), 0
    for k in order:
        g = preds[k][0]
        best, best_iou = None, -1.0
        for t in remaining:
            union = pool[t].union(g).area
            iou = pool[t].intersection(g).area / union if union else 0.0
            if iou > best_iou:
                best, best_iou = t, iou
        if best is not None and best_iou >= threshold:
            tp += 1
            remaining.remove(best)
    return tp, len(order) - tp, len(pool) - tp


def random_image(rng):
    truths = []
    for _ in range(rng.integers(0, 7)):
        x, y = rng.integers(0, 40, 2)
        w, h = rng.integers(3, 16, 2)
        truths.append((int(x), int(y), int(x + w), int(y + h)))
    preds = []
    for t in truths:  # perturbed copies (some duplicated: overlapping proposals), then noise
        for _ in range(rng.integers(0, 3)):
            dx0, dy0, dx1, dy1 = rng.integers(-3, 4, 4)
            x0, y0, x1, y1 = t[0] + dx0, t[1] + dy0, t[2] + dx1, t[3] + dy1
            if x1 > x0 and y1 > y0:
                preds.append(((int(x0), int(y0), int(x1), int(y1)), round(float(rng.random()), 1)))
    for _ in range(rng.integers(0, 3)):
        x, y = rng.integers(0, 40, 2)
        w, h = rng.integers(2, 12, 2)
        preds.append(((int(x), int(y), int(x + w), int(y + h)), round(float(rng.random()), 1)))
    return truths, preds


def test_evaluate_equals_an_independent_brute_force_scorer_on_random_images(tmp_path):
    rng = np.random.default_rng(7)
    images = {f"AOI_{i % 3}_City_img{i}": random_image(rng) for i in range(120)}
    truth_rows, pred_rows = [], []
    for image, (truths, preds) in images.items():
        truth_rows += [(image, k, wkt(*t, z=True), "") for k, t in enumerate(truths)] or [(image, -1, "POLYGON EMPTY", "")]
        pred_rows += [(image, k, wkt(*p), c) for k, (p, c) in enumerate(preds)] or [(image, -1, "POLYGON EMPTY", 1)]
    truth = write_csv(tmp_path / "truth.csv", TRUTH_HEADER, truth_rows)
    pred = write_csv(tmp_path / "pred.csv", PRED_HEADER, pred_rows)
    details = tmp_path / "details.csv"
    evaluate_spacenet(pred, truth, details=details)
    got = read_details(details)
    expected = {image: reference_scorer([box(*t) for t in truths], [(box(*p), c) for p, c in preds])
                for image, (truths, preds) in images.items()}
    assert got == expected
    # the case is not trivial: matches, misses, false alarms and dropped small buildings all occur
    totals = np.array(list(expected.values())).sum(axis=0)
    assert (totals > 20).all()


# -- reading -------------------------------------------------------------------------------
def test_geographic_wkt_is_used_when_both_files_lack_pixel_wkt(tmp_path):
    truth = write_csv(tmp_path / "t.csv", ("ImageId", "BuildingId", "PolygonWKT_Geo"),
                      [("AOI_1_X_img1", 0, wkt(0.0, 0.0, 0.001, 0.001))])
    pred = write_csv(tmp_path / "p.csv", ("ImageId", "BuildingId", "PolygonWKT_Geo", "Confidence"),
                     [("AOI_1_X_img1", 0, wkt(0.0, 0.0, 0.001, 0.0009), 1)])
    summary = evaluate_spacenet(pred, truth)
    assert summary["geometry"] == "PolygonWKT_Geo" and summary["min_area"] == 0 and summary["n_matched"] == 1


@pytest.mark.parametrize("text, fragment", [("POLYGON ((0 0, 10 0, 10", "malformed PolygonWKT_Pix"),
                                            ("POINT (3 4)", "is a Point")])
def test_malformed_wkt_is_one_line_naming_file_line_and_image(tmp_path, capsys, text, fragment):
    truth = write_csv(tmp_path / "truth.csv", TRUTH_HEADER, [("AOI_1_A_img1", 0, wkt(0, 0, 10, 10), "")])
    pred = write_csv(tmp_path / "pred.csv", PRED_HEADER, [("AOI_1_A_img1", 0, wkt(0, 0, 10, 10), 1),
                                                         ("AOI_1_A_img7", 0, text, 1)])
    details = tmp_path / "details.csv"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--details", str(details)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(pred) in err and "line 3" in err and "AOI_1_A_img7" in err and fragment in err
    assert not details.exists()


def test_mixing_a_spacenet_csv_with_a_mask_csv_is_refused(case_files, tmp_path, capsys):
    pred, _ = case_files
    masks = write_csv(tmp_path / "masks.csv", ("img_id", "mask_rle"), [("a", "-1")])
    assert main(["evaluate", "--pred", str(pred), "--truth", str(masks)]) == 2
    err = capsys.readouterr().err
    assert "SpaceNet" in err and str(masks) in err


def test_invalid_bowtie_proposal_is_repaired_like_the_scorer(tmp_path):
    truth = write_csv(tmp_path / "t.csv", TRUTH_HEADER, [("AOI_1_A_img1", 0, wkt(0, 0, 10, 10), "")])
    bowtie = "POLYGON ((0 0, 10 10, 10 0, 0 10, 0 0))"
    pred = write_csv(tmp_path / "p.csv", PRED_HEADER, [("AOI_1_A_img1", 0, bowtie, 1)])
    summary = evaluate_spacenet(pred, truth)
    repaired = shapely.from_wkt(bowtie).buffer(0)
    assert summary["n_pred"] == (1 if repaired.area > 20 else 0)


# -- predict --format spacenet -------------------------------------------------------------
@pytest.mark.slow
def test_predict_format_spacenet_is_the_csv_mask_as_polygons_and_scores_like_it(synth_data, tmp_path, capsys):
    """The proposal CSV rasterises back to the submission's masks pixel for pixel, lists
    every tile (POLYGON EMPTY when empty), and scores the building F1 the mask CSV scores."""
    from rasterio.features import rasterize

    from buildseg.footprints.polygons import mask_polygons
    from buildseg.formats import rle
    from buildseg.formats.images import read_image
    from buildseg.formats.spacenet import read_spacenet
    from buildseg.formats.tables import load_records, read_rle_table
    from buildseg.inference.core.segmenter import Segmenter
    from conftest import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    first = load_records(synth_data / "test.csv")[0]
    prob = Segmenter.from_checkpoint(ckpt, engine="torch").probabilities(read_image(first.image_path, 3)).mean
    threshold = float(np.quantile(prob, 0.6))  # an untrained model: a threshold that leaves buildings
    common = ["predict", "--checkpoint", str(ckpt), "--data", str(synth_data / "test.csv"), "--no-progress",
              "--num-workers", "0", "--engine", "torch", "--threshold", f"{threshold:.6f}"]
    assert main([*common, "--out", str(tmp_path / "sub.csv")]) == 0
    assert main([*common, "--out", str(tmp_path / "pred_sn.csv"), "--format", "spacenet"]) == 0
    masks = read_rle_table(tmp_path / "sub.csv")
    proposals = read_spacenet(tmp_path / "pred_sn.csv", "PolygonWKT_Pix")
    assert list(proposals) == list(masks)  # every tile, in input order
    n_buildings = 0
    for image, code in masks.items():
        mask = rle.decode(code, (64, 64))
        polygons = proposals[image].polygons
        n_buildings += len(polygons)
        drawn = rasterize([(g, 1) for g in polygons], out_shape=(64, 64), dtype="uint8") if polygons else 0 * mask
        np.testing.assert_array_equal(drawn, mask)
        assert all(0 <= c <= 1 for c in proposals[image].confidence)
    assert n_buildings > 0, "the tiny model found nothing: the round trip would be empty"
    # truth as SpaceNet polygons, scored both ways at min area 0 with buildseg's matching
    truth_rows = []
    for record in load_records(synth_data / "test_truth.csv", require_masks=True):
        polygons = mask_polygons(record.load_mask((64, 64)))
        truth_rows += [(record.img_id, k, g.wkt, "") for k, g in enumerate(polygons)] or \
            [(record.img_id, -1, "POLYGON EMPTY", "")]
    truth = write_csv(tmp_path / "truth_sn.csv", TRUTH_HEADER, truth_rows)
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred_sn.csv"), "--truth", str(truth), "--min-area", "0",
                 "--matching", "buildseg", "--json"]) == 0
    polygons = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--pred", str(tmp_path / "sub.csv"), "--truth", str(synth_data / "test_truth.csv"),
                 "--json"]) == 0
    pixels = json.loads(capsys.readouterr().out)
    for key in ("n_true", "n_pred", "n_matched"):
        assert polygons[key] == pixels[key], key
