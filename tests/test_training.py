import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from buildseg.errors import BuildsegError
from buildseg.training.checkpoint import load_checkpoint
from buildseg.training.loop import Trainer, train
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_training_lowers_the_loss_and_writes_the_run(synth_data, tmp_path):
    config = tiny_config(synth_data, tmp_path / "run", epochs=4, lr=3e-3)
    config.data.crops_per_image = 4
    result = train(config)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    for name in ("best.pt", "last.pt", "config.yaml", "environment.json", "history.csv", "curves.png", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    payload = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert payload["model_card"]["encoder"] == "resnet18" and len(payload["model_card"]["mean"]) == 3
    assert 0 <= result.best_dice <= 1


def test_bf16_training_lowers_the_loss(synth_data, tmp_path):
    config = tiny_config(synth_data, tmp_path / "run", epochs=3, lr=3e-3, precision="bf16")
    config.data.crops_per_image = 4
    losses = [row["train_loss"] for row in train(config).history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_mid_run_is_bit_exact(synth_data, tmp_path):
    def config(out):
        c = tiny_config(synth_data, out, epochs=2, deterministic=True, ema=0.9)
        c.data.crops_per_image = 3
        c.model.dropout = 0.2  # exercises the restored torch RNG
        return c

    train(config(tmp_path / "straight"))

    interrupted = Trainer(config(tmp_path / "resumed"))
    original_step = interrupted._step
    calls = {"n": 0}

    def step_then_stop(*args, **kwargs):
        value = original_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == interrupted.batches_per_epoch + 1:  # stop inside epoch 2
            interrupted.stop.requested = True
        return value

    interrupted._step = step_then_stop
    assert interrupted.run().stopped_by == "signal"
    stopped = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert stopped["epoch"] == 1 and 0 < stopped["batch_in_epoch"] < interrupted.batches_per_epoch
    Trainer(config(tmp_path / "resumed"), resume=tmp_path / "resumed").run()

    a, b = _weights(tmp_path / "straight" / "last.pt"), _weights(tmp_path / "resumed" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_nonfinite_losses_are_skipped_then_abort(synth_data, tmp_path, monkeypatch):
    config = tiny_config(synth_data, tmp_path / "run", epochs=1, max_nonfinite=3)
    trainer = Trainer(config)
    real = trainer.criterion.forward
    calls = {"n": 0}

    def sometimes_nan(outputs, target):
        calls["n"] += 1
        value = real(outputs, target)
        return value * float("nan") if calls["n"] == 2 else value

    trainer.criterion.forward = sometimes_nan
    result = trainer.run()
    assert result.nonfinite_skipped == 1
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "run" / "last.pt").values() if v.is_floating_point())

    trainer = Trainer(tiny_config(synth_data, tmp_path / "run2", epochs=1, max_nonfinite=2))
    trainer.criterion.forward = lambda outputs, target: real(outputs, target) * float("nan")
    with pytest.raises(BuildsegError, match="non-finite"):
        trainer.run()


def test_time_limit_stops_with_validation_and_checkpoint(synth_data, tmp_path):
    config = tiny_config(synth_data, tmp_path / "run", epochs=1000, time_limit=0.05)
    result = train(config)
    assert result.stopped_by == "time_limit"
    assert (tmp_path / "run" / "last.pt").is_file() and "val_dice" in result.history[-1]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import tiny_config
    from buildseg.training import checkpoint
    from buildseg.training.loop import Trainer

    trainer = Trainer(tiny_config(Path({data!r}), Path({out!r}), epochs=3))
    real_save = torch.save
    saves = {{"n": 0}}

    def dying_save(obj, handle, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2:  # second checkpoint write: half the bytes, then SIGKILL
            handle.write(b"PK" + b"0" * 1000)
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, handle, *a, **k)

    checkpoint.torch.save = dying_save
    trainer.run()
    """
)


def test_sigkill_during_checkpoint_write_leaves_a_loadable_last_pt(synth_data, tmp_path):
    out = tmp_path / "run"
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"), data=str(synth_data), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    payload = load_checkpoint(out / "last.pt")  # the first epoch's checkpoint, intact
    assert payload["epoch"] == 1
    result = Trainer(tiny_config(synth_data, out, epochs=2), resume=out).run()
    assert result.epochs_done == 2


def test_torchrun_two_gloo_processes(synth_data, tmp_path):
    out = tmp_path / "ddp"
    cfg = tmp_path / "cfg.yaml"
    tiny_config(synth_data, out, epochs=2).save(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "buildseg",
           "train", "--config", str(cfg), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checks = [e for e in events if e["kind"] == "ddp_check"]
    assert len(checks) == 1  # one writer
    sums = checks[0]["weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert len([e for e in events if e["kind"] == "epoch"]) == 2
    assert proc.stdout.count("best val Dice") == 1
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_tensorboard_scalars_match_the_history(synth_data, tmp_path):
    pytest.importorskip("tensorboard")  # installed by the project's test setup (make)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny_config(synth_data, tmp_path / "run", epochs=2))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/train_loss", "epoch/lr", "train/loss", "train/lr", "train/loss_bce", "train/loss_dice"} <= tags
    for key in ("train_loss", "val_dice"):  # NaN values (no scored tile) are not written
        expected = [(row["step"], row[key]) for row in result.history if math.isfinite(row[key])]
        logged = [(e.step, e.value) for e in events.Scalars(f"epoch/{key}")] if f"epoch/{key}" in tags else []
        assert [s for s, _ in logged] == [s for s, _ in expected], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], abs=1e-6), key


def test_training_without_tensorboard_installed_still_logs(synth_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    train(tiny_config(synth_data, tmp_path / "run"))
    assert (tmp_path / "run" / "history.csv").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def test_failing_torch_compile_falls_back_to_eager(synth_data, tmp_path, monkeypatch):
    class Broken(torch.nn.Module):  # what a compiled model does without a working compiler: fail at first call
        def forward(self, images):
            raise RuntimeError("InductorError: no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Broken())
    result = train(tiny_config(synth_data, tmp_path / "run", epochs=2, compile=True))
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fallbacks = [e for e in events if e["kind"] == "compile_fallback"]
    assert len(fallbacks) == 1 and "no working C++ compiler" in fallbacks[0]["error"]
    assert all(math.isfinite(row["train_loss"]) for row in result.history)


def test_eager_errors_are_not_hidden_by_the_compile_fallback(synth_data, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(synth_data, tmp_path / "run", compile=True))
    assert trainer.compiled
    trainer.train_model = lambda images: (_ for _ in ()).throw(RuntimeError("compiled failure"))
    trainer.eager_model = lambda images: (_ for _ in ()).throw(ValueError("real model error"))
    with pytest.raises(ValueError, match="real model error"):
        trainer._forward(torch.zeros(1, 3, 64, 64))


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_torch_compile_trains_for_real(synth_data, tmp_path):
    trainer = Trainer(tiny_config(synth_data, tmp_path / "run", compile=True))
    result = trainer.run()
    assert trainer.compiled, "compile fell back to eager: see metrics.jsonl"
    assert all(math.isfinite(row["train_loss"]) for row in result.history)


def test_cpu_clock_counts_work_not_waiting():
    from buildseg.training.schedule import Progress

    wall, cpu = Progress(100, 10.0, "wall"), Progress(100, 10.0, "cpu")
    time.sleep(0.3)
    assert wall.now() >= 0.29 and cpu.now() < 0.1
    started = time.process_time()
    while time.process_time() - started < 0.3:
        pass
    assert cpu.now() >= 0.29
    with pytest.raises(BuildsegError, match="time_limit_clock"):
        Progress(100, 10.0, "gpu")


def test_time_limit_on_the_cpu_clock_stops_the_run(synth_data, tmp_path):
    result = train(tiny_config(synth_data, tmp_path / "run", epochs=1000, time_limit=0.05, time_limit_clock="cpu"))
    assert result.stopped_by == "time_limit" and "val_dice" in result.history[-1]


def test_loss_switches_at_the_scheduled_epoch(synth_data, tmp_path):
    config = tiny_config(synth_data, tmp_path / "run", epochs=2, switch_loss="lovasz", switch_loss_epoch=1)
    config.data.crops_per_image = 6
    train(config)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    parts = {e["epoch"]: set(e["parts"]) for e in steps if e["kind"] == "step"}
    assert parts[0] == {"bce", "dice"} and parts[1] == {"lovasz"}


@pytest.mark.parametrize("switch", [{"switch_loss": "lovasz"}, {"switch_loss": "lovasz", "switch_loss_epoch": -1},
                                    {"switch_loss": "lovaz", "switch_loss_epoch": 1}])
def test_bad_loss_switch_fails_before_training(synth_data, tmp_path, switch):
    with pytest.raises(BuildsegError, match="switch|lovaz"):
        Trainer(tiny_config(synth_data, tmp_path / "run", **switch))
