"""``buildseg adapt``: pseudo-labels against their definition, batch-norm re-estimation
against a brute-force mean, no mask ever read, bit-exact resume, histogram matching's
CDFs, the command end to end on images and GeoTIFFs, and its bad inputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from buildseg.adaptation import batchnorm
from buildseg.adaptation.loop import AdaptSettings, adapt
from buildseg.adaptation.pseudo_labels import masked_bce, select
from buildseg.cli import main
from buildseg.inference.core.segmenter import Segmenter

FAST = AdaptSettings(steps=3, batch_size=2, crop=64, save_every=0, progress=False, device="cpu")


def test_pseudo_labels_follow_their_definition_on_random_probabilities():
    rng = np.random.default_rng(0)
    for _ in range(20):
        low, high = (float(np.float32(v)) for v in sorted(rng.uniform(0, 1, 2)))  # exact in float32, like the maps
        probs = rng.uniform(0, 1, (2, 1, 9, 7)).astype(np.float32)
        probs.flat[:4] = [low, high, np.float32(low), np.float32(high)]  # the boundaries themselves
        labels = select(torch.from_numpy(probs), low=float(low), high=float(high))
        for p, t, w in zip(probs.ravel(), labels.targets.numpy().ravel(), labels.weights.numpy().ravel()):
            assert t == (1.0 if p >= high else 0.0)
            assert w == (1.0 if p >= high or p <= low else 0.0)
        logits = rng.normal(size=probs.shape).astype(np.float32)
        want_terms = [np.log1p(np.exp(-abs(x))) + max(x, 0) - x * t
                      for x, t, w in zip(logits.ravel(), labels.targets.numpy().ravel(), labels.weights.numpy().ravel())
                      if w]
        want = np.mean(want_terms) if want_terms else 0.0
        assert float(masked_bce(torch.from_numpy(logits), labels)) == pytest.approx(want, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError):
        select(torch.zeros(2), low=0.6, high=0.4)


def test_batch_norm_reestimation_changes_only_the_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 1, 1))
    model[1].weight.data.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randint(0, 256, (3, 3, 10, 12)).float() for _ in range(4)]
    assert batchnorm.reestimate(model, batches, torch.device("cpu")) == 12
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    features = torch.cat([model[0](b) for b in batches])  # equal batches: the cumulative average is the mean
    torch.testing.assert_close(after["1.running_mean"], features.mean(dim=(0, 2, 3)))
    per_batch_var = torch.stack([model[0](b).var(dim=(0, 2, 3), unbiased=True) for b in batches])
    torch.testing.assert_close(after["1.running_var"], per_batch_var.mean(0))
    assert model[1].momentum == 0.1 and not model.training


def _cdf(channel: np.ndarray) -> np.ndarray:
    """The empirical CDF of a uint8 channel at every level 0..255."""
    return np.searchsorted(np.sort(channel.ravel()), np.arange(256), side="right") / channel.size


def test_histogram_matching_maps_the_cdf_onto_the_reference():
    from buildseg.data.augment import match_colours

    rng = np.random.default_rng(1)
    for _ in range(5):
        image = rng.integers(0, 256, (80, 90, 3)).astype(np.uint8)
        reference = np.clip(rng.normal(rng.uniform(60, 200, 3), rng.uniform(10, 40, 3), (70, 60, 3)), 0, 255).astype(np.uint8)
        out = match_colours(image, reference, blend=1.0)
        for c in range(3):
            # uint8 levels are atoms: a match is exact up to the heaviest level's mass in the reference
            atom = np.bincount(reference[..., c].ravel(), minlength=256).max() / reference[..., c].size
            assert np.abs(_cdf(out[..., c]) - _cdf(reference[..., c])).max() <= atom + 0.005  # Kolmogorov-Smirnov
            assert np.abs(_cdf(image[..., c]) - _cdf(reference[..., c])).max() > 0.3  # it was far before


def test_histmatch_augmentation_trains_and_is_deterministic(synth_data):
    from buildseg.data.datasets import TrainCropDataset
    from buildseg.formats.tables import load_records

    records = load_records(synth_data / "train.csv")
    a = TrainCropDataset(records, crop_size=64, augmentations=["d4", "histmatch"], seed=3)
    b = TrainCropDataset(records, crop_size=64, augmentations=["d4", "histmatch"], seed=3)
    plain = TrainCropDataset(records, crop_size=64, augmentations=["d4"], seed=3)
    assert len(a.references) == len(records) and not plain.references
    assert all(torch.equal(a[k][0], b[k][0]) for k in range(6))
    assert any(not torch.equal(a[k][0], plain[k][0]) for k in range(6))


def _unreadable_masks(folder, monkeypatch):
    """Every mask file is garbage and reading any mask fails the test."""
    from buildseg.formats import images, tables

    for mask in (folder / "masks").glob("*.png"):
        mask.write_bytes(b"not a png")

    def forbidden(*args, **kwargs):
        raise AssertionError("adapt read a mask")

    monkeypatch.setattr(images, "read_mask", forbidden)
    monkeypatch.setattr(tables.Record, "load_mask", forbidden)


@pytest.fixture()
def target_folder(synth_data, tmp_path):
    """The synthetic test tiles as an images/ + masks/ folder."""
    import shutil

    from buildseg.formats import rle
    from buildseg.formats.images import read_rgb, write_png
    from buildseg.formats.tables import load_records, read_rle_table

    folder = tmp_path / "target"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    truth = read_rle_table(synth_data / "test_truth.csv")
    for record in load_records(synth_data / "test.csv")[:6]:
        shutil.copy(record.image_path, folder / "images" / f"{record.img_id}.png")
        shape = read_rgb(record.image_path).shape[:2]
        write_png(folder / "masks" / f"{record.img_id}.png", rle.decode(truth[record.img_id], shape) * 255)
    return folder


@pytest.mark.slow
def test_adapt_never_reads_a_mask(trained_run, target_folder, tmp_path, monkeypatch):
    _unreadable_masks(target_folder, monkeypatch)
    (target_folder / "masks" / next(target_folder.glob("masks/*.png")).name).unlink()  # one image without a mask
    result = adapt(trained_run, target_folder, tmp_path / "adapted", FAST)
    assert result.steps_done == 3 and (tmp_path / "adapted" / "best.pt").is_file()
    table = tmp_path / "target.csv"  # a CSV whose mask_rle column is garbage: never parsed
    table.write_text("img_id,img_path,mask_rle\n" + "".join(
        f"{p.stem},{p},not an rle\n" for p in sorted((target_folder / "images").glob("*.png"))))
    assert adapt(trained_run, table, tmp_path / "adapted2", FAST).steps_done == 3


@pytest.mark.slow
def test_teacher_tta_pseudo_labels_are_the_mean_over_the_dihedral_copies(trained_run, target_folder, tmp_path,
                                                                         monkeypatch):
    """With --teacher-tta d4 the probabilities the pseudo-labels come from are the mean of the
    teacher's over the 8 flipped/turned copies of the weak view, each turned back (NumPy)."""
    from dataclasses import replace

    from buildseg.adaptation import loop

    seen = []
    real_select = loop.select
    monkeypatch.setattr(loop, "select", lambda probs, **kw: seen.append(probs) or real_select(probs, **kw))
    adapter = loop.Adapter(trained_run, target_folder, tmp_path / "tta", replace(FAST, steps=1, teacher_tta="d4"))
    teacher = copy.deepcopy(adapter.teacher)
    weak = loop._weak_view(adapter._target_batch(0), np.random.default_rng([FAST.seed, 0]))
    adapter._adapt_step()
    views = []
    for turns in range(4):
        for flip in (False, True):
            x = np.rot90(weak.numpy()[..., ::-1] if flip else weak.numpy(), turns, axes=(-2, -1))
            with torch.no_grad():
                prob = torch.sigmoid(loop._main_head(teacher(torch.from_numpy(x.copy())))).numpy()
            prob = np.rot90(prob, -turns, axes=(-2, -1))
            views.append(prob[..., ::-1] if flip else prob)
    expected = np.mean(views, axis=0)
    np.testing.assert_allclose(seen[0].numpy(), expected, atol=1e-5)
    with torch.no_grad():
        single = torch.sigmoid(loop._main_head(teacher(weak))).numpy()
    assert np.abs(single - expected).max() > 1e-3  # the views differ: the mean is not the single view


@pytest.mark.slow
def test_an_interrupted_adapt_resumes_bit_exactly(trained_run, target_folder, tmp_path):
    from dataclasses import replace

    from buildseg.runtime.checkpoint import load_checkpoint

    settings = replace(FAST, steps=4, bn=True, bn_batches=2)
    adapt(trained_run, target_folder, tmp_path / "straight", settings)
    adapt(trained_run, target_folder, tmp_path / "cut", replace(settings, steps=2))  # stops after 2 steps
    adapt(trained_run, target_folder, tmp_path / "cut", settings, resume=True)
    straight, resumed = (load_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "cut"))
    assert resumed["adapt_step"] == straight["adapt_step"] == 4
    for key in ("model", "student"):
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)


@pytest.mark.slow
def test_adapt_command_end_to_end_then_predict(trained_run, synth_data, tmp_path, capsys):
    out = tmp_path / "adapted"
    assert main(["adapt", "--checkpoint", str(trained_run), "--data", str(synth_data / "test.csv"), "--out", str(out),
                 "--steps", "3", "--batch-size", "2", "--crop", "64", "--device", "cpu", "--no-progress", "--bn",
                 "--val", str(synth_data / "test_truth_folder"), "--val-every", "2"]) == 2  # no such folder
    assert not out.exists()
    assert main(["adapt", "--checkpoint", str(trained_run), "--data", str(synth_data / "test.csv"), "--out", str(out),
                 "--steps", "3", "--batch-size", "2", "--crop", "64", "--device", "cpu", "--no-progress",
                 "--labelled", str(synth_data / "train.csv")]) == 0
    assert "adapted model" in capsys.readouterr().out
    seg = Segmenter.from_checkpoint(out, device="cpu")
    assert seg.predict(np.zeros((64, 64, 3), np.uint8)).shape == (64, 64)
    original = Segmenter.from_checkpoint(trained_run, device="cpu")
    assert seg.postprocess == original.postprocess  # the source run's tuned post-processing carries over


@pytest.mark.slow
def test_adapt_reads_a_geotiff_folder(tmp_path):
    from buildseg.data.synth_geo import write_geo_scene
    from conftest import tiny_config

    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_geo_scene(scenes / "a.tif", tmp_path / "a.geojson", size=160, seed=1)
    write_geo_scene(scenes / "b.tif", tmp_path / "b.geojson", size=128, seed=2, sixteen_bit=True)
    from buildseg.training.loop import train

    config = tiny_config(tmp_path, tmp_path / "run", epochs=1)
    config.data.train, config.data.labels = str(scenes / "a.tif"), [str(tmp_path / "a.geojson")]
    train(config)
    out = tmp_path / "adapted"  # through the command, as the README runs it
    assert main(["adapt", "--checkpoint", str(tmp_path / "run"), "--data", str(scenes), "--out", str(out),
                 "--steps", "3", "--batch-size", "2", "--crop", "64", "--device", "cpu", "--no-progress"]) == 0
    assert (out / "best.pt").is_file() and json.loads((out / "adapt.json").read_text())["steps"] == 3
    assert torch.load(out / "last.pt", weights_only=False)["adapt_step"] == 3
    seg = Segmenter.from_checkpoint(out, device="cpu")
    assert seg.input == Segmenter.from_checkpoint(tmp_path / "run", device="cpu").input  # the scenes' bands/GSD carry over


@pytest.mark.parametrize("case", ["no_image", "not_a_run", "time_limit", "low_high"])
def test_bad_adapt_input_is_one_line_exit_2_and_writes_nothing(case, trained_run, tmp_path, capsys):
    target = tmp_path / "target"
    (target / "images").mkdir(parents=True)
    (target / "images" / "a.png").write_bytes(b"\x89PNG broken")
    good = tmp_path / "good"
    (good / "images").mkdir(parents=True)
    from buildseg.formats.images import write_png

    write_png(good / "images" / "a.png", np.zeros((64, 64, 3), np.uint8))
    fake = tmp_path / "fake.pt"
    torch.save({"weights": torch.zeros(2)}, fake)
    args = {"no_image": ["--checkpoint", str(trained_run), "--data", str(target)],
            "not_a_run": ["--checkpoint", str(fake), "--data", str(good)],
            "time_limit": ["--checkpoint", str(trained_run), "--data", str(good), "--time-limit", "0"],
            "low_high": ["--checkpoint", str(trained_run), "--data", str(good), "--low", "0.8", "--high", "0.6"]}[case]
    out = tmp_path / "adapted"
    try:
        code = main(["adapt", *args, "--out", str(out), "--device", "cpu", "--no-progress"])
    except SystemExit as exc:  # argparse's own range errors exit from the parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {"no_image": "a.png", "not_a_run": "not a buildseg checkpoint", "time_limit": "time-limit",
            "low_high": "--low"}[case] in err
    assert not out.exists()


def test_report_shows_before_and_after_on_the_same_tiles(synth_data, tmp_path):
    """The before/after section's Dice equal the competition scorer's on each file."""
    import csv

    from buildseg.evaluation import evaluate_csv
    from buildseg.report import render_report

    truth = synth_data / "test_truth.csv"
    with open(truth) as handle:
        rows = list(csv.DictReader(handle))
    before = tmp_path / "before.csv"
    with open(before, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["img_id", "mask_rle"])
        writer.writerows((r["img_id"], "-1" if k % 3 == 0 else r["mask_rle"]) for k, r in enumerate(rows))
    page = render_report(truth, truth, tmp_path / "r.html", shape=(64, 64), before=before).read_text()
    want_before = evaluate_csv(before, truth, shape=(64, 64))["dice"]
    section = page[page.index("id='before-after'"):page.index("id='changes'")]
    assert f"<td>{want_before:.3f}</td><td>1.000</td><td>{1 - want_before:+.3f}</td>" in section
    assert page.count("class='change-row'") >= 1


@pytest.mark.slow
def test_per_image_standardisation_ignores_colour_and_contrast_and_exports(tmp_path):
    """input_norm=image: a per-channel brightness/contrast change of the input leaves the
    output unchanged, in torch and in the exported ONNX graph (the engines' input)."""
    from buildseg.inference.jobs.export import export_checked
    from buildseg.models import ModelCard, build_model
    from buildseg.runtime.checkpoint import FORMAT, save_atomic

    torch.manual_seed(0)
    card = ModelCard(encoder="resnet18", input_norm="image", decoder_channels=[16, 16, 8, 8, 8], deep_supervision=False)
    model = build_model(card, "none").eval()
    x = torch.randint(0, 200, (2, 3, 64, 80)).float()
    gain, offset = torch.tensor([0.6, 1.1, 0.8]).view(1, 3, 1, 1), torch.tensor([30.0, -5.0, 12.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x * gain + offset), atol=1e-4, rtol=0)
        flat = torch.full((1, 3, 64, 64), 90.0)
        assert torch.isfinite(model(flat)).all()  # the std floor: a flat tile is not divided by zero
    ckpt = save_atomic({"format": FORMAT, "model_card": card.to_dict(), "model": model.state_dict()}, tmp_path / "m.pt")
    _, diff = export_checked(ckpt, tmp_path / "m.onnx", opset=18, tolerance=1e-3)
    assert diff < 1e-3


def test_cutmix_boxes_follow_their_definition_on_random_batches():
    from buildseg.data.mixing import CUTMIX_AREA, CUTMIX_P, cut_mix

    rng = torch.Generator().manual_seed(0)
    shares, samples = [], 0
    for _ in range(200):
        b, h, w = int(torch.randint(2, 6, (1,))), int(torch.randint(8, 40, (1,))), int(torch.randint(8, 40, (1,)))
        images = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8)
        masks = torch.randint(0, 2, (b, 2, h, w)).float() + 10 * torch.arange(b).view(b, 1, 1, 1)  # labels say whose pixel
        before = images.clone(), masks.clone()
        out_images, out_masks = cut_mix(images, masks, generator=rng)
        assert torch.equal(images, before[0]) and torch.equal(masks, before[1])  # the inputs are not modified
        source_images, source_masks = images.roll(1, 0), masks.roll(1, 0)
        samples += b
        for i in range(b):
            own = (out_masks[i] == masks[i]).all(0) & (out_images[i] == images[i]).all(0)
            other = (out_masks[i] == source_masks[i]).all(0) & (out_images[i] == source_images[i]).all(0)
            assert bool((own | other).all())  # each pixel is its own or the previous sample's, image and labels alike
            box = (out_masks[i] // 10 != i).all(0)
            if box.any():  # the other sample's pixels form one filled rectangle
                rows, cols = torch.nonzero(box.any(1)).flatten(), torch.nonzero(box.any(0)).flatten()
                assert int(box.sum()) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                shares.append(float(box.float().mean()))
    assert abs(len(shares) / samples - CUTMIX_P) < 0.08  # about half the samples get a box
    # the box's share of the crop: the requested range, up to the rounding of its sides on crops down to 8 px
    assert CUTMIX_AREA[0] * 0.5 <= min(shares) and max(shares) <= CUTMIX_AREA[1] * 1.5
    assert abs(float(np.mean(shares)) - sum(CUTMIX_AREA) / 2) < 0.05
    one = torch.zeros(1, 3, 8, 8)
    assert cut_mix(one, one[:, :1], generator=rng)[0] is one  # nothing to mix a single sample with
