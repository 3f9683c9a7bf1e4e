"""What buildseg saves outlives its version: run folders and checkpoints written before the
schema was versioned (config.yaml without ``version`` and ``decoder_width``, checkpoints
without ``schema``, ``best_dice`` instead of ``best_score``) still predict, resume and re-run
with ``--config`` to the same network. Outputs get the modes of the user's umask, and
caches shared by several processes are filled by one at a time."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import torch
import yaml

from buildseg.atomic import atomic_open, atomic_path, default_file_mode
from buildseg.runtime.locks import folder_lock
from buildseg.schema import SCHEMA_VERSION, upgrade_checkpoint, upgrade_config
from conftest import tiny_config


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    default_file_mode.cache_clear()
    try:
        with atomic_open(tmp_path / "sub.csv") as handle:
            handle.write("img_id,mask_rle\n")
        with atomic_path(tmp_path / "layer.gpkg") as tmp:
            tmp.write_bytes(b"x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what any other tool would create
    finally:
        os.umask(previous)
        default_file_mode.cache_clear()
    assert _mode(tmp_path / "sub.csv") == _mode(tmp_path / "layer.gpkg") == _mode(plain) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.gpkg", "plain.txt", "sub.csv"]  # no temporaries


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    (tmp_path / "m.xml").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "m.xml", companions=(".bin",)) as tmp:
            tmp.write_text("new")
            tmp.with_suffix(".bin").write_text("new")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.xml"] and (tmp_path / "m.xml").read_text() == "old"
    with pytest.raises(IsADirectoryError):
        with atomic_open(tmp_path):
            pass


def test_folder_lock_lets_one_holder_in_at_a_time(tmp_path):
    """flock conflicts between separate open()s even within one process, so threads stand in
    for torchrun's ranks: all released together, each block must run alone."""
    events: list[str] = []
    start = threading.Barrier(4)

    def worker(name: str) -> None:
        start.wait()
        with folder_lock(tmp_path / "cache"):
            events.append(f"{name} in")
            time.sleep(0.05)  # long enough for an unlocked neighbour to interleave
            events.append(f"{name} out")

    threads = [threading.Thread(target=worker, args=(n,)) for n in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(events) == 8
    assert all(events[i].split()[0] == events[i + 1].split()[0] for i in range(0, 8, 2)), events
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    with pytest.raises(OSError):
        with folder_lock(blocked / "cache"):
            pass
    with folder_lock(blocked / "cache", required=False):  # a read-only cache: run unlocked
        events.append("unlocked")
    assert events[-1] == "unlocked"


def test_upgrades_on_random_v1_dicts_fill_only_what_v1_implied():
    card = {"arch": "unet", "encoder": "resnet18", "in_chans": 3, "decoder_channels": None, "norm": "batch",
            "dropout": 0.0, "attention": None, "deep_supervision": True, "ds_ensemble": True, "mean": [0.5] * 3,
            "std": [0.2] * 3}
    payload = upgrade_checkpoint({"format": "buildseg-checkpoint-v1", "model_card": card, "best_dice": 0.7,
                                  "optimizer": {}, "config": {"train": {"monitor": "f1"}}})
    assert payload["model_card"]["decoder_width"] == 1.0 and payload["model_card"]["deep_supervision"] is True
    assert payload["best_score"] == 0.7 and payload["monitor"] == "f1" and "best_dice" not in payload
    assert payload["bad_epochs"] == 0 and payload["schema"] == SCHEMA_VERSION
    # a v2 card is taken as written; a hand-written partial config too
    assert "decoder_width" not in upgrade_checkpoint({"schema": 2, "model_card": {"arch": "unet"}})["model_card"]
    assert upgrade_config({"model": {"encoder": "resnet18"}}) == {"model": {"encoder": "resnet18"}}


def _downgrade_to_v1(run):
    """Rewrite a run folder as buildseg wrote it before the schema was versioned."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.pop("version")
    config["model"].pop("decoder_width")
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name in ("last.pt", "best.pt"):
        payload = torch.load(run / name, weights_only=True)
        payload.pop("schema")
        payload.pop("monitor", None)
        payload["best_dice"] = payload.pop("best_score")
        payload["model_card"].pop("decoder_width")
        payload["config"] = {k: v for k, v in payload["config"].items() if k != "version"}
        payload["config"]["model"].pop("decoder_width")
        torch.save(payload, run / name)


@pytest.mark.slow
def test_a_run_folder_from_before_the_schema_predicts_resumes_and_reruns_the_same_network(synth_data, tmp_path):
    from buildseg.config import load_config
    from buildseg.inference.core.segmenter import Segmenter
    from buildseg.training.loop import Trainer
    from buildseg.training.setup import resume_config

    run = tmp_path / "old"
    config = tiny_config(synth_data, run, epochs=1)
    config.model.decoder_channels = None
    config.model.decoder_width = 1.0  # what every run before decoder_width had
    Trainer(config).run()
    _downgrade_to_v1(run)

    seg = Segmenter.from_checkpoint(run, device="cpu", precision="fp32", engine="torch")  # predict
    assert seg.models[0].card.decoder_width == 1.0
    assert seg.predict(torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy()).shape == (64, 64)

    resumed = resume_config(run)  # resume: the same network, the same score, one more epoch
    resumed.train.epochs = 2
    trainer = Trainer(resumed, resume=run)
    assert trainer.card.decoder_width == 1.0 and trainer.epoch == 1 and trainer.best_score >= 0
    trainer.run()
    assert torch.load(run / "last.pt", weights_only=True)["schema"] == SCHEMA_VERSION

    again = load_config(tmp_path / "old" / "config.yaml")  # --config RUN/config.yaml (now version 2) and an old copy
    assert again.model.decoder_width == 1.0
    _downgrade_to_v1(run)
    assert load_config(run / "config.yaml").model.decoder_width == 1.0
