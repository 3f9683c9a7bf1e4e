"""The training loop: one screenful of explicit steps, in the spirit of nanoGPT.

data -> model (bf16 autocast, channels_last) -> loss (deep supervision aware) -> AdamW/SGD
step (accumulation, clipping, EMA) -> validation on grid tiles with the competition Dice
-> atomic ``last.pt`` / ``best.pt``. SIGINT/SIGTERM and ``--time-limit`` end the run at
a step boundary with a checkpoint that ``--resume`` continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from buildseg import __version__
from buildseg.config import Config, config_from_dict
from buildseg.data.datasets import EpochSampler, GridTileDataset, TrainCropDataset, split_records
from buildseg.errors import BuildsegError
from buildseg.formats.tables import load_records
from buildseg.losses import DeepSupervisionLoss, parse_loss
from buildseg.models.factory import ModelCard, SegmentationModel, build_model
from buildseg.training import distributed as ddp
from buildseg.training.checkpoint import FORMAT, load_checkpoint, rng_state, save_atomic, set_rng_state
from buildseg.training.hardware import autocast, default_workers, resolve_device, resolve_precision, seed_everything
from buildseg.training.logs import RunLog
from buildseg.training.validate import validate

log = logging.getLogger("buildseg")


@dataclass
class TrainResult:
    run_dir: Path
    best_dice: float
    epochs_done: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = "epochs"
    nonfinite_skipped: int = 0


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps and saves before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %s: finishing the current step, saving last.pt, then stopping", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def card_from_config(config: Config) -> ModelCard:
    """The model card of the configured model (config-only keys such as ``weights`` dropped)."""
    return ModelCard.from_dict(asdict(config.model))


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = config.train
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)  # no decay on norms and biases
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, nesterov=True)
    raise BuildsegError(f"unknown optimizer {t.optimizer!r}; use adamw or sgd")


CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


class Progress:
    """Fraction of the run done: by steps, or by time when a time limit is set.

    The ``cpu`` clock counts CPU seconds of the training process (all its threads, not the
    loader workers), so a time budget buys the same work on a machine shared with other
    jobs: what a fair comparison of configurations needs (benchmarks/ablation.py).
    """

    def __init__(self, total_steps: int, time_limit_s: float | None, clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise BuildsegError(f"unknown time_limit_clock {clock!r}; use {' or '.join(CLOCKS)}")
        self.total_steps = max(1, total_steps)
        self.time_limit_s = time_limit_s
        self.clock = CLOCKS[clock]
        self.step = 0
        self.elapsed = 0.0  # training seconds on this clock, carried over on resume
        self._started = self.clock()

    def now(self) -> float:
        return self.elapsed + self.clock() - self._started

    def restart_clock(self, elapsed: float) -> None:
        self.elapsed = elapsed
        self._started = self.clock()

    def fraction(self) -> float:
        done = self.step / self.total_steps
        if self.time_limit_s:
            done = max(done, self.now() / self.time_limit_s)
        return min(1.0, done)


def make_scheduler(config: Config, optimizer, progress: Progress):
    t = config.train
    warmup = max(1, t.warmup_steps)
    if t.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, total_steps=progress.total_steps + 1)
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    if t.scheduler not in ("cosine", "none"):
        raise BuildsegError(f"unknown scheduler {t.scheduler!r}; use cosine, onecycle, plateau or none")
    cosine = t.scheduler == "cosine"

    def factor(_: int) -> float:
        ramp = min(1.0, (progress.step + 1) / warmup)
        return ramp * (0.5 * (1 + math.cos(math.pi * progress.fraction())) if cosine else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def environment_info() -> dict[str, Any]:
    import albumentations
    import numpy
    import timm

    commit = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "buildseg": __version__, "git_commit": commit, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "timm": timm.__version__, "albumentations": albumentations.__version__,
        "numpy": numpy.__version__, "argv": sys.argv,
    }


class Trainer:
    def __init__(self, config: Config, resume: str | Path | None = None) -> None:
        self.resume_payload = None
        if resume is not None:
            run_dir = Path(resume)
            if not (run_dir / "last.pt").is_file():
                raise BuildsegError(f"cannot resume: {run_dir / 'last.pt'} does not exist")
            config.train.out = str(run_dir)
            self.resume_payload = load_checkpoint(run_dir / "last.pt")
        self.config = config
        t = config.train
        if not config.data.train:
            raise BuildsegError("no training data: pass --data CSV|DIR (or data.train in the config)")
        if not t.out:
            raise BuildsegError("no run folder: pass --out RUN_DIR (or train.out in the config)")
        self.dist = ddp.init_distributed(t.device)
        self.device = ddp.device_for(self.dist, resolve_device(t.device))
        self.precision = resolve_precision(t.precision, self.device)
        self.run_dir = Path(t.out)
        self.log = RunLog(self.run_dir, enabled=self.dist.is_main, tensorboard=t.tensorboard)
        seed_everything(t.seed, t.deterministic)

        records = load_records(config.data.train, require_masks=True)
        if config.data.val:
            train_records, val_records = records, load_records(config.data.val, require_masks=True)
        else:
            train_records, val_records = split_records(records, config.data.val_fraction, t.seed)
            if len(records) < 2:
                log.warning("only one training image: validating on the training image itself")
        self.train_set = TrainCropDataset(train_records, config.data.crop_size, config.data.crops_per_image, config.data.augment, t.seed)
        self.val_set = GridTileDataset(val_records, config.data.val_tile)
        self.sampler = EpochSampler(self.train_set, t.seed, self.dist.rank, self.dist.world_size)
        workers = default_workers(config.data.num_workers)
        self.loader = DataLoader(
            self.train_set, batch_size=t.batch_size, sampler=self.sampler, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=self.device.type == "cuda", drop_last=len(self.sampler) >= t.batch_size,
            generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG (dropout) independent of loader restarts
        )
        if len(self.loader) == 0:
            raise BuildsegError(f"the training set yields no batch ({len(self.train_set)} samples, batch size {t.batch_size})")

        self.card = card_from_config(config)
        weights = "none" if self.resume_payload else config.model.weights
        model = build_model(self.card, weights).to(self.device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if t.sync_bn and self.dist.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model: SegmentationModel = model
        self.ema = None
        if t.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(t.ema)), use_buffers=True)
        self.train_model: nn.Module = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.eager_model = self.train_model
        self.compiled = False
        if t.compile:
            try:
                self.train_model = torch.compile(self.train_model)
                self.compiled = True
            except Exception as exc:  # compile support varies by platform; eager always works
                log.warning("torch.compile unavailable (%s); training eagerly", exc)
        self.criteria = self._loss_schedule(config)
        self.criterion = self.criteria[0]
        self.optimizer = make_optimizer(config, model)
        self.batches_per_epoch = len(self.loader)
        steps_per_epoch = math.ceil(len(self.loader) / t.grad_accum)
        self.progress = Progress(steps_per_epoch * t.epochs, t.time_limit * 60 if t.time_limit else None, t.time_limit_clock)
        self.scheduler = make_scheduler(config, self.optimizer, self.progress)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_dice = -1.0
        self.history: list[dict[str, Any]] = []
        self.nonfinite_total = 0
        self.bad_epochs = 0
        self.val_seconds: float | None = None
        self.val_cost: float | None = None  # one validation, on the time limit's clock
        self.stop = StopFlag()
        if self.resume_payload:
            self._restore(self.resume_payload)

    # -- checkpoints -------------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_card": self.card.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,  # includes n_averaged
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if hasattr(self.scheduler, "state_dict") else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.progress.step,
            "elapsed": self.progress.now(),
            "best_dice": self.best_dice,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "postprocess": {"threshold": self.config.train.threshold, "min_area": 0},
            "buildseg_version": __version__,
        }

    def _restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        if self.ema and payload.get("ema"):
            self.ema.load_state_dict(payload["ema"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if payload.get("scheduler") and hasattr(self.scheduler, "load_state_dict"):
            self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.epoch = payload["epoch"]
        self.batch_in_epoch = payload["batch_in_epoch"]
        self.progress.step = payload["step"]
        self.progress.restart_clock(payload["elapsed"])
        self.best_dice = payload["best_dice"]
        self.bad_epochs = payload.get("bad_epochs", 0)
        self.history = list(payload["history"])
        set_rng_state(payload["rng"])
        log.info("resumed from epoch %d, batch %d, step %d", self.epoch, self.batch_in_epoch, self.progress.step)

    def save(self, best: bool) -> None:
        if not self.dist.is_main:
            return
        payload = self._payload()
        save_atomic(payload, self.run_dir / "last.pt")
        if best:
            if self.ema:  # best.pt predicts with the EMA weights
                payload = {**payload, "model": self.ema.module.state_dict()}
            save_atomic(payload, self.run_dir / "best.pt")

    @staticmethod
    def _loss_schedule(config: Config) -> list[DeepSupervisionLoss]:
        """[loss] or [loss, switch_loss]; both parsed now, so a typo fails before training."""
        t = config.train
        criteria = [DeepSupervisionLoss(parse_loss(config.loss), config.model.ds_weights)]
        if (t.switch_loss is None) != (t.switch_loss_epoch is None):
            raise BuildsegError("a loss switch needs both --switch-loss LOSS and --switch-loss-epoch N")
        if t.switch_loss is not None:
            if t.switch_loss_epoch < 0:
                raise BuildsegError(f"--switch-loss-epoch must be >= 0, got {t.switch_loss_epoch}")
            criteria.append(DeepSupervisionLoss(parse_loss(t.switch_loss), config.model.ds_weights))
        return criteria

    def _criterion_for(self, epoch: int) -> DeepSupervisionLoss:
        switch = self.config.train.switch_loss_epoch
        return self.criteria[1] if switch is not None and epoch >= switch else self.criteria[0]

    # -- the loop ----------------------------------------------------------------------
    def _step(self, images: torch.Tensor, masks: torch.Tensor, accumulate: bool) -> float | None:
        t = self.config.train
        images = images.to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            outputs = self._forward(images)
        loss = self.criterion(outputs, masks)
        finite = bool(torch.isfinite(loss).item())
        if ddp.broadcast_flag(not finite, self.dist):  # skip on every rank together
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

    def _out_of_time(self) -> bool:
        limit = self.progress.time_limit_s
        if not limit:
            return False
        reserve = self.val_cost if self.val_cost is not None else 0.05 * limit
        return self.progress.now() + reserve >= limit

    def run(self) -> TrainResult:
        t = self.config.train
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(self.run_dir / "config.yaml")
            (self.run_dir / "environment.json").write_text(json.dumps(environment_info(), indent=2))
        ddp.barrier(self.dist)
        log.info(
            "training %s/%s on %s (%s%s), %d train crops/epoch, %d val tiles",
            self.card.arch, self.card.encoder, self.device, self.precision, ", channels_last" if t.channels_last else "",
            len(self.train_set), len(self.val_set),
        )
        stopped_by = "epochs"
        nonfinite_run = 0
        with self.stop as stop:
            while self.epoch < t.epochs:
                self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * t.batch_size)
                criterion = self._criterion_for(self.epoch)
                if criterion is not self.criterion:
                    log.info("epoch %d: loss switches to %s", self.epoch + 1, t.switch_loss)
                    self.criterion = criterion
                self.train_model.train()
                losses, seen, started = [], 0, time.monotonic()
                bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{t.epochs}", disable=not (self.dist.is_main and t.progress), leave=False)
                halt = None
                for images, masks in bar:
                    self.batch_in_epoch += 1
                    accumulate = self.batch_in_epoch % t.grad_accum != 0 and self.batch_in_epoch < self.batches_per_epoch
                    value = self._step(images, masks, accumulate)
                    if value is None:
                        self.nonfinite_total += 1
                        nonfinite_run += 1
                        log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.progress.step, nonfinite_run)
                        if nonfinite_run >= t.max_nonfinite:
                            raise BuildsegError(
                                f"{nonfinite_run} non-finite losses in a row: training diverged. last.pt keeps the last good "
                                "state; lower --lr, use --precision fp32 or check the data"
                            )
                        continue
                    nonfinite_run = 0
                    losses.append(value)
                    seen += len(images) * self.dist.world_size
                    rate = seen / max(1e-9, time.monotonic() - started)
                    bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.1f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                    if self.progress.step % 10 == 1:  # steps 1, 11, 21, ...: a short run still logs some
                        parts = {k: float(v) for k, v in getattr(self.criterion.base, "parts", {}).items()}
                        self.log.event({"kind": "step", "epoch": self.epoch, "step": self.progress.step, "loss": value,
                                        "parts": parts, "lr": self.optimizer.param_groups[0]["lr"], "img_s": rate})
                    if ddp.broadcast_flag(stop.requested, self.dist):
                        halt = "signal"
                        break
                    if ddp.broadcast_flag(self._out_of_time(), self.dist):
                        halt = "time_limit"
                        break
                bar.close()
                epoch_done = halt is None
                train_seconds = time.monotonic() - started
                if halt == "signal":
                    self.save(best=False)
                    stopped_by = halt
                    break
                record = self._end_epoch(losses, seen, train_seconds, partial=not epoch_done)
                if epoch_done:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                improved = record["val_dice"] > self.best_dice if not math.isnan(record["val_dice"]) else self.best_dice < 0
                if improved:
                    self.best_dice = record["val_dice"] if not math.isnan(record["val_dice"]) else 0.0
                    self.bad_epochs = 0
                else:
                    self.bad_epochs += 1
                self.save(best=improved)
                if halt:
                    stopped_by = halt
                    break
                if t.early_stopping and self.bad_epochs >= t.early_stopping:
                    stopped_by = "early_stopping"
                    log.info("no Dice improvement for %d epochs: early stop", self.bad_epochs)
                    break
        if self.dist.enabled:  # all ranks must hold the same weights; record the check
            checksum = torch.tensor([sum(float(p.double().sum()) for p in self.model.parameters())], dtype=torch.float64)
            gathered = [torch.zeros_like(checksum) for _ in range(self.dist.world_size)]
            torch.distributed.all_gather(gathered, checksum)
            self.log.event({"kind": "ddp_check", "weight_checksums": [float(g) for g in gathered]})
        ddp.barrier(self.dist)
        return TrainResult(self.run_dir, self.best_dice, self.epoch, self.history, stopped_by, self.nonfinite_total)

    def _end_epoch(self, losses: list[float], seen: int, train_seconds: float, partial: bool) -> dict[str, Any]:
        t = self.config.train
        started, clock_started = time.monotonic(), self.progress.clock()
        eval_model = self.ema.module if self.ema else self.model
        summary = validate(
            eval_model, self.val_set, self.device, self.precision, t.batch_size, t.threshold, t.channels_last, self.dist
        )
        self.val_seconds = time.monotonic() - started
        self.val_cost = self.progress.clock() - clock_started
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and not math.isnan(summary["dice"]):
            self.scheduler.step(summary["dice"])
        record = {
            "epoch": self.epoch + 1,
            "partial": partial,
            "step": self.progress.step,
            "train_loss": float(sum(losses) / len(losses)) if losses else math.nan,
            "val_dice": summary["dice"],
            "val_iou": summary["iou"],
            "val_n_scored": summary["n_scored"],
            "val_empty_fp_rate": summary["empty_fp_rate"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_img_s": seen / max(train_seconds, 1e-9),
            "train_seconds": train_seconds,
            "val_seconds": self.val_seconds,
            "nonfinite_skipped": self.nonfinite_total,
        }
        self.history.append(record)
        self.log.event({"kind": "epoch", **record})
        self.log.write_history(self.history)
        if self.dist.is_main:
            log.info("epoch %d%s: loss %.4f, val Dice %.4f (%d scored of %d tiles), %.1f img/s",
                     record["epoch"], " (partial)" if partial else "", record["train_loss"], summary["dice"],
                     summary["n_scored"], summary["n"], record["train_img_s"])
        return record


def resume_config(run_dir: str | Path) -> Config:
    """The config a run was started with (its ``config.yaml``), for ``--resume``."""
    import yaml

    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise BuildsegError(f"cannot resume: {saved} does not exist (is {run_dir} a buildseg run folder?)")
    return config_from_dict(yaml.safe_load(saved.read_text()), source=str(saved))


def train(config: Config, resume: str | Path | None = None) -> TrainResult:
    trainer = Trainer(config, resume)
    try:
        return trainer.run()
    finally:
        trainer.log.close()
        ddp.cleanup(trainer.dist)
