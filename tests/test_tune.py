import numpy as np
import pytest

from buildseg.cli import main
from buildseg.inference.core.postprocess import PostProcess, apply
from buildseg.inference.core.segmenter import Segmenter
from buildseg.inference.jobs.tune import default_row, search
from buildseg.instance_metrics import InstanceCounts, match_masks
from buildseg.metrics import Scoreboard


def blobs(rng, shape=(48, 48)):
    prob = np.zeros(shape, np.float32)
    for _ in range(rng.integers(0, 4)):
        y, x = rng.integers(0, shape[0] - 8, 2)
        h, w = rng.integers(1, 12, 2)
        prob[y : y + h, x : x + w] = rng.uniform(0.3, 1.0)
    return np.clip(prob + rng.uniform(0, 0.35, shape).astype(np.float32), 0, 1)


def test_search_scores_equal_applying_the_postprocess_tile_by_tile():
    rng = np.random.default_rng(0)
    probs = [blobs(rng) for _ in range(25)]
    truths = [(blobs(rng) > 0.6) for _ in range(25)]
    rows = search(probs, truths, thresholds=(0.4, 0.6), min_areas=(0, 5, 30), empty_max_probs=(0.0, 0.8))
    assert len(rows) == 12
    for row in rows:
        board = Scoreboard()
        for p, t in zip(probs, truths):
            board.add(apply(p, row.post), t)
        expected = board.summary()
        assert row.summary["dice"] == pytest.approx(expected["dice"], nan_ok=True)
        assert row.summary["n_scored"] == expected["n_scored"]
        buildings = InstanceCounts()
        for p, t in zip(probs, truths):
            buildings += match_masks(apply(p, row.post), t).counts
        assert row.summary["f1"] == pytest.approx(buildings.summary()["f1"])


def test_search_by_f1_sorts_by_building_f1():
    rng = np.random.default_rng(1)
    probs = [blobs(rng) for _ in range(20)]
    truths = [(blobs(rng) > 0.6) for _ in range(20)]
    rows = search(probs, truths, thresholds=(0.4, 0.6), min_areas=(0, 5, 30), empty_max_probs=(0.0, 0.8), objective="f1")
    f1 = [r.summary["f1"] for r in rows]
    assert f1 == sorted(f1, reverse=True)


def test_search_beats_the_default_on_specks_over_empty_tiles():
    rng = np.random.default_rng(1)
    truths, probs = [], []
    for i in range(20):
        truth = np.zeros((32, 32), bool)
        prob = np.full((32, 32), 0.1, np.float32)
        if i % 2:  # a building, well predicted
            truth[8:24, 8:24] = True
            prob[8:24, 8:24] = 0.9
        else:  # empty tile with a 3-pixel false-positive speck
            prob[rng.integers(0, 30), 0:3] = 0.7
        truths.append(truth)
        probs.append(prob)
    best, default = search(probs, truths)[0], default_row(probs, truths)
    assert default.summary["dice"] == pytest.approx(1.0 * 10 / 20)  # every speck costs a whole 0
    assert best.summary["dice"] == pytest.approx(1.0)
    assert best.summary["dice"] >= default.summary["dice"]


@pytest.mark.slow
def test_tune_cli_stores_the_best_setting_for_predict(synth_data, trained_run, tmp_path, capsys):
    from conftest import copy_run

    ckpt = copy_run(trained_run, tmp_path / "run") / "best.pt"  # tune writes into it: a copy of the shared run
    assert main(["tune", "--checkpoint", str(ckpt), "--data", str(synth_data / "test_truth.csv"), "--tile", "64",
                 "--json", str(tmp_path / "tune.json")]) == 0
    out = capsys.readouterr().out
    assert "| default |" in out and "| #1 |" in out
    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    import json

    best = json.loads((tmp_path / "tune.json").read_text())[0]
    assert seg.postprocess == PostProcess(threshold=best["threshold"], min_area=best["min_area"], empty_max_prob=best["empty_max_prob"])
    # an explicit flag still wins over the stored setting
    assert Segmenter.from_checkpoint(ckpt, device="cpu", threshold=0.5).postprocess.threshold == 0.5
    # a run folder works as --checkpoint too: its best.pt is tuned and written
    before = ckpt.stat().st_mtime_ns
    assert main(["tune", "--checkpoint", str(tmp_path / "run"), "--data", str(synth_data / "test_truth.csv"),
                 "--tile", "64"]) == 0
    assert ckpt.stat().st_mtime_ns != before and "best.pt" in capsys.readouterr().out


@pytest.mark.slow
def test_train_cli_tunes_at_the_end_and_stores_it_in_best_pt(synth_data, tmp_path, capsys):
    import torch

    run = tmp_path / "run"
    args = ["train", "--data", str(synth_data / "train.csv"), "--out", str(run), "--encoder", "resnet18", "--weights",
            "none", "--epochs", "1", "--batch-size", "2", "--crop-size", "64", "--val-tile", "64", "--crops-per-image", "2",
            "--decoder-channels", "8", "8", "8", "8", "8", "--num-workers", "0", "--no-progress", "--no-tensorboard",
            "--precision", "fp32", "--no-quantize-at-end"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "post-processing tuned on the validation tiles" in out and "empty-tile FP rate" in out
    post = torch.load(run / "best.pt", weights_only=False)["postprocess"]
    assert set(post) >= {"threshold", "min_area", "empty_max_prob"}
    assert main(args[:4] + [str(tmp_path / "run2")] + args[5:] + ["--no-tune-at-end"]) == 0
    assert "post-processing tuned" not in capsys.readouterr().out
    assert torch.load(tmp_path / "run2" / "best.pt", weights_only=False)["postprocess"] == {"threshold": 0.5, "min_area": 0}
