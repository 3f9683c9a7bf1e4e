import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from buildseg.cli import main
from buildseg.errors import BuildsegError
from buildseg.inference.core.postprocess import PostProcess, apply, remove_small_components
from buildseg.inference.core.segmenter import Segmenter
from buildseg.inference.core.tta import forward_transform, inverse_transform, transforms
from buildseg.models import ModelCard, build_model
from buildseg.runtime.checkpoint import save_atomic


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run / "best.pt"  # the run trained once per test run (conftest)


def small_segmenter(**kwargs) -> Segmenter:
    torch.manual_seed(0)
    model = build_model(ModelCard(encoder="resnet18", decoder_channels=[32, 16, 16, 16, 8], deep_supervision=False, ds_ensemble=False))
    return Segmenter([model], device="cpu", precision="fp32", **kwargs)


def test_tta_equals_the_manual_average():
    seg = small_segmenter(tta="d4")
    plain = small_segmenter(tta="none")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    manual = []
    for turns, flip in transforms("d4"):
        prob = torch.from_numpy(plain.probabilities(forward_transform(images, turns, flip)).mean[:, 0])
        manual.append(inverse_transform(prob, turns, flip))
    torch.testing.assert_close(torch.from_numpy(seg.probabilities(images).mean[:, 0]), torch.stack(manual).mean(0), atol=1e-5, rtol=1e-5)
    assert len(transforms("flip")) == 2 and len(transforms("d4")) == 8


@pytest.mark.slow
def test_sliding_window_matches_full_image_away_from_borders():
    seg = small_segmenter(window=256, overlap=0.5)
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (125, 125, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 1000x1000
    tiled = seg.probabilities(image).mean[0, 0]
    seg = seg.with_settings(window=2000)
    full = seg.probabilities(image).mean[0, 0]
    assert tiled.shape == full.shape == (1000, 1000)
    inner = (slice(64, -64), slice(64, -64))
    assert np.abs(tiled[inner] - full[inner]).mean() < 0.02


def test_sliding_window_has_no_seams_on_a_constant_image():
    seg = small_segmenter(window=128, overlap=0.25)
    prob = seg.probabilities(np.full((400, 400, 3), 120, dtype=np.uint8)).mean[0, 0]
    inner = prob[40:-40, 40:-40]
    # a seam would show as a jump between neighbouring pixels
    assert np.abs(np.diff(inner, axis=0)).max() < 1e-3 and np.abs(np.diff(inner, axis=1)).max() < 1e-3


def test_min_area_removes_exactly_the_small_components():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    for _ in range(10):
        mask = (rng.random((60, 60)) < 0.2).astype(np.uint8)
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        expected = np.isin(labels, 1 + np.flatnonzero(sizes >= 4)).astype(np.uint8)
        np.testing.assert_array_equal(remove_small_components(mask, 4), expected)


def test_empty_rules():
    prob = np.zeros((10, 10), np.float32)
    prob[0, 0] = 0.6
    assert apply(prob, PostProcess(threshold=0.5)).sum() == 1
    assert apply(prob, PostProcess(threshold=0.5, empty_max_prob=0.7)).sum() == 0
    assert apply(prob, PostProcess(threshold=0.5, empty_min_area=2)).sum() == 0


@pytest.mark.slow
def test_predict_evaluate_round_trip_through_the_cli(trained, synth_data, tmp_path, capsys):
    sub = tmp_path / "sub.csv"
    assert main(["predict", "--checkpoint", str(trained), "--data", str(synth_data / "test.csv"), "--out", str(sub),
                 "--min-area", "5", "--no-progress", "--num-workers", "0", "--masks-dir", str(tmp_path / "m"),
                 "--profile"]) == 0
    profile = capsys.readouterr().out
    assert "model (main thread)" in profile and "write CSV" in profile and "engine " in profile
    rows = list(csv.DictReader(open(sub)))
    truth = list(csv.DictReader(open(synth_data / "test_truth.csv")))
    assert [r["img_id"] for r in rows] == [r["img_id"] for r in truth]
    assert len(list((tmp_path / "m").glob("*.png"))) == len(rows)
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(sub), "--truth", str(synth_data / "test_truth.csv"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"dice", "n_scored", "n"} <= summary.keys() and summary["n"] == len(rows)
    # a bare img_id,mask_rle truth with --shape gives the same score
    bare = tmp_path / "bare.csv"
    with open(bare, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["img_id", "mask_rle"])
        w.writerows((r["img_id"], r["mask_rle"]) for r in truth)
    assert main(["evaluate", "--pred", str(sub), "--truth", str(bare), "--shape", "64", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dice"] == pytest.approx(summary["dice"])


def test_perfect_prediction_scores_one(synth_data, capsys):
    assert main(["evaluate", "--pred", str(synth_data / "test_truth.csv"), "--truth", str(synth_data / "test_truth.csv"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dice"] == 1.0


@pytest.mark.slow
def test_corrupt_tile_in_the_middle(trained, synth_data, tmp_path, capsys):
    rows = list(csv.DictReader(open(synth_data / "test.csv")))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    rows[3] = {"img_id": "BROKEN", "img_path": str(tmp_path / "broken.png")}
    for r in rows:
        if r["img_id"] != "BROKEN":
            r["img_path"] = str(synth_data / r["img_path"])
    test_csv = tmp_path / "test.csv"
    with open(test_csv, "w", newline="") as handle:
        w = csv.DictWriter(handle, fieldnames=["img_id", "img_path"])
        w.writeheader()
        w.writerows(rows)
    sub = tmp_path / "sub.csv"
    args = ["predict", "--checkpoint", str(trained), "--data", str(test_csv), "--out", str(sub), "--no-progress", "--num-workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "BROKEN" in err and "broken.png" in err and not sub.exists()  # no partial output
    assert main(args + ["--skip-bad"]) == 0
    table = {r["img_id"]: r["mask_rle"] for r in csv.DictReader(open(sub))}
    assert table["BROKEN"] == "-1" and len(table) == len(rows)


def test_checkpoint_load_errors(trained, tmp_path):
    with pytest.raises(BuildsegError, match="not a buildseg checkpoint"):
        torch.save({"weights": 1}, tmp_path / "x.pt")
        Segmenter.from_checkpoint(tmp_path / "x.pt")
    payload = torch.load(trained, weights_only=True)
    payload["model_card"]["encoder"] = "resnet34"  # another architecture's weights
    save_atomic(payload, tmp_path / "wrong.pt")
    with pytest.raises(BuildsegError, match="does not match"):
        Segmenter.from_checkpoint(tmp_path / "wrong.pt")
    seg = Segmenter.from_checkpoint(trained, device="cpu")
    with pytest.raises(BuildsegError, match="channels"):
        seg.predict(np.zeros((64, 64, 4), np.uint8))


@pytest.mark.slow
def test_segmenter_api_and_ensemble(trained):
    from buildseg import Segmenter as Exported

    seg = Exported.from_checkpoint([trained, trained], device="cpu", threshold=0.5)
    one = Exported.from_checkpoint(trained, device="cpu", threshold=0.5)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(seg.probabilities(image).mean[0, 0], one.probabilities(image).mean[0, 0], atol=1e-6)
    assert seg.predict(image).shape == (64, 64)


@pytest.mark.slow
def test_distributed_predict_matches_single_process(trained, synth_data, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    base = ["-m", "buildseg", "predict", "--checkpoint", str(trained), "--data", str(synth_data / "test.csv"),
            "--no-progress", "--num-workers", "0", "--device", "cpu"]
    assert subprocess.run([sys.executable, *base, "--out", str(one)], capture_output=True).returncode == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *base[0:], "--out", str(two)],
                          capture_output=True, text=True)
    rank_lines = [line for line in proc.stderr.splitlines() if "Warning" not in line and not line.startswith("  ")]
    assert proc.returncode == 0, "\n".join(rank_lines[:80])  # the ranks' own errors, not only torchrun's summary
    assert one.read_text() == two.read_text()


def test_cli_config_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  encodr: resnet18\n")
    assert main(["train", "--config", str(cfg), "--data", "x.csv", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "model.encodr" in err and "encoder" in err
    cfg.write_text("modle:\n  encoder: resnet18\n")
    assert main(["train", "--config", str(cfg), "--data", "x.csv", "--out", str(tmp_path / "r")]) == 2
    assert "unknown section" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_flags_reach_the_config(synth_data, tmp_path):
    out = tmp_path / "r"
    code = main(["train", "--data", str(synth_data / "train.csv"), "--out", str(out), "--encoder", "resnet18", "--weights", "none",
                 "--epochs", "1", "--batch-size", "2", "--crop-size", "64", "--val-tile", "64", "--crops-per-image", "1",
                 "--decoder-channels", "16", "16", "16", "16", "8", "--deep-supervision", "--dropout", "0.2",
                 "--norm", "group", "--loss", "bce:0.5,lovasz_symmetric", "--precision", "fp32", "--num-workers", "0", "--no-progress",
                 "--no-quantize-at-end"])
    assert code == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["deep_supervision"] is True and saved["model"]["norm"] == "group"
    assert saved["loss"] == "bce:0.5,lovasz_symmetric" and saved["data"]["crop_size"] == 64
    # the saved config reproduces the run
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again"), "--no-progress"]) == 0


# -- exact properties on random inputs (cannot pass by accident) ---------------------------
@pytest.mark.parametrize("mode", ["flip", "d4"])
def test_every_tta_inverse_undoes_its_transform_on_a_random_tensor(mode):
    x = torch.randn(2, 3, 37, 53)  # not square, not constant: a wrong inverse cannot hide
    for turns, flip in transforms(mode):
        y = forward_transform(x, turns, flip)
        if (turns, flip) != (0, False):  # the transform really moves pixels
            assert y.shape != x.shape or not torch.equal(y, x)
        assert torch.equal(inverse_transform(y, turns, flip), x), (turns, flip)


def _covering_windows(length: int, window: int, overlap: float):
    from buildseg.inference.core.tiling import window_starts

    return window_starts(length, min(window, length), overlap)


def test_sliding_window_blend_equals_full_image_in_the_interior_and_is_not_uniform(monkeypatch):
    from buildseg.inference.core import tiling
    from conftest import LocalModel

    model = LocalModel()
    rng = np.random.default_rng(3)
    image = torch.from_numpy(rng.integers(0, 256, (3, 200, 170), dtype=np.uint8))

    def prob(batch):
        with torch.no_grad():
            return torch.sigmoid(model(batch))[:, 0]

    full = prob(image[None])[0]
    window, overlap, radius = 64, 0.5, 2
    gauss = tiling.sliding_window_proba(prob, image, window, overlap, batch_size=3)
    # pixels that every covering window sees with its full 5x5 context agree exactly with the full image
    near = []
    for length in full.shape:
        near_edge = np.zeros(length, dtype=bool)
        for s in _covering_windows(length, window, overlap):
            for edge in (s, s + window):
                if 0 < edge < length:  # an inner window edge: context is cut there
                    near_edge[max(0, edge - radius) : edge + radius] = True
        near.append(near_edge)
    safe = ~(near[0][:, None] | near[1][None, :])
    assert safe.mean() > 0.5
    torch.testing.assert_close(gauss[torch.from_numpy(safe)], full[torch.from_numpy(safe)], atol=1e-6, rtol=0)
    # where windows overlap and disagree (cut context), Gaussian weights differ from a uniform average
    monkeypatch.setattr(tiling, "gaussian_weights", lambda h, w, sigma_scale=0.25: torch.ones(h, w))
    uniform = tiling.sliding_window_proba(prob, image, window, overlap, batch_size=3)
    unsafe = torch.from_numpy(~safe)
    assert (gauss - uniform)[unsafe].abs().max() > 1e-3
    # and the Gaussian blend is the closer one to the whole-image prediction there
    assert (gauss - full)[unsafe].abs().mean() < (uniform - full)[unsafe].abs().mean()


@pytest.mark.slow
def test_ensemble_of_two_different_checkpoints_is_the_mean_of_their_probabilities(tmp_path):
    from conftest import write_tiny_checkpoint

    a = write_tiny_checkpoint(tmp_path / "a.pt", seed=1)
    b = write_tiny_checkpoint(tmp_path / "b.pt", seed=2)
    image = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    pa = Segmenter.from_checkpoint(a, device="cpu", precision="fp32").probabilities(image).mean[0, 0]
    pb = Segmenter.from_checkpoint(b, device="cpu", precision="fp32").probabilities(image).mean[0, 0]
    assert np.abs(pa - pb).mean() > 1e-3  # really different models
    both = Segmenter.from_checkpoint([a, b], device="cpu", precision="fp32")
    np.testing.assert_allclose(both.probabilities(image).mean[0, 0], (pa + pb) / 2, atol=1e-6)
    # the same holds through the sliding window, and the members (kept for the empty vote) are each model's own map
    both = both.with_settings(window=48, empty_vote=1)
    maps = both.probabilities(image)
    np.testing.assert_allclose(np.mean(maps.members, axis=0)[0, 0], maps.mean[0, 0], atol=1e-6)  # (B, K, H, W) maps


def test_empty_vote_is_honoured_by_predict_and_large_images():
    from conftest import LocalModel

    sees = LocalModel(seed=1)  # sees buildings somewhere
    blind = LocalModel(seed=2, bias=-100.0)  # never does
    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    post = PostProcess(threshold=0.2)  # the mean (p + 0) / 2 passes where p > 0.4
    voting = Segmenter([sees, blind], device="cpu", precision="fp32", postprocess=post, empty_vote=1, channels_last=False)
    plain = Segmenter([sees, blind], device="cpu", precision="fp32", postprocess=post, empty_vote=0, channels_last=False)
    assert plain.predict(image).any()  # the ensemble mean sees buildings
    assert not voting.predict(image).any()  # one of two members sees none: empty by the vote
    voting, plain = voting.with_settings(window=48), plain.with_settings(window=48)  # larger than the window: the same, window by window
    assert plain.predict(image).any() and not voting.predict(image).any()
    with pytest.raises(BuildsegError, match="0..2"):
        Segmenter([sees, blind], device="cpu", empty_vote=3)


def test_predict_batch_equals_predict_image_by_image_and_the_rules_of_the_maps():
    seg = small_segmenter(tta="flip")
    images = torch.randint(0, 256, (3, 3, 64, 80), dtype=torch.uint8)
    batch = seg.predict_batch(images)
    one_by_one = [seg.predict(image.permute(1, 2, 0).numpy()) for image in images]
    assert len(batch) == 3 and all(np.array_equal(a, b) for a, b in zip(batch, one_by_one, strict=True))
    maps = seg.probabilities(images)
    assert maps.mean.shape == (3, 1, 64, 80) and maps.members is None  # members only for the empty vote
    for k in range(3):
        np.testing.assert_array_equal(seg.rules(*maps.image(k)), apply(maps.mean[k, 0], seg.postprocess))


def test_segmenter_settings_are_frozen_and_with_settings_shares_the_engines():
    seg = small_segmenter()
    with pytest.raises(AttributeError, match="frozen: use segmenter.with_settings"):
        seg.window = 64
    image = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    strict = seg.with_settings(postprocess=PostProcess(threshold=0.99), window=64)
    assert strict.runners is seg.runners and strict.models is seg.models  # nothing reloaded or recompiled
    assert seg.window != 64 and seg.postprocess.threshold != 0.99  # the original is unchanged
    np.testing.assert_allclose(strict.probabilities(image).mean, seg.with_settings(window=64).probabilities(image).mean)
    assert strict.predict(image).sum() <= seg.predict(image).sum()
    with pytest.raises(BuildsegError, match="cannot change engine"):
        seg.with_settings(engine="openvino")
    with pytest.raises(BuildsegError, match="overlap 1.5 is out of range"):
        seg.with_settings(overlap=1.5)
