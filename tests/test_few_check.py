"""The few-label check (few_check.py): a fine-tune on a few tiles is kept only when it beats its
init on held-out halves of the labels; otherwise best.pt holds the init."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from buildseg import few_check
from buildseg.cli import main
from buildseg.formats import rle as rle_codec
from buildseg.formats.images import read_image, write_png
from buildseg.formats.tables import Record, load_records
from buildseg.runtime import packaged
from buildseg.runtime.checkpoint import load_checkpoint
from conftest import random_mask, write_tiny_checkpoint


@pytest.fixture()
def zoo(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "zoo"
    monkeypatch.setattr(packaged, "ZOO", folder)
    payload = load_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt"))
    payload["input"] = {"gsd": None, "bands": None}
    packaged.write_model(payload, name="tiny", version="0.1", sources=[{"name": "synthetic", "tiles": 1, "terms": "none"}],
                         quality={"headline": "untrained"}, recipe="tests", code_version="test")
    return folder


@pytest.mark.parametrize("channels,shape", [(3, (64, 96)), (4, (80, 48)), (1, (50, 50))])
def test_one_tile_is_cut_into_two_labelled_halves_that_make_the_tile(tmp_path, channels, shape):
    rng = np.random.default_rng(channels)
    image = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
    mask = random_mask(rng, shape)
    write_png(tmp_path / "tile.png", image)
    record = Record("t", tmp_path / "tile.png", rle=rle_codec.encode(mask))
    unit, groups = few_check._parts([record], tmp_path / "halves", channels, seed=0)
    assert unit == "halves of the tile" and [len(g) for g in groups] == [1, 1]
    parts = [(read_image(g[0].image_path, channels), g[0].load_mask(read_image(g[0].image_path, channels).shape[:2]))
             for g in groups]
    axis = 1 if shape[1] >= shape[0] else 0
    assert np.array_equal(np.concatenate([p[0] for p in parts], axis=axis), image)
    assert np.array_equal(np.concatenate([p[1] for p in parts], axis=axis), mask)


def test_tiles_are_split_into_two_disjoint_groups_covering_all():
    records = [Record(f"r{i}", Path(f"r{i}.png"), rle="-1") for i in range(5)]
    unit, groups = few_check._parts(records, Path("unused"), 3, seed=3)
    ids = [r.img_id for g in groups for r in g]
    assert unit == "tiles" and sorted(ids) == [f"r{i}" for i in range(5)] and {len(g) for g in groups} == {2, 3}


def test_the_verdict_needs_a_positive_mean_gain_on_scored_parts():
    fold = few_check.FoldScore
    assert few_check.FewCheck("tiles", [fold(0.5, 0.6), fold(0.5, 0.45)]).accepted
    assert not few_check.FewCheck("tiles", [fold(0.5, 0.52), fold(0.5, 0.4)]).accepted
    assert not few_check.FewCheck("tiles", [fold(None, None), fold(None, None)]).accepted  # no evidence: keep the init
    assert few_check.FewCheck("tiles", [fold(None, None), fold(0.2, 0.3)]).gains == pytest.approx([0.1])
    # building-free truth: drawing nothing there (None: not scored) beats drawing false buildings (0.0)
    assert few_check.FewCheck("halves", [fold.of(0.0, None, held_out=[]), fold.of(0.5, 0.45, held_out=[])]).accepted
    assert fold.of(None, None, held_out=[]).base is None


def _few_csv(synth_data: Path, path: Path, n: int) -> Path:
    with open(synth_data / "train.csv") as handle:
        rows = list(csv.DictReader(handle))[:n]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "img_path": str((synth_data / row["img_path"]).resolve())})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("n_tiles,fine_tune_wins", [(1, False), (2, True)])
def test_train_keeps_the_fine_tune_only_when_the_check_says_it_beats_the_init(zoo, tmp_path, synth_data, monkeypatch,
                                                                              capsys, n_tiles, fine_tune_wins):
    scored: list[str] = []

    def held_out_dice(checkpoint, records, *, config):  # the verdict is forced; the half-runs are real
        scored.append(str(checkpoint))
        assert records and all(r.has_mask for r in records)
        is_init = str(checkpoint).startswith(packaged.PACKAGED_PREFIX)
        return 0.5 if is_init else (0.6 if fine_tune_wins else 0.4)

    monkeypatch.setattr(few_check, "held_out_dice", held_out_dice)
    out = tmp_path / "ft"
    data = _few_csv(synth_data, tmp_path / "few.csv", n_tiles)
    assert main(["train", "--init", "tiny", "--data", str(data), "--out", str(out), "--crop-size", "64", "--val-tile", "64",
                 "--num-workers", "0", "--batch-size", "2", "--precision", "fp32", "--no-progress", "--no-quantize-at-end",
                 "--few-steps", "2", "--few-lr", "1e-2"]) == 0
    assert "few-label check" in capsys.readouterr().out
    report = json.loads((out / "few_check.json").read_text())
    assert report["accepted"] is fine_tune_wins and len(report["folds"]) == 2 and len(scored) == 4
    assert report["unit"] == ("halves of the tile" if n_tiles == 1 else "tiles")
    held = [set(f["held_out"]) for f in report["folds"]]
    assert not held[0] & held[1]
    for fold in ("fold0", "fold1"):  # a half-run keeps its score and labels, not its 100 MB checkpoints
        assert (out / "few_check" / fold / "score.json").is_file() and not list((out / "few_check" / fold).glob("*.pt"))
        assert len(load_records(out / "few_check" / fold / "labels.csv")) == max(1, n_tiles // 2)
    best, last, init = (load_checkpoint(p)["model"] for p in (out / "best.pt", out / "last.pt", "model:tiny"))
    tuned = any(not torch.equal(last[k], init[k]) for k in init)
    assert tuned, "the fine-tune changed no weight"
    keeps = best if fine_tune_wins else init
    assert all(torch.equal(best[k], keeps[k]) for k in init)
    if not fine_tune_wins:
        assert any(not torch.equal(best[k], last[k]) for k in init)


def test_no_few_check_trains_once(zoo, tmp_path, synth_data, monkeypatch):
    from buildseg.config import Config

    config = Config()
    config.train.init, config.data.train = "tiny", str(_few_csv(synth_data, tmp_path / "few.csv", 2))
    assert few_check.check_applies(config)
    config.train.few_check = False
    assert not few_check.check_applies(config)
    config.train.few_check, config.data.val = True, config.data.train
    assert not few_check.check_applies(config)  # --val-data: the general schedule, validated on it


@pytest.mark.parametrize("n_tiles,setting,expected", [(1, "auto", (5e-5, True)), (9, "auto", (5e-5, True)),
                                                      (10, "auto", (1e-3, False)), (20, "auto", (1e-3, False)),
                                                      (10, "on", (1e-3, True)), (3, "off", (5e-5, False))])
def test_the_few_label_schedule_follows_the_number_of_tiles(n_tiles, setting, expected):
    """Below train.few_many (10) tiles: few_lr with the init's norms; from it: few_lr_many with
    trainable norms (benchmarks/README.md, k=10); few_freeze_norms on/off overrides the norms."""
    from buildseg.config import Config
    from buildseg.training.init import few_label_schedule, few_regime

    config = Config()
    config.train.init, config.train.few_freeze_norms = "tiny", setting
    assert few_regime(config, n_tiles) == expected
    assert few_label_schedule(config, n_tiles)
    assert (config.train.lr, config.train.freeze_all_norms) == expected


def test_the_checks_half_runs_run_the_whole_fine_tunes_schedule(tmp_path, monkeypatch):
    """Ten labels train at the ten-tile rate with trainable norms; their halves hold five tiles
    each, and still run that schedule, not the five-tile one."""
    import buildseg.training.loop as loop
    from buildseg.config import Config
    from buildseg.training.init import few_label_schedule

    seen = []
    monkeypatch.setattr(loop, "train", lambda sub: seen.append(sub))
    monkeypatch.setattr(few_check, "held_out_dice", lambda *a, **k: 0.5)
    config = Config()
    config.train.init, config.train.out = "tiny", str(tmp_path / "run")
    records = [Record(f"r{i}", tmp_path / f"r{i}.png", rle="-1") for i in range(10)]
    few_check._fold(config, train=records[:5], held=records[5:], folder=tmp_path / "fold0", base="model:tiny", n_labels=10)
    (sub,) = seen
    assert few_label_schedule(sub, 5) and (sub.train.lr, sub.train.freeze_all_norms) == (1e-3, False)
