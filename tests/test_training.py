import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from buildseg.errors import BuildsegError
from buildseg.runtime.checkpoint import load_checkpoint
from buildseg.training.loop import Trainer, train
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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
    assert 0 <= result.best_score <= 1 and result.monitor == "dice"
    # best.pt holds what prediction needs, last.pt what resume needs: the shipped file is as small as its weights
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(last) and not {"optimizer", "scheduler", "scaler", "rng"} & set(payload)
    assert {"model", "model_card", "postprocess", "input", "schema"} <= set(payload)
    assert (tmp_path / "run" / "best.pt").stat().st_size < 0.7 * (tmp_path / "run" / "last.pt").stat().st_size
    assert last["best_score"] == result.best_score and last["monitor"] == "dice"


@pytest.mark.slow
def test_bf16_training_lowers_the_loss(synth_data, tmp_path):
    config = tiny_config(synth_data, tmp_path / "run", epochs=3, lr=3e-3, precision="bf16")
    config.data.crops_per_image = 4
    losses = [row["train_loss"] for row in train(config).history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.slow
def test_precision_auto_trains_in_bf16_where_the_cpu_has_it(synth_data, tmp_path, monkeypatch):
    """On an AMX / AVX512-BF16 CPU, --precision auto must really run the training forward in
    bf16 (and validate in it), not only name it: the decoder's activations are checked."""
    from buildseg.models.unet import DecoderBlock
    from buildseg.runtime import device

    seen = {"train": set(), "eval": set()}
    original = DecoderBlock.forward

    def recording(self, x, skip):
        out = original(self, x, skip)
        seen["train" if self.training else "eval"].add(out.dtype)
        return out

    monkeypatch.setattr(DecoderBlock, "forward", recording)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    config = tiny_config(synth_data, tmp_path / "run", epochs=1, precision="auto")
    trainer = Trainer(config)
    assert trainer.precision == "bf16"
    trainer.run()
    assert seen["train"] == {torch.bfloat16} and seen["eval"] == {torch.bfloat16}

    seen["train"].clear()
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)  # an AVX2 / AVX-512 CPU without bf16
    trainer = Trainer(tiny_config(synth_data, tmp_path / "run32", epochs=1, precision="auto"))
    assert trainer.precision == "fp32"
    trainer.run()
    assert seen["train"] == {torch.float32}


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_resume_mid_run_is_bit_exact(synth_data, tmp_path):
    def config(out):
        c = tiny_config(synth_data, out, epochs=2, deterministic=True, ema=0.9)
        c.data.crops_per_image = 3
        c.model.dropout = 0.2  # exercises the restored torch RNG
        c.data.augmentations = ["d4", "colour", "cutmix"]  # the batch-level mixing is seeded by the batch's place
        return c

    train(config(tmp_path / "straight"))

    interrupted = Trainer(config(tmp_path / "resumed"))
    assert interrupted.cutmix
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    from buildseg.runtime import checkpoint
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


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_leaves_a_loadable_last_pt(synth_data, tmp_path):
    out = tmp_path / "run"
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"), data=str(synth_data), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    payload = load_checkpoint(out / "last.pt")  # the first epoch's checkpoint, intact
    assert payload["epoch"] == 1
    result = Trainer(tiny_config(synth_data, out, epochs=2), resume=out).run()
    assert result.epochs_done == 2


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_training_without_tensorboard_installed_still_logs(synth_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    train(tiny_config(synth_data, tmp_path / "run"))
    assert (tmp_path / "run" / "history.csv").is_file() and not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_eager_errors_are_not_hidden_by_the_compile_fallback(synth_data, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(synth_data, tmp_path / "run", compile=True))
    assert trainer.compiled
    trainer.train_model = lambda images: (_ for _ in ()).throw(RuntimeError("compiled failure"))
    trainer.eager_model = lambda images: (_ for _ in ()).throw(ValueError("real model error"))
    with pytest.raises(ValueError, match="real model error"):
        trainer._forward(torch.zeros(1, 3, 64, 64))


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.slow
def test_torch_compile_trains_for_real(synth_data, tmp_path):
    trainer = Trainer(tiny_config(synth_data, tmp_path / "run", compile=True))
    result = trainer.run()
    assert trainer.compiled, "compile fell back to eager: see metrics.jsonl"
    assert all(math.isfinite(row["train_loss"]) for row in result.history)


def test_cpu_clock_counts_work_not_waiting():
    """The clock names map to the right time source (fake clocks: tests never measure time)."""
    from buildseg.training import schedule

    assert schedule.CLOCKS["wall"] is time.monotonic and schedule.CLOCKS["cpu"] is time.process_time
    ticks = iter([0.0, 0.5, 2.0])
    progress = schedule.Progress(100, 10.0, "wall")
    progress.clock = lambda: next(ticks)
    progress.restart_clock(1.0)  # resumed after 1 s of earlier training
    assert progress.now() == pytest.approx(1.5)  # 1 s before + 0.5 s on the clock since the restart
    assert progress.fraction() == pytest.approx(0.3)  # (1 + 2) s of the 10 s limit, more than 0 of 100 steps
    with pytest.raises(BuildsegError, match="time_limit_clock"):
        schedule.Progress(100, 10.0, "gpu")


@pytest.mark.slow
def test_time_limit_on_the_cpu_clock_stops_the_run(synth_data, tmp_path):
    result = train(tiny_config(synth_data, tmp_path / "run", epochs=1000, time_limit=0.05, time_limit_clock="cpu"))
    assert result.stopped_by == "time_limit" and "val_dice" in result.history[-1]


@pytest.mark.slow
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


# -- properties of the loop that a run of many hours depends on ----------------------------
@pytest.mark.slow
def test_best_pt_holds_the_ema_weights(synth_data, tmp_path):
    config = tiny_config(synth_data, tmp_path / "run", epochs=1, ema=0.5, lr=3e-3)
    train(config)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    ema = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
    assert ema.keys() == best["model"].keys()
    for key in ema:
        assert torch.equal(ema[key], best["model"][key]), key
    differs = [k for k in ema if ema[k].is_floating_point() and not torch.equal(ema[k], last["model"][k])]
    assert differs  # the EMA is not the raw weights


@pytest.mark.slow
def test_early_stopping_stops_after_patience(synth_data, tmp_path, monkeypatch):
    from buildseg.training import loop

    scores = iter([0.5, 0.4, 0.45, 0.3, 0.9, 0.9])
    real = loop.validate

    def fixed_scores(*args, **kwargs):
        summary = real(*args, **kwargs)
        return {**summary, "dice": next(scores)}

    monkeypatch.setattr(loop, "validate", fixed_scores)
    result = train(tiny_config(synth_data, tmp_path / "run", epochs=6, early_stopping=2))
    assert result.stopped_by == "early_stopping" and result.epochs_done == 3
    assert result.best_score == 0.5 and [r["val_dice"] for r in result.history] == [0.5, 0.4, 0.45]


@pytest.mark.slow
def test_monitor_f1_picks_best_pt_by_building_f1(synth_data, tmp_path, monkeypatch):
    from buildseg.training import loop

    scores = iter([(0.6, 0.2), (0.5, 0.7), (0.7, 0.4)])  # (dice, f1) per validation
    real = loop.validate

    def fixed_scores(*args, **kwargs):
        summary = real(*args, **kwargs)
        assert {"f1", "building_precision", "building_recall", "mean_iou"} <= set(summary)
        dice, f1 = next(scores)
        return {**summary, "dice": dice, "f1": f1}

    monkeypatch.setattr(loop, "validate", fixed_scores)
    result = train(tiny_config(synth_data, tmp_path / "run", epochs=3, monitor="f1"))
    assert result.best_score == 0.7 and [r["val_f1"] for r in result.history] == [0.2, 0.7, 0.4]
    assert len(torch.load(tmp_path / "run" / "best.pt", weights_only=False)["history"]) == 2  # saved at the 2nd validation


def _no_batch_norm(trainer):
    """Batch statistics differ between batches of 4 and 8; without them the two are comparable."""
    for _name, module in list(trainer.model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, child_name, torch.nn.Identity())
    return trainer


@pytest.mark.slow
def test_grad_accumulation_2x4_equals_batch_8(synth_data, tmp_path):
    def run(out, batch, accum):
        config = tiny_config(synth_data, out, epochs=1, batch_size=batch, grad_accum=accum, optimizer="sgd",
                             deterministic=True, lr=0.05, grad_clip=None)
        config.data.crops_per_image = 2  # 5 training images -> 10 crops -> one batch of 8 / two of 4
        config.data.augment = False
        trainer = _no_batch_norm(Trainer(config))
        trainer.run()
        assert trainer.progress.step == 1
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    start = _no_batch_norm(Trainer(tiny_config(synth_data, tmp_path / "s", epochs=1))).model.state_dict()
    big, accumulated = run(tmp_path / "b8", 8, 1), run(tmp_path / "a4", 4, 2)
    moved = 0
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], atol=2e-6, rtol=1e-5)
        moved += int(not torch.equal(big[key], start[key]))
    assert moved > 10  # the step really changed the weights


TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import tiny_config
    from buildseg.training.loop import train

    config = tiny_config(Path({data!r}), Path({out!r}), epochs=3, deterministic=True, save_every={save_every!r})
    config.data.crops_per_image = 6
    config.model.dropout = 0.2
    config.data.num_workers = {workers!r}
    print("stopped by", train(config).stopped_by, flush=True)
    """
)


def _resume_config(synth_data, out, save_every):
    config = tiny_config(synth_data, out, epochs=3, deterministic=True, save_every=save_every)
    config.data.crops_per_image = 6
    config.model.dropout = 0.2
    return config


def _wait_for(predicate, proc, timeout=300.0):
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _mid_epoch_checkpoint(path):
    def ready():
        try:
            payload = torch.load(path, weights_only=True)
        except Exception:  # not there yet (the write itself is atomic)
            return False
        return payload["step"] >= 4 and 0 < payload["batch_in_epoch"]
    return ready


def _interrupted_run(synth_data, out, save_every, sig, workers=0):
    script = TRAIN_SCRIPT.format(tests=str(REPO / "tests"), data=str(synth_data), out=str(out), save_every=save_every,
                                 workers=workers)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: signal it as a scheduler would
    try:
        if sig == signal.SIGTERM:  # as a scheduler would: some steps in
            ready = lambda: any('"kind": "step"' in line and '"step": 11' in line
                                for line in _read_lines(out / "metrics.jsonl"))
        else:
            ready = _mid_epoch_checkpoint(out / "last.pt")
        assert _wait_for(ready, proc), f"the run ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
        os.killpg(proc.pid, sig)  # the whole group, loader workers included
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, stderr


def _read_lines(path):
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _assert_same_weights(a_path, b_path):
    a, b = _weights(a_path), _weights(b_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(synth_data, tmp_path):
    train(_resume_config(synth_data, tmp_path / "straight", 10.0))
    code, stdout, stderr = _interrupted_run(synth_data, tmp_path / "killed", 10.0, signal.SIGTERM)
    assert code == 0 and "stopped by signal" in stdout, stderr[-2000:]
    stopped = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert 0 < stopped["step"] < load_checkpoint(tmp_path / "straight" / "last.pt")["step"]
    result = train(_resume_config(synth_data, tmp_path / "killed", 10.0), resume=tmp_path / "killed")
    assert result.epochs_done == 3
    _assert_same_weights(tmp_path / "straight" / "last.pt", tmp_path / "killed" / "last.pt")


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_still_saves(synth_data, tmp_path):
    """Schedulers and Ctrl-C signal the whole group: the workers must not die first."""
    code, stdout, stderr = _interrupted_run(synth_data, tmp_path / "killed", 10.0, signal.SIGTERM, workers=1)
    assert code == 0 and "stopped by signal" in stdout, stderr[-2000:]
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] > 0


@pytest.mark.slow
def test_kill_9_after_a_timed_checkpoint_resumes_mid_epoch_exactly(synth_data, tmp_path):
    train(_resume_config(synth_data, tmp_path / "straight", 10.0))
    save_every = 0.001  # minutes: a timed last.pt after nearly every step
    code, _, stderr = _interrupted_run(synth_data, tmp_path / "killed", save_every, signal.SIGKILL)
    assert code == -9, stderr[-2000:]
    stopped = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert stopped["batch_in_epoch"] > 0  # a mid-epoch checkpoint, not an epoch-end one
    result = train(_resume_config(synth_data, tmp_path / "killed", save_every), resume=tmp_path / "killed")
    assert result.epochs_done == 3
    _assert_same_weights(tmp_path / "straight" / "last.pt", tmp_path / "killed" / "last.pt")


@pytest.mark.slow
def test_encoder_lr_scale_and_a_time_based_one_cycle(synth_data, tmp_path):
    from buildseg.training.schedule import make_optimizer, one_cycle

    config = tiny_config(synth_data, tmp_path / "run", encoder_lr_scale=0.1, lr=1e-3)
    from buildseg.models import build_model
    from buildseg.training.setup import card_from_config

    model = build_model(card_from_config(config))
    optimizer = make_optimizer(config, model)
    encoder_ids = {id(p) for p in model.net.encoder.parameters()}
    for group in optimizer.param_groups:
        in_encoder = {id(p) in encoder_ids for p in group["params"]}
        assert len(in_encoder) == 1
        assert group["lr"] == pytest.approx(1e-4 if in_encoder.pop() else 1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    # one cycle over the run's fraction: 1/25 at the start, the peak at 30%, ~0 at the end
    assert one_cycle(0.0) == pytest.approx(1 / 25) and one_cycle(0.3) == pytest.approx(1.0)
    assert one_cycle(1.0) == pytest.approx(1 / 25e4) and one_cycle(0.15) < one_cycle(0.29) and one_cycle(0.5) > one_cycle(0.9)
    result = train(tiny_config(synth_data, tmp_path / "oc", scheduler="onecycle", time_limit=0.3, epochs=1000))
    lrs = [row["lr"] for row in result.history]
    assert result.stopped_by == "time_limit" and max(lrs) > 1e-4  # the cycle reached its peak within the time limit


@pytest.mark.slow
def test_frozen_encoder_norms_keep_their_statistics_and_affine(synth_data, tmp_path):
    config = tiny_config(synth_data, tmp_path / "run", epochs=1, lr=3e-3, freeze_encoder_norms=True)
    trainer = Trainer(config)
    encoder = trainer.model.net.encoder
    norms = {n: m for n, m in encoder.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in norms.items()}
    decoder_norms = [m for n, m in trainer.model.named_modules()
                     if isinstance(m, torch.nn.BatchNorm2d) and ".encoder." not in f".{n}."]
    decoder_before = [m.running_mean.clone() for m in decoder_norms]
    trainer.run()
    assert norms and decoder_norms
    for name, module in norms.items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)
    assert any(not torch.equal(m.running_mean, b) for m, b in zip(decoder_norms, decoder_before))  # the rest trains
    assert all(not p.requires_grad for m in norms.values() for p in m.parameters())


@pytest.mark.slow
def test_progressive_crops_grow_to_the_full_crop(synth_data, tmp_path):
    from buildseg.training.schedule import crop_side

    assert [crop_side(f, 128, 224) for f in (0.0, 0.1, 0.25, 0.45, 0.5, 0.9)] == [128, 128, 160, 192, 224, 224]
    assert crop_side(0.0, 256, 224) == 224
    config = tiny_config(synth_data, tmp_path / "run", epochs=4, lr=3e-3, progressive_crop=32)
    config.data.crops_per_image = 4
    trainer = Trainer(config)
    sides = []
    trainer.model.register_forward_pre_hook(lambda _m, args: sides.append(args[0].shape[-1]) if _m.training else None)
    trainer.run()
    assert sides[0] == 32 and sides[-1] == 64 and sides == sorted(sides)


@pytest.mark.slow
def test_the_process_exits_after_training_with_loader_workers_even_if_the_loader_outlives_train(synth_data, tmp_path):
    """Workers ignore SIGTERM, so a loader still alive at the interpreter's exit used to hang it
    (exit terminates leftover workers with SIGTERM, then waits for them). train() shuts its
    workers down itself; here a reference keeps the loader alive past train()."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from pathlib import Path
        from conftest import tiny_config
        import buildseg.training.loop as loop

        kept, real = [], loop.build_data
        loop.build_data = lambda *a, **k: kept.append(real(*a, **k)) or kept[-1]
        config = tiny_config(Path({str(synth_data)!r}), Path({str(tmp_path / "run")!r}))
        config.data.num_workers = 1
        loop.train(config)
        print("trained", flush=True)
        """
    )
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process did not exit after training: {(exc.stdout or b'')[-500:]!r}")
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-2000:]
