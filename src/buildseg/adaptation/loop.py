"""``buildseg adapt``: self-training on unlabelled target imagery, as a resumable run.

The mean-teacher recipe the self-training literature uses for segmentation: the teacher (an
exponential moving average of the student, starting as the trained model) predicts each
target crop under a weak view (a flip/quarter turn shared with the student; with
``teacher_tta`` its probabilities are the mean over that view's flips or all eight dihedral
copies, as competition pseudo-labelling does); its confident
pixels become targets (:mod:`pseudo_labels`), the others are ignored; the student learns
them from a strong view of the same crop (colour, gamma, blur and JPEG perturbations: the
sensor and season changes a new place brings), optionally alongside a labelled batch of the
original data (``labelled``), which keeps it from drifting. Optionally, first, the batch-norm
statistics are re-estimated on the target (:mod:`batchnorm`). The teacher's weights are the
result: ``OUT/best.pt`` predicts like any run's.

A run folder like ``train``'s: ``adapt.json`` (the settings), ``last.pt`` (student, teacher,
optimizer, step, RNG) every ``save_every`` minutes, at the end and on SIGINT/SIGTERM, so
``resume`` continues bit-exactly; ``history.csv`` per validation. Without labelled target
tiles the stopping rule is the step count (``steps``) or the time limit, whichever comes
first; with ``val`` the teacher is scored every ``val_every`` steps and ``best.pt`` is the best.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from tqdm import tqdm

from buildseg.adaptation import batchnorm
from buildseg.adaptation.pseudo_labels import masked_bce, select
from buildseg.adaptation.settings import AdaptSettings
from buildseg.adaptation.target_data import TargetCrops, service_target, target_sources
from buildseg.atomic import atomic_open
from buildseg.errors import BuildsegError
from buildseg.inference.core.tta import predict_tta
from buildseg.models.factory import without_image_heads
from buildseg.runtime.checkpoint import (
    load_checkpoint,
    load_model,
    prediction_payload,
    rng_state,
    save_atomic,
    set_rng_state,
)
from buildseg.runtime.device import resolve_device
from buildseg.training.signals import StopFlag

log = logging.getLogger("buildseg")


@dataclass
class AdaptResult:
    out: Path
    steps_done: int
    stopped_by: str
    kept_fraction: float  # mean share of target pixels confident enough to be pseudo-labels
    history: list[dict[str, Any]] = field(default_factory=list)


STRONG = A.Compose([
    A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.8),
    A.HueSaturationValue(hue_shift_limit=12, sat_shift_limit=30, val_shift_limit=20, p=0.5),
    A.RandomGamma(gamma_limit=(70, 150), p=0.4),
    A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.Sharpen(alpha=(0.1, 0.3), p=1.0)], p=0.3),
    A.ImageCompression(quality_range=(40, 90), p=0.3),
])


def _weak_view(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A flip and quarter turn per image (the same for teacher and student)."""
    out = []
    for image in images:
        image = torch.rot90(image, int(rng.integers(4)), dims=(-2, -1))
        out.append(torch.flip(image, dims=(-1,)) if rng.integers(2) else image)
    return torch.stack(out)


def _strong_view(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Photometric perturbations per image (RGB only; other band counts pass unchanged)."""
    if images.shape[1] != 3:
        return images
    out = []
    for k, image in enumerate(images):
        STRONG.set_random_seed(seed + k)
        out.append(torch.from_numpy(STRONG(image=image.permute(1, 2, 0).numpy())["image"]).permute(2, 0, 1))
    return torch.stack(out)


def _main_head(outputs) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


class Adapter:
    def __init__(self, checkpoint: str | Path, target: str | Path, out: str | Path, settings: AdaptSettings,
                 resume: bool = False, stac_asset: str | None = None, service=None) -> None:
        self.settings, self.out = settings, Path(out)
        self.source_payload = load_checkpoint(checkpoint)
        self.device = resolve_device(settings.device)
        model = without_image_heads(load_model(checkpoint)[0])  # the network changes: fitted heads would not hold
        self.source_payload = {**self.source_payload, "model_card": model.card.to_dict()}
        self.card = model.card
        inputs = self.source_payload.get("input") or {}
        target = service_target(target, service, folder=self.out / "service", gsd=inputs.get("gsd"))
        sources = target_sources(target, stac_asset=stac_asset)
        self.target = TargetCrops(sources, crop=settings.crop, samples=settings.steps * settings.batch_size,
                                  seed=settings.seed, in_chans=model.card.in_chans, gsd=inputs.get("gsd"),
                                  bands=inputs.get("bands"))
        self.target[0]  # an unreadable target fails here, before anything is written
        self.student = model.to(self.device)
        self.teacher = copy.deepcopy(model).eval()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=settings.lr)
        self.labelled = self._labelled_set(settings.labelled, model.card.in_chans)
        self.val_set = self._val_set(settings.val, model.card.in_chans)
        self.step, self.best, self.history, self.kept = 0, -1.0, [], [0.0, 0]
        self.bn_done = False
        if resume:
            self._restore(load_checkpoint(self.out / "last.pt"))

    # -- data ---------------------------------------------------------------------------
    def _labelled_set(self, data: str | None, in_chans: int):
        if not data:
            return None
        from buildseg.data.datasets import TrainCropDataset
        from buildseg.formats.tables import load_records

        return TrainCropDataset(load_records(data, require_masks=True), crop_size=self.settings.crop,
                                seed=self.settings.seed, in_chans=in_chans)

    def _val_set(self, data: str | None, in_chans: int):
        if not data:
            return None
        from buildseg.data.datasets import GridTileDataset
        from buildseg.formats.tables import load_records

        return GridTileDataset(load_records(data, require_masks=True), tile=224, in_chans=in_chans)

    def _target_batch(self, step: int) -> torch.Tensor:
        b = self.settings.batch_size
        return torch.stack([self.target[step * b + j] for j in range(b)])

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> AdaptResult:
        s = self.settings
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.out / "adapt.json", "w") as handle:
            json.dump(asdict(s), handle, indent=1)
        start, last_save, stopped_by = time.monotonic(), time.monotonic(), "steps"
        if s.bn and not self.bn_done:
            batches = (self._target_batch(k) for k in range(min(s.bn_batches, s.steps)))
            seen = batchnorm.reestimate(self.student, batches, self.device)
            self.teacher.load_state_dict(self.student.state_dict())
            self.bn_done = True
            log.info("batch-norm statistics re-estimated on %d target crops", seen)
        bar = tqdm(total=s.steps, initial=self.step, desc="adapt", unit="step", disable=not s.progress)
        with StopFlag() as stop:
            while self.step < s.steps and s.self_training:
                self._adapt_step()
                bar.update(1)
                bar.set_postfix(kept=f"{self.kept[0] / max(1, self.kept[1]):.2f}")
                if self.val_set is not None and self.step % s.val_every == 0:
                    self._validate()
                if stop.requested:
                    stopped_by = "signal"
                    break
                if s.time_limit and time.monotonic() - start > s.time_limit * 60:
                    stopped_by = "time_limit"
                    break
                if s.save_every and time.monotonic() - last_save > s.save_every * 60:
                    self._save_last()
                    last_save = time.monotonic()
        bar.close()
        self._save_last()
        if self.val_set is None or self.best < 0:
            self._save_best()
        return AdaptResult(self.out, self.step, stopped_by, self.kept[0] / max(1, self.kept[1]), self.history)

    def _adapt_step(self) -> None:
        s = self.settings
        rng = np.random.default_rng([s.seed, self.step])
        weak = _weak_view(self._target_batch(self.step), rng)
        with torch.no_grad():
            probs = predict_tta(self._teacher_probs, weak.to(self.device), s.teacher_tta)
        labels = select(probs, low=s.low, high=s.high)
        strong = _strong_view(weak, int(rng.integers(2**31)))
        self.student.train()
        loss = masked_bce(_main_head(self.student(strong.to(self.device)))[:, : probs.shape[1]], labels)
        if self.labelled is not None:
            loss = loss + self._labelled_loss(rng)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._update_teacher()
        self.kept[0] += labels.kept_fraction
        self.kept[1] += 1
        self.step += 1

    def _teacher_probs(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(_main_head(self.teacher(images)).float())

    def _labelled_loss(self, rng: np.random.Generator) -> torch.Tensor:
        from buildseg.adaptation.pseudo_labels import PseudoLabels

        picks = rng.integers(len(self.labelled), size=self.settings.batch_size)
        images, masks = zip(*(self.labelled[int(i)] for i in picks))
        targets = torch.stack(masks).float().to(self.device)[:, :1]
        logits = _main_head(self.student(torch.stack(images).to(self.device)))[:, :1]
        return masked_bce(logits, PseudoLabels(targets, torch.ones_like(targets)))

    @torch.no_grad()
    def _update_teacher(self) -> None:
        decay = self.settings.ema
        student = self.student.state_dict()
        for name, value in self.teacher.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(decay).add_(student[name].detach().to(value.device), alpha=1 - decay)
            else:
                value.copy_(student[name])

    def _validate(self) -> None:
        from buildseg.training.validate import validate

        summary = validate(self.teacher, self.val_set, self.device, "fp32", self.settings.batch_size)
        record = {"step": self.step, "val_dice": summary["dice"], "val_f1": summary["f1"]}
        self.history.append(record)
        self._write_history()
        if summary["dice"] > self.best:
            self.best = summary["dice"]
            self._save_best()
        log.info("adapt step %d: target val Dice %.4f (best %.4f)", self.step, summary["dice"], self.best)

    # -- checkpoints --------------------------------------------------------------------
    def _save_best(self) -> None:
        payload = prediction_payload(self.source_payload)
        payload.update(model=self.teacher.state_dict(), step=self.step,
                       adapted={"from": self.source_payload.get("config"), "settings": asdict(self.settings),
                                "steps": self.step})
        if self.val_set is not None and self.best >= 0:
            payload.update(best_score=self.best, monitor="dice")
        save_atomic(payload, self.out / "best.pt")

    def _save_last(self) -> None:
        payload = prediction_payload(self.source_payload)
        payload.update(model=self.teacher.state_dict(), student=self.student.state_dict(),
                       optimizer=self.optimizer.state_dict(), adapt_step=self.step, adapt_best=self.best,
                       adapt_history=self.history, adapt_kept=list(self.kept), adapt_bn_done=self.bn_done,
                       rng=rng_state())
        save_atomic(payload, self.out / "last.pt")

    def _restore(self, payload: dict[str, Any]) -> None:
        if "student" not in payload:
            raise BuildsegError(f"{self.out / 'last.pt'} is not an adapt run's checkpoint: resume a folder "
                                "`buildseg adapt` wrote, or start a new one with another --out")
        self.teacher.load_state_dict(payload["model"])
        self.student.load_state_dict(payload["student"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step, self.best = int(payload["adapt_step"]), float(payload["adapt_best"])
        self.history, self.kept = list(payload["adapt_history"]), list(payload["adapt_kept"])
        self.bn_done = bool(payload["adapt_bn_done"])
        set_rng_state(payload["rng"])

    def _write_history(self) -> None:
        with atomic_open(self.out / "history.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.history[0]))
            writer.writeheader()
            writer.writerows(self.history)


def adapt(checkpoint: str | Path, target: str | Path, out: str | Path, settings: AdaptSettings | None = None,
          resume: bool = False, stac_asset: str | None = None, service=None) -> AdaptResult:
    """Adapt ``checkpoint`` to the imagery of ``target``; the adapted model is ``out/best.pt``."""
    return Adapter(checkpoint, target, out, settings or AdaptSettings(), resume=resume, stac_asset=stac_asset,
                   service=service).run()


def check_adapt_output(out: Path, *, resume: bool) -> Path:
    """``out`` must hold the run to resume, or be free for a new one (nothing is written here)."""
    from buildseg.outputs import FOLDER, check_outputs

    if resume and not (out / "last.pt").is_file():
        raise BuildsegError(f"cannot resume: {out / 'last.pt'} does not exist; drop --resume to start a new adapt run")
    if not resume:
        check_outputs((out, "--out", FOLDER))
        if (out / "best.pt").exists() or (out / "last.pt").exists():
            raise BuildsegError(f"{out} already holds a run; give a new --out, or --resume to continue it")
    return out
