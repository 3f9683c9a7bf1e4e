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
    """AdamW/SGD with no weight decay on norms and biases, and the encoder's learning rate
    scaled by ``train.encoder_lr_scale`` (a pretrained encoder often wants a smaller one than
    the freshly initialised decoder)."""
    t = config.train
    encoder = getattr(getattr(model, "net", None), "encoder", None)
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups = []
    for part, scale in (("encoder", t.encoder_lr_scale), ("decoder", 1.0)):
        mine = [p for p in model.parameters() if (id(p) in encoder_ids) == (part == "encoder") and p.requires_grad]
        decay = [p for p in mine if p.ndim > 1]
        no_decay = [p for p in mine if p.ndim <= 1]  # no decay on norms and biases
        groups += [{"params": decay, "weight_decay": t.weight_decay, "lr": t.lr * scale},
                   {"params": no_decay, "weight_decay": 0.0, "lr": t.lr * scale}]
    groups = [g for g in groups if g["params"]]
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


def one_cycle(fraction: float, pct_start: float = 0.3, div: float = 25.0, final_div: float = 1e4) -> float:
    """The one-cycle factor (Smith; torch's OneCycleLR shape) at a fraction of the run: a
    cosine rise from 1/div to 1 over ``pct_start``, then a cosine fall to 1/(div*final_div).

    By the run's fraction, not by a step count, so a time-limited run gets the whole cycle
    (OneCycleLR with the epochs' step count would still be warming up when time runs out).
    """
    low, final = 1.0 / div, 1.0 / (div * final_div)
    if fraction < pct_start:
        return low + (1 - low) * 0.5 * (1 - math.cos(math.pi * fraction / pct_start))
    rest = (fraction - pct_start) / (1 - pct_start)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, rest)))


def crop_side(fraction: float, start: int, full: int, ramp: float = 0.5) -> int:
    """Progressive crop side at a fraction of the run: from ``start`` up to ``full`` over the
    first ``ramp`` of the run, in steps of 32 (so every encoder stride divides it).

    Small crops early buy more (cheaper) steps while the model learns coarse shapes; the
    full crop later gives it the context it predicts with.
    """
    if start >= full:
        return full
    side = start + (full - start) * min(1.0, fraction / ramp)
    return min(full, max(start, int(side) // 32 * 32))


def make_scheduler(config: Config, optimizer, progress: Progress):
    t = config.train
    warmup = max(1, t.warmup_steps)
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    if t.scheduler not in ("cosine", "onecycle", "none"):
        raise BuildsegError(f"unknown scheduler {t.scheduler!r}; use cosine, onecycle, plateau or none")
    cosine = t.scheduler == "cosine"

    def factor(_: int) -> float:
        if t.scheduler == "onecycle":
            return one_cycle(progress.fraction())
        ramp = min(1.0, (progress.step + 1) / warmup)
        return ramp * (0.5 * (1 + math.cos(math.pi * progress.fraction())) if cosine else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
