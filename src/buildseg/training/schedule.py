"""Optimizer, learning-rate schedule and the run's progress (by steps or by time)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from buildseg.config import Config
from buildseg.errors import BuildsegError

CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = config.train
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)  # no decay on norms and biases
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, nesterov=True)
    raise BuildsegError(f"unknown optimizer {t.optimizer!r}; use adamw or sgd")


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

    def out_of_time(self, reserve: float | None) -> bool:
        """True when the time left would not cover ``reserve`` (one validation; default 5%)."""
        if not self.time_limit_s:
            return False
        reserve = reserve if reserve is not None else 0.05 * self.time_limit_s
        return self.now() + reserve >= self.time_limit_s


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
