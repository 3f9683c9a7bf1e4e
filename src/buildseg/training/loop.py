"""The training loop: one screenful of explicit steps, in the spirit of nanoGPT.

data -> model (bf16 autocast, channels_last) -> loss (deep supervision aware) -> AdamW/SGD
step (accumulation, clipping, EMA) -> validation on grid tiles with the competition Dice
-> atomic ``last.pt`` / ``best.pt``. Everything built before the first step lives in
``training/setup.py``; the schedule in ``training/schedule.py``.

What a long run can count on: ``last.pt`` is written every ``save_every`` minutes
(default 10) at an optimizer-step boundary, at the end of each epoch, and on
SIGINT/SIGTERM; ``--resume`` continues mid-epoch with the same batches, so the result
equals that of a run never interrupted. Validation and ``best.pt`` come once per epoch,
or every ``val_every`` optimizer steps for long epochs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from buildseg import __version__
from buildseg.config import Config
from buildseg.data.mixing import cut_mix
from buildseg.distributed import all_gather, any_true, barrier, cleanup, device_for, init_distributed
from buildseg.errors import BuildsegError
from buildseg.models.factory import SegmentationModel
from buildseg.runtime.checkpoint import load_checkpoint, prediction_payload, rng_state, save_atomic, set_rng_state
from buildseg.runtime.device import autocast, resolve_device, resolve_precision, seed_everything
from buildseg.training.init import apply_init
from buildseg.training.logs import RunLog
from buildseg.training.schedule import Progress, crop_side, make_optimizer, make_scheduler
from buildseg.training.setup import (
    build_data,
    build_training_model,
    card_from_config,
    check_bands_config,
    environment_info,
    freeze_encoder_norms,
    input_bands,
    loss_schedule,
    resume_config,
    wrap_for_training,
)
from buildseg.training.signals import StopFlag, shut_down_workers
from buildseg.training.validate import validate

log = logging.getLogger("buildseg")
__all__ = ["Trainer", "TrainResult", "train", "resume_config"]


@dataclass
class TrainResult:
    run_dir: Path
    best_score: float  # the best value of the monitored score (``monitor``)
    monitor: str  # "dice" (competition Dice) or "f1" (building F1 at IoU 0.5), as --monitor
    epochs_done: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = "epochs"
    nonfinite_skipped: int = 0
    val_set: Any = field(default=None, repr=False)  # the validation tiles, for tuning after training
    train_set: Any = field(default=None, repr=False)  # the training samples, for int8 calibration after training
    is_main: bool = True  # this process is rank 0 (DistInfo.is_main): it prints and tunes


def _resume_payload(config: Config, resume: str | Path | None) -> dict | None:
    """RUN/last.pt's payload when resuming (the run folder becomes train.out), else None."""
    if resume is None:
        return None
    if not (Path(resume) / "last.pt").is_file():
        raise BuildsegError(f"cannot resume: {Path(resume) / 'last.pt'} does not exist")
    config.train.out = str(resume)
    return load_checkpoint(Path(resume) / "last.pt")


class Trainer:
    def __init__(self, config: Config, resume: str | Path | None = None) -> None:
        payload = _resume_payload(config, resume)
        self.config, t = config, config.train
        if not config.data.train:
            raise BuildsegError("no training data: pass --data CSV|DIR (or data.train in the config)")
        if not t.out:
            raise BuildsegError("no run folder: pass --out RUN_DIR (or train.out in the config)")
        check_bands_config(config)
        self.dist = init_distributed(t.device)
        self.device = device_for(self.dist, resolve_device(t.device))
        self.precision = resolve_precision(t.precision, self.device)
        self.run_dir = Path(t.out)
        self.log = RunLog(self.run_dir, enabled=self.dist.is_main, tensorboard=t.tensorboard)
        seed_everything(t.seed, t.deterministic)
        init = None if payload else apply_init(config)  # before the data: the init's GSD may become data.gsd
        data = build_data(config, self.dist, self.device)
        # a few-label fine-tune is not re-tuned on its own tiles: it keeps the init's post-processing
        self.init_postprocess = (init or {}).get("postprocess") if not config.train.tune_at_end else None
        self.train_set, self.val_set, self.sampler, self.loader = data.train_set, data.val_set, data.sampler, data.loader
        self.scenes = data.scenes
        self.cutmix = config.data.augment and "cutmix" in config.data.augmentations
        self.card = card_from_config(config)
        self.model: SegmentationModel = build_training_model(config, self.card, self.dist, self.device, resumed=payload,
                                                             init=init)
        self.frozen_norms = (freeze_encoder_norms(self.model, everywhere=t.freeze_all_norms)
                             if t.freeze_encoder_norms or t.freeze_all_norms else [])
        self.ema = None
        if t.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(float(t.ema)), use_buffers=True)
        self.train_model = self.eager_model = wrap_for_training(self.model, self.dist, self.device)
        self.compiled = False
        if t.compile:
            try:
                self.train_model, self.compiled = torch.compile(self.train_model), True
            except Exception as exc:  # compile support varies by platform; eager always works
                log.warning("torch.compile unavailable (%s); training eagerly", exc)
        self.criteria = loss_schedule(config)
        self.criterion = self.criteria[0]
        self.optimizer = make_optimizer(config, self.model)
        self.batches_per_epoch = len(self.loader)
        steps_per_epoch = math.ceil(len(self.loader) / t.grad_accum)
        self.progress = Progress(steps_per_epoch * t.epochs, t.time_limit * 60 if t.time_limit else None, t.time_limit_clock)
        self.scheduler = make_scheduler(config, self.optimizer, self.progress)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.epoch = self.batch_in_epoch = 0
        self.best_score = -1.0  # of the monitored score (--monitor)
        self.history: list[dict[str, Any]] = []
        self.nonfinite_total = self.nonfinite_run = self.bad_epochs = 0
        self.epoch_loss = [0.0, 0]  # sum and count of this epoch's losses (kept across a resume)
        self.seen, self.seen_since = 0, time.monotonic()  # images since the last validation, for img/s
        self.data_wait = 0.0  # seconds spent waiting for the loader since the last validation
        self.val_cost: float | None = None  # one validation, on the time limit's clock
        self.stopped_by: str | None = None
        self.stop = StopFlag()
        self.last_save = time.monotonic()
        if payload:
            self._restore(payload)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        self._write_run_files()
        with self.stop:
            while self.epoch < self.config.train.epochs and self.stopped_by is None:
                self._train_epoch()
        self._check_replicas()
        barrier(self.dist)
        return TrainResult(self.run_dir, self.best_score, self.config.train.monitor, self.epoch, self.history,
                           self.stopped_by or "epochs", self.nonfinite_total, self.val_set, is_main=self.dist.is_main,
                           train_set=self.train_set)

    def _train_epoch(self) -> None:
        t = self.config.train
        self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * t.batch_size)
        self._pick_loss()
        self._train_mode()
        bar = tqdm(self._timed(self.loader), total=len(self.loader), desc=f"epoch {self.epoch + 1}/{t.epochs}",
                   disable=not (self.dist.is_main and t.progress), leave=False)
        for images, masks in bar:
            self.batch_in_epoch += 1
            boundary = self.batch_in_epoch % t.grad_accum == 0 or self.batch_in_epoch == self.batches_per_epoch
            value = self._step(images, masks, accumulate=not boundary)
            if not self._record(value, len(images), bar) or not boundary:
                continue
            if any_true(self.stop.requested, self.dist):  # save and stop, mid-epoch
                self.save(best=False)
                self.stopped_by = "signal"
                bar.close()
                return
            if any_true(self.progress.out_of_time(self.val_cost), self.dist):
                self.stopped_by = "time_limit"
                break
            if t.val_every and self.progress.step % t.val_every == 0:
                self._after_validation(self._validate(partial=True))
                self._train_mode()
                if self.stopped_by:
                    break
            elif t.save_every and time.monotonic() - self.last_save >= t.save_every * 60:
                self.save(best=False)  # a timed checkpoint: a kill now loses minutes, not an epoch
        bar.close()
        if self.stopped_by == "early_stopping":
            return
        complete = self.stopped_by is None
        record = self._validate(partial=not complete)
        if complete:
            self.epoch, self.batch_in_epoch, self.epoch_loss = self.epoch + 1, 0, [0.0, 0]
        self._after_validation(record)

    def _train_mode(self) -> None:
        self.train_model.train()
        for module in self.frozen_norms:
            module.eval()

    def _progressive_crop(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``progressive_crop``: a random window of the batch, its side growing with the
        run's fraction (schedule.crop_side). The offset is seeded by the step, so a resumed run
        crops the same way."""
        full = min(images.shape[-2:])
        side = crop_side(self.progress.fraction(), self.config.train.progressive_crop, full)
        if side >= full:
            return images, masks
        rng = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + self.progress.step)
        y = int(torch.randint(0, images.shape[-2] - side + 1, (1,), generator=rng))
        x = int(torch.randint(0, images.shape[-1] - side + 1, (1,), generator=rng))
        return images[..., y:y + side, x:x + side], masks[..., y:y + side, x:x + side]

    def _batch_generator(self, *, salt: int) -> torch.Generator:
        """A generator seeded by the run's seed, this rank and this batch's place in the run
        (epoch, batch): a resumed run draws what the uninterrupted one drew."""
        key = [self.config.train.seed, salt, self.dist.rank, self.epoch, self.batch_in_epoch]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))

    def _step(self, images: torch.Tensor, masks: torch.Tensor, accumulate: bool) -> float | None:
        """One forward/backward; an optimizer step unless ``accumulate``. None: non-finite loss, skipped."""
        t = self.config.train
        if t.progressive_crop:
            images, masks = self._progressive_crop(images, masks)
        if self.cutmix:
            images, masks = cut_mix(images, masks, generator=self._batch_generator(salt=1))
        images, masks = images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            outputs = self._forward(images)
        loss = self.criterion(outputs, masks)
        if any_true(not bool(torch.isfinite(loss).item()), self.dist):  # skip on every rank together
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.scaler.scale(loss / t.grad_accum).backward()
        if not accumulate:
            if t.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.step += 1
            if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step()
            if self.ema:
                self.ema.update_parameters(self.model)
        return float(loss.detach())

    # -- bookkeeping -------------------------------------------------------------------
    def _timed(self, loader):
        """The loader's batches; the time spent waiting for each is added to ``data_wait``."""
        batches = iter(loader)
        while True:
            started = time.monotonic()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.data_wait += time.monotonic() - started
            yield batch

    def _wait_fraction(self) -> float:
        return self.data_wait / max(1e-9, time.monotonic() - self.seen_since)

    def _record(self, value: float | None, batch: int, bar) -> bool:
        """Count a step's loss (False for a skipped non-finite one; too many in a row abort)."""
        if value is None:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.progress.step, self.nonfinite_run)
            if self.nonfinite_run >= self.config.train.max_nonfinite:
                raise BuildsegError(
                    f"{self.nonfinite_run} non-finite losses in a row: training diverged. last.pt keeps the last good "
                    "state; lower --lr, use --precision fp32 or check the data")
            return False
        self.nonfinite_run = 0
        self.epoch_loss = [self.epoch_loss[0] + value, self.epoch_loss[1] + 1]
        self.seen += batch * self.dist.world_size
        rate = self.seen / max(1e-9, time.monotonic() - self.seen_since)
        lr = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.1f}", lr=f"{lr:.2e}")
        if self.progress.step % 10 == 1:  # steps 1, 11, 21, ...: a short run still logs some
            parts = {k: float(v) for k, v in getattr(self.criterion.base, "parts", {}).items()}
            self.log.event({"kind": "step", "epoch": self.epoch, "step": self.progress.step, "loss": value,
                            "parts": parts, "lr": lr, "img_s": rate, "data_wait": self._wait_fraction()})
        return True

    def _pick_loss(self) -> None:
        switch = self.config.train.switch_loss_epoch
        criterion = self.criteria[1] if switch is not None and self.epoch >= switch else self.criteria[0]
        if criterion is not self.criterion:
            log.info("epoch %d: loss switches to %s", self.epoch + 1, self.config.train.switch_loss)
            self.criterion = criterion

    def _forward(self, images: torch.Tensor) -> Any:
        """The training forward; a compiled model that fails falls back to eager for good.

        torch.compile is lazy: a missing C++ compiler or an unsupported op only shows at the
        first call (or at a recompile for a new shape). The same batch is then retried
        eagerly; if eager fails too, that error is the real one and propagates.
        """
        if not self.compiled:
            return self.train_model(images)
        try:
            return self.train_model(images)
        except Exception as exc:
            outputs = self.eager_model(images)
            self.train_model, self.compiled = self.eager_model, False
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("torch.compile failed (%s: %s); training continues eagerly", type(exc).__name__, first_line[:200])
            self.log.event({"kind": "compile_fallback", "step": self.progress.step, "error": f"{type(exc).__name__}: {first_line[:500]}"})
            return outputs

    def _validate(self, partial: bool) -> dict[str, Any]:
        t = self.config.train
        started, clock_started = time.monotonic(), self.progress.clock()
        train_seconds = started - self.seen_since
        summary = validate(self.ema.module if self.ema else self.model, self.val_set, self.device, self.precision,
                           t.batch_size, t.threshold, t.channels_last, self.dist)
        self.val_cost = self.progress.clock() - clock_started
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and not math.isnan(summary["dice"]):
            self.scheduler.step(summary["dice"])
        record = {
            "epoch": self.epoch + 1, "partial": partial, "step": self.progress.step,
            "train_loss": self.epoch_loss[0] / self.epoch_loss[1] if self.epoch_loss[1] else math.nan,
            "val_dice": summary["dice"], "val_iou": summary["iou"], "val_n_scored": summary["n_scored"],
            "val_f1": summary["f1"], "val_building_precision": summary["building_precision"],
            "val_building_recall": summary["building_recall"],
            "val_empty_fp_rate": summary["empty_fp_rate"], "lr": max(g["lr"] for g in self.optimizer.param_groups),
            "train_img_s": self.seen / max(train_seconds, 1e-9), "train_seconds": train_seconds,
            "val_seconds": time.monotonic() - started, "nonfinite_skipped": self.nonfinite_total,
            "data_wait": self.data_wait / max(train_seconds, 1e-9),
        }
        record.update({f"val_dice/{source or '(no source)'}": dice for source, dice in summary["dice_by_source"].items()})
        self.history.append(record)
        self.log.event({"kind": "epoch", **record})
        self.log.write_history(self.history)
        if self.dist.is_main:
            log.info("epoch %d%s: loss %.4f, val Dice %.4f (%d scored of %d tiles), empty-tile FP rate %.2f, "
                     "building F1 %.4f, %.1f img/s, %.0f%% waiting for data", record["epoch"],
                     " (partial)" if partial else "", record["train_loss"], summary["dice"], summary["n_scored"],
                     summary["n"], summary["empty_fp_rate"], summary["f1"], record["train_img_s"],
                     100 * record["data_wait"])
            for source, dice in summary["dice_by_source"].items():
                log.info("  val Dice %.4f  %s", dice, source or "(no source)")
            if record["data_wait"] > 0.3 and train_seconds > 10:
                log.warning("the loader, not the model, bounds the step rate: %.0f%% of the training time waited for "
                            "data; raise --num-workers or use --cache disk|ram", 100 * record["data_wait"])
        self.seen, self.seen_since, self.data_wait = 0, time.monotonic(), 0.0
        return record

    def _after_validation(self, record: dict[str, Any]) -> None:
        """best.pt on improvement of the monitored score (``--monitor dice|f1``), last.pt always;
        early stopping counts validations without one."""
        score = record["val_f1" if self.config.train.monitor == "f1" else "val_dice"]
        improved = score > self.best_score if not math.isnan(score) else self.best_score < 0
        improved = improved or self.config.train.keep_last
        if improved:
            self.best_score, self.bad_epochs = (0.0 if math.isnan(score) else score), 0
        else:
            self.bad_epochs += 1
        self.save(best=improved)
        patience = self.config.train.early_stopping
        if patience and self.bad_epochs >= patience and self.stopped_by is None:
            self.stopped_by = "early_stopping"
            log.info("no %s improvement in %d validations: early stop", self.config.train.monitor, self.bad_epochs)

    def _write_run_files(self) -> None:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(self.run_dir / "config.yaml")
            (self.run_dir / "environment.json").write_text(json.dumps(environment_info(), indent=2))
            if self.scenes is not None:  # per-scene grid and stretch: what prediction will apply
                (self.run_dir / "scenes.json").write_text(json.dumps(self.scenes, indent=2))
        barrier(self.dist)
        t = self.config.train
        log.info("training %s/%s on %s (%s%s), %d train crops/epoch, %d val tiles", self.card.arch, self.card.encoder,
                 self.device, self.precision, ", channels_last" if t.channels_last else "", len(self.train_set), len(self.val_set))

    def _check_replicas(self) -> None:
        """Under torchrun all ranks must hold the same weights; record the check."""
        if self.dist.enabled:
            checksum = torch.tensor([sum(float(p.double().sum()) for p in self.model.parameters())], dtype=torch.float64)
            sums = [float(g) for g in all_gather(checksum, self.dist)]
            self.log.event({"kind": "ddp_check", "weight_checksums": sums})

    # -- checkpoints -------------------------------------------------------------------
    # The one list of what last.pt saves and resume restores: objects with a state_dict, by
    # payload key, and plain counters (Trainer attributes of the same name). best.pt keeps the
    # part prediction needs (runtime/checkpoint.py PREDICTION_KEYS).
    COUNTERS = ("epoch", "batch_in_epoch", "best_score", "bad_epochs", "history", "epoch_loss")

    def _stateful(self) -> dict[str, Any]:
        scheduler = self.scheduler if hasattr(self.scheduler, "state_dict") else None  # "none": a lambda schedule
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scheduler": scheduler,
                "scaler": self.scaler}

    def _payload(self) -> dict[str, Any]:
        return {
            **{key: obj.state_dict() if obj is not None else None for key, obj in self._stateful().items()},
            **{name: copy.deepcopy(getattr(self, name)) for name in self.COUNTERS},
            "step": self.progress.step, "elapsed": self.progress.now(), "rng": rng_state(),
            "model_card": self.card.to_dict(), "config": self.config.to_dict(), "monitor": self.config.train.monitor,
            "postprocess": self.init_postprocess or {"threshold": self.config.train.threshold, "min_area": 0},
            "buildseg_version": __version__,
            "input": {"gsd": self.config.data.gsd, "bands": input_bands(self.config)},  # GeoTIFF prediction reads alike
        }

    def _restore(self, payload: dict[str, Any]) -> None:
        for key, obj in self._stateful().items():
            if obj is None or payload.get(key) is None:
                continue
            try:
                obj.load_state_dict(payload[key])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise BuildsegError(f"cannot resume: the {key} state in last.pt does not fit this run (its config.yaml "
                                    f"or this buildseg's parameter groups: {str(exc)[:200]}); start a new run from "
                                    "best.pt's weights instead") from None
        for name in self.COUNTERS:
            setattr(self, name, copy.deepcopy(payload[name]))
        self.progress.step = payload["step"]
        self.progress.restart_clock(payload["elapsed"])
        set_rng_state(payload["rng"])
        log.info("resumed from epoch %d, batch %d, step %d", self.epoch, self.batch_in_epoch, self.progress.step)

    def save(self, best: bool) -> None:
        self.last_save = time.monotonic()
        if not self.dist.is_main:
            return
        payload = self._payload()
        save_atomic(payload, self.run_dir / "last.pt")
        if best:
            weights = self.ema.module.state_dict() if self.ema else payload["model"]  # best.pt predicts with the EMA
            save_atomic({**prediction_payload(payload), "model": weights}, self.run_dir / "best.pt")


def train(config: Config, resume: str | Path | None = None) -> TrainResult:
    trainer = Trainer(config, resume)
    try:
        return trainer.run()
    finally:
        shut_down_workers(trainer.loader)
        trainer.log.close()
        cleanup(trainer.dist)
