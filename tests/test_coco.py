"""COCO instance JSON out (``predict --format coco``): pycocotools reads it, decodes every
annotation to the building it describes, and scores it at AP 1.0 against itself."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from buildseg.cli import main
from buildseg.footprints.coco import annotations, uncompressed_rle
from buildseg.formats import rle
from buildseg.formats.tables import read_rle_table
from buildseg.instance_metrics import label_buildings
from conftest import random_mask

mask_utils = pytest.importorskip("pycocotools.mask")


def test_uncompressed_rle_decodes_in_pycocotools_to_the_mask_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(40):
        shape = tuple(int(v) for v in rng.integers(1, 40, 2))
        mask = random_mask(rng, shape)
        code = uncompressed_rle(mask)
        decoded = mask_utils.decode(mask_utils.frPyObjects(code, *shape))
        np.testing.assert_array_equal(decoded, mask)
        assert sum(code["counts"]) == mask.size


def test_one_annotation_per_building_with_its_box_area_and_mean_probability():
    rng = np.random.default_rng(1)
    mask = random_mask(rng, (48, 40), density=0.3)
    prob = rng.random((48, 40)).astype(np.float32)
    notes = annotations(mask, prob, image_id=7, first_id=100)
    labels, count = label_buildings(mask)
    assert len(notes) == count and [n["id"] for n in notes] == list(range(100, 100 + count))
    for k, note in enumerate(notes, start=1):
        component = labels == k
        ys, xs = np.nonzero(component)
        assert note["area"] == component.sum() and note["image_id"] == 7
        assert note["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert note["score"] == pytest.approx(float(prob[component].mean()))
        assert mask_utils.area(mask_utils.frPyObjects(note["segmentation"], 48, 40)) == note["area"]


@pytest.mark.slow
def test_predict_format_coco_matches_the_csv_and_scores_itself_at_ap_one(trained_run, synth_data, tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    common = ["predict", "--checkpoint", str(trained_run), "--data", str(synth_data / "test.csv"), "--no-progress",
              "--num-workers", "0", "--threshold", "0.3"]
    assert main([*common, "--out", str(tmp_path / "sub.csv")]) == 0
    assert main([*common, "--out", str(tmp_path / "pred.json"), "--format", "coco"]) == 0
    doc = json.loads((tmp_path / "pred.json").read_text())
    assert doc["categories"] == [{"id": 1, "name": "building", "supercategory": "structure"}]
    assert doc["annotations"], "the trained model found no building: the AP check would be empty"
    # the annotations of each image are the buildings of its CSV mask, pixel for pixel
    csv = read_rle_table(tmp_path / "sub.csv")
    for image in doc["images"]:
        shape = (image["height"], image["width"])
        union = np.zeros(shape, np.uint8)
        for note in (n for n in doc["annotations"] if n["image_id"] == image["id"]):
            union |= mask_utils.decode(mask_utils.frPyObjects(note["segmentation"], *shape))
        np.testing.assert_array_equal(union, rle.decode(csv[image["img_id"]], shape))
    # pycocotools: the file as ground truth, its annotations as results -> AP 1.0
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(tmp_path / "pred.json"))
        results = truth.loadRes(doc["annotations"])
        evaluation = COCOeval(truth, results, iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_format_coco_is_refused_for_scenes_and_layer_formats_for_tiles(synth_data, tmp_path, capsys):
    from conftest import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(synth_data / "test.csv"), "--out",
                 str(tmp_path / "x.gpkg"), "--format", "gpkg"]) == 2
    assert "--format gpkg" in capsys.readouterr().err and not (tmp_path / "x.gpkg").exists()
