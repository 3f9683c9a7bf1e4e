"""The contact target (data/targets.py), its watershed split (inference/core/split.py), and a
two-target model end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from buildseg.data.targets import contact_zone, target_stack
from buildseg.inference.core.split import separate, split_instances, split_mask
from buildseg.instance_metrics import match_masks


def brute_contact(instances: np.ndarray, radius: int) -> np.ndarray:
    h, w = instances.shape
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            window = instances[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1]
            out[y, x] = len(set(window[window > 0].tolist())) >= 2
    return out


@pytest.mark.parametrize("seed", range(6))
def test_contact_zone_equals_its_definition(seed):
    rng = np.random.default_rng(seed)
    instances = np.zeros((40, 40), np.int32)
    for k in range(1, 7):
        y, x = rng.integers(0, 34, 2)
        instances[y : y + rng.integers(3, 10), x : x + rng.integers(3, 10)] = k
    for radius in (1, 2):
        np.testing.assert_array_equal(contact_zone(instances, radius), brute_contact(instances, radius))


def test_target_stack_channels():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:8, 2:8] = 1
    mask[2:8, 10:16] = 1  # a 2 px gap: contact within radius 2
    stack = target_stack(mask, ["footprint", "contact"])
    assert stack.shape == (2, 20, 20) and stack.dtype == np.uint8
    assert (stack[0] == mask).all() and stack[1][2:8, 8:10].all() and not stack[1][12:].any()


def two_houses():
    """Two touching houses as one blob, a probability with a dip and a contact line between them."""
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 5:30] = 1
    mask[10:30, 30:55] = 1
    footprint = mask * 0.9
    footprint[10:30, 29:31] = 0.6
    contact = np.zeros(mask.shape, np.float32)
    contact[10:30, 28:32] = 0.9
    truth = np.zeros_like(mask)
    truth[10:30, 5:29] = 1
    truth[10:30, 31:55] = 2
    return mask, footprint.astype(np.float32), contact, truth


def test_watershed_splits_touching_houses():
    mask, footprint, contact, truth = two_houses()
    instances = split_instances(mask, footprint, contact)
    assert len(np.unique(instances[instances > 0])) == 2
    assert (instances > 0).sum() == mask.sum()  # every building pixel kept by the watershed
    out = split_mask(mask, footprint, contact)
    truth_mask = separate(truth)
    before = match_masks(mask, truth_mask).counts.summary()
    after = match_masks(out, truth_mask).counts.summary()
    assert before["n_pred"] == 1 and after["n_pred"] == 2 and after["f1"] == 1.0 > before["f1"]
    # without contact the blob stays one building
    assert match_masks(split_mask(mask, footprint, np.zeros_like(contact)), truth_mask).counts.n_pred == 1


def test_separate_leaves_no_8_adjacency():
    rng = np.random.default_rng(0)
    instances = rng.integers(0, 4, (30, 30)).astype(np.int32)
    out = separate(instances)
    from scipy import ndimage

    labels, _ = ndimage.label(out, structure=np.ones((3, 3)))
    for k in np.unique(labels[labels > 0]):  # each component of the output holds a single instance id
        assert len(np.unique(instances[labels == k])) == 1


@pytest.mark.slow
def test_two_target_model_trains_and_predicts_split(tmp_path):
    from buildseg.cli import main
    from buildseg.data.synth import write_dataset
    from buildseg.inference.core.segmenter import Segmenter

    write_dataset(tmp_path / "d", n_train=3, train_size=128, n_test=2, test_size=64, seed=0, progress=False)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "d" / "train.csv"), "--out", str(run), "--targets",
                 "footprint,contact", "--encoder", "resnet18", "--weights", "none", "--epochs", "1", "--batch-size", "2",
                 "--crop-size", "64", "--val-tile", "64", "--crops-per-image", "2", "--decoder-channels", "8", "8", "8",
                 "8", "8", "--num-workers", "0", "--no-progress", "--no-tensorboard", "--precision", "fp32",
                 "--no-quantize-at-end"]) == 0
    payload = torch.load(run / "best.pt", weights_only=False)
    assert payload["model_card"]["targets"] == ["footprint", "contact"]
    assert payload["model"]["net.head.weight"].shape[0] == 2
    seg = Segmenter.from_checkpoint(run, device="cpu", precision="fp32")
    assert seg.targets == ["footprint", "contact"] and seg.split
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert seg.probabilities(image).mean[0].shape == (2, 64, 64) and seg.probabilities(image).mean[0, 0].shape == (64, 64)
    assert seg.predict(image).shape == (64, 64)
    assert main(["predict", "--checkpoint", str(run), "--data", str(tmp_path / "d" / "test.csv"),
                 "--out", str(tmp_path / "sub.csv"), "--device", "cpu", "--no-progress", "--num-workers", "0"]) == 0


def test_targets_must_start_with_footprint(tmp_path, capsys):
    from buildseg.cli import main

    assert main(["train", "--data", "x.csv", "--out", str(tmp_path / "r"), "--targets", "contact"]) == 2
    assert "footprint first" in capsys.readouterr().err


def test_geo_windows_carry_the_contact_of_adjacent_polygons(tmp_path):
    gpd = pytest.importorskip("geopandas")
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin
    from shapely.geometry import box

    from buildseg.data.geo import GeoWindowDataset, prepare_geo_data

    with rasterio.open(tmp_path / "s.tif", "w", driver="GTiff", height=128, width=128, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000.0, 4100000.0, 0.5, 0.5)) as dst:
        dst.write(np.full((3, 128, 128), 120, np.uint8))
    x0, y0 = 500000.0, 4100000.0
    houses = [box(x0 + 10, y0 - 30, x0 + 20, y0 - 20), box(x0 + 20, y0 - 30, x0 + 30, y0 - 20)]  # share an edge
    gpd.GeoDataFrame(geometry=houses, crs="EPSG:32633").to_file(tmp_path / "l.gpkg")
    geo = prepare_geo_data(str(tmp_path / "s.tif"), [str(tmp_path / "l.gpkg")], [1, 2, 3], val_tile=32)
    dataset = GeoWindowDataset(geo.scenes, [1, 2, 3], crop_size=48, augment=False, positive_fraction=1.0,
                               targets=["footprint", "contact"])
    found = False
    for i in range(10):
        _, target = dataset[(0, i)]
        assert target.shape == (2, 48, 48)
        found |= bool(target[1].any())  # the shared edge is contact: the two polygons are two buildings
    assert found


def test_tune_contact_finds_a_threshold_that_splits():
    """An uncalibrated contact head (values near 0.4 with a dip to 0.3 on the join): 0.5 leaves
    nothing to split on; the search picks a threshold under the plateau and splits the houses."""
    from buildseg.inference.core.postprocess import PostProcess
    from buildseg.inference.jobs.tune import tune_contact

    mask, footprint, contact, truth = two_houses()
    contact = np.full(mask.shape, 0.42, np.float32)
    contact[10:30, 28:32] = 0.46
    truth_mask = separate(truth).astype(bool)
    rows = tune_contact([np.stack([footprint, contact])], [truth_mask], PostProcess(threshold=0.5), objective="f1",
                        thresholds=(0.5, 0.44))
    assert rows[0].post.contact_threshold == 0.44 and rows[0].summary["f1"] == 1.0
    assert [r for r in rows if r.post.contact_threshold == 0.5][0].summary["f1"] < 1.0
