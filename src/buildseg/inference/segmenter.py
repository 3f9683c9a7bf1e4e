"""The public prediction API, used by the CLI itself.

>>> from buildseg import Segmenter
>>> seg = Segmenter.from_checkpoint("runs/demo/best.pt")
>>> mask = seg.predict(image)          # HxWx3 uint8 -> HxW uint8 0/1

A Segmenter holds one or more models (an ensemble averages probabilities), the precision,
the TTA mode and the post-processing settings stored with the checkpoint (threshold,
min_area, empty rules), each overridable.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from buildseg.data.datasets import to_tensors
from buildseg.errors import BuildsegError
from buildseg.inference import postprocess as pp_mod
from buildseg.inference.engines import build_engine, resolve_engine
from buildseg.inference.postprocess import PostProcess
from buildseg.inference.split import split_mask
from buildseg.inference.tiling import sliding_window_proba
from buildseg.inference.tta import predict_tta, transforms
from buildseg.models.factory import ModelCard, SegmentationModel, build_model
from buildseg.runtime.checkpoint import load_checkpoint
from buildseg.runtime.device import resolve_device, resolve_precision

log = logging.getLogger("buildseg")


def checkpoint_paths(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Checkpoint files from one path, several, a run folder (its best.pt, else last.pt), or a
    folder of *.pt / run folders. Every returned path is a file that exists."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            run_file = next((path / n for n in ("best.pt", "last.pt") if (path / n).is_file()), None)
            found = [run_file] if run_file else (
                sorted(path.glob("*.pt")) or sorted(p / "best.pt" for p in path.iterdir() if (p / "best.pt").is_file()))
            if not found:
                raise BuildsegError(f"no checkpoints (best.pt, last.pt, *.pt or */best.pt) in {path}")
            paths.extend(found)
        elif not path.is_file():
            raise BuildsegError(f"checkpoint not found: {path} (give a .pt file or a run folder)")
        else:
            paths.append(path)
    return paths


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[SegmentationModel, dict]:
    """Rebuild a model from its checkpoint alone (the model card), with its weights."""
    payload = load_checkpoint(path)
    card = ModelCard.from_dict(payload["model_card"])
    model = build_model(card, weights="none")
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise BuildsegError(f"checkpoint {path} does not match its own model card ({card.arch}/{card.encoder}): {str(exc)[:300]}") from None
    return model.to(device).eval(), payload


class Segmenter:
    def __init__(
        self,
        models: Sequence[SegmentationModel],
        device: str | torch.device = "auto",
        precision: str = "auto",
        tta: str = "none",
        postprocess: PostProcess | None = None,
        channels_last: bool = True,
        window: int = 1024,
        overlap: float = 0.25,
        empty_vote: int = 0,
        engine: str = "torch",
        checkpoints: Sequence[Path] | None = None,
        split: bool | None = None,
        threads: int | None = None,
    ) -> None:
        if not models:
            raise BuildsegError("a Segmenter needs at least one model")
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.precision = "int8" if precision == "int8" else resolve_precision(precision, self.device)
        transforms(tta)  # validates the mode
        self.tta = tta
        self.channels_last = channels_last
        self.models = []
        for model in models:
            model = model.to(self.device).eval()
            self.models.append(model.to(memory_format=torch.channels_last) if channels_last else model)
        in_chans = {m.card.in_chans for m in self.models}
        if len(in_chans) > 1:
            raise BuildsegError(f"ensemble members expect different channel counts {sorted(in_chans)}")
        self.in_chans = in_chans.pop()
        targets = {tuple(getattr(m.card, "targets", ["footprint"])) for m in self.models}
        if len(targets) > 1:
            raise BuildsegError(f"ensemble members predict different targets {sorted(targets)}: combine models trained "
                                "with the same --targets")
        self.targets = list(targets.pop())
        self.split = "contact" in self.targets if split is None else bool(split) and "contact" in self.targets
        self.postprocess = postprocess or PostProcess()
        if not 0.0 <= overlap < 1.0:
            raise BuildsegError(f"overlap {overlap} is out of range: sliding windows overlap by a fraction in [0, 1)")
        if window < 32:
            raise BuildsegError(f"window {window} is too small: use at least 32 px (ideally 512-1024)")
        if not 0 <= int(empty_vote) <= len(self.models):
            raise BuildsegError(f"empty vote {empty_vote} needs 0..{len(self.models)} (the number of models in the ensemble)")
        self.window = window
        self.overlap = overlap
        self.empty_vote = int(empty_vote)  # >0: tile is empty if at least this many models predict it empty
        self.engine = resolve_engine(engine, self.device)
        paths = list(checkpoints) if checkpoints is not None else [None] * len(self.models)
        self.input: dict = {}  # what the models were trained on: {"gsd": metres or None, "bands": [...]}
        self.checkpoint_paths: list[Path] = [p for p in (checkpoints or []) if p is not None]
        try:
            self.runners = [build_engine(self.engine, m, self.device, self.precision, channels_last, p, threads)
                            for m, p in zip(self.models, paths)]
        except Exception as exc:  # auto: a model that does not export or compile still predicts, with torch
            if engine != "auto" or self.engine == "torch" or self.precision == "int8":
                raise
            log.warning("engine %s failed for this model (%s: %s); predicting with torch instead",
                        self.engine, type(exc).__name__, (str(exc).strip().splitlines() or [""])[0][:200])
            self.engine = "torch"
            self.runners = [build_engine("torch", m, self.device, self.precision, channels_last, p, threads)
                            for m, p in zip(self.models, paths)]

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | Sequence[str | Path],
        device: str = "auto",
        precision: str = "auto",
        tta: str = "none",
        threshold: float | None = None,
        min_area: int | None = None,
        ds_ensemble: bool | None = None,
        **kwargs,
    ) -> "Segmenter":
        models, paths, stored, inputs = [], [], None, []
        for p in checkpoint_paths(path):
            model, payload = load_model(p)
            if ds_ensemble is not None:
                model.ds_ensemble = bool(ds_ensemble) and model.card.deep_supervision
            models.append(model)
            paths.append(p)
            stored = stored or payload.get("postprocess")
            inputs.append(payload.get("input") or {})
        if any(i != inputs[0] for i in inputs):
            raise BuildsegError(f"the ensemble's checkpoints were trained on different inputs ({inputs}): "
                                "combine models trained at the same --gsd and --bands")
        post = PostProcess.from_dict(stored)
        if threshold is not None:
            post = replace(post, threshold=float(threshold))
        if min_area is not None:
            post = replace(post, min_area=int(min_area))
        segmenter = cls(models, device=device, precision=precision, tta=tta, postprocess=post, checkpoints=paths, **kwargs)
        segmenter.input = inputs[0]
        return segmenter

    # -- probabilities -----------------------------------------------------------------
    # "maps" are (K, H, W) per image: one probability map per target (card.targets), the
    # footprint first; "proba" is the footprint map alone, (H, W).
    @torch.no_grad()
    def _member_prob(self, k: int, images: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) probabilities of ensemble member ``k`` on its engine."""
        return torch.sigmoid(self.runners[k](images).float())

    @torch.no_grad()
    def member_probs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-model (B, K, H, W) maps of a uint8 (B, C, H, W) batch, TTA applied, on CPU."""
        return [predict_tta(lambda x, k=k: self._member_prob(k, x), images, self.tta).cpu() for k in range(len(self.models))]

    def predict_maps_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Mean maps over the ensemble, (B, K, H, W) float32 on CPU."""
        return torch.stack(self.member_probs(images)).mean(0)

    def predict_proba_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Mean footprint probability over the ensemble, (B, H, W) float32 on CPU."""
        return self.predict_maps_batch(images)[:, 0]

    def _as_tensor(self, image: np.ndarray) -> torch.Tensor:
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise BuildsegError(f"expected an HxWxC image array, got shape {image.shape}")
        if image.shape[2] != self.in_chans:
            raise BuildsegError(
                f"the image has {image.shape[2]} channels but the model expects {self.in_chans}; "
                "convert it (e.g. drop alpha/NIR bands) or use a model trained with that in_chans"
            )
        return to_tensors(image, None)[0]

    def member_probas(self, image: np.ndarray | torch.Tensor, batch_size: int = 4) -> list[np.ndarray]:
        """Per-model (K, H, W) maps of one HxWxC image (or a CxHxW uint8 tensor); images
        larger than ``window`` go through the sliding window, model by model."""
        tensor = image if isinstance(image, torch.Tensor) else self._as_tensor(image)
        if max(tensor.shape[-2:]) <= self.window:
            return [m[0].numpy() for m in self.member_probs(tensor[None])]
        members = []
        for k in range(len(self.models)):
            def one(batch: torch.Tensor, k: int = k) -> torch.Tensor:
                return predict_tta(lambda x: self._member_prob(k, x), batch, self.tta).cpu()

            members.append(sliding_window_proba(one, tensor, self.window, self.overlap, batch_size).numpy())
        return members

    def predict_maps(self, image: np.ndarray, batch_size: int = 4) -> np.ndarray:
        """(K, H, W) maps (ensemble mean); images larger than ``window`` go through the sliding window."""
        tensor = self._as_tensor(image)
        if max(tensor.shape[-2:]) <= self.window:
            return self.predict_maps_batch(tensor[None])[0].numpy()
        return sliding_window_proba(self.predict_maps_batch, tensor, self.window, self.overlap, batch_size).numpy()

    def predict_proba(self, image: np.ndarray, batch_size: int = 4) -> np.ndarray:
        """(H, W) footprint probabilities (ensemble mean)."""
        return self.predict_maps(image, batch_size)[0]

    # -- masks -------------------------------------------------------------------------
    def finish(self, prob: np.ndarray, member_probs: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Post-process one probability map, (H, W) or (K, H, W) maps: the empty vote, the
        threshold and area rules, and, for models with a contact channel (unless
        ``split=False``), the watershed that cuts touching buildings apart."""
        footprint = prob[0] if prob.ndim == 3 else prob
        if self.empty_vote and member_probs is not None:
            empty = sum(
                int(pp_mod.apply(p[0] if p.ndim == 3 else p, self.postprocess).sum() == 0) for p in member_probs
            )
            if empty >= self.empty_vote:
                return np.zeros(footprint.shape, dtype=np.uint8)
        mask = pp_mod.apply(footprint, self.postprocess)
        if self.split and prob.ndim == 3 and len(prob) == len(self.targets) and mask.any():
            mask = split_mask(mask, footprint, prob[self.targets.index("contact")], self.postprocess.contact_threshold)
        return mask

    def predict(self, image: np.ndarray) -> np.ndarray:
        """HxW uint8 0/1 building mask of an HxWxC uint8 image (the empty vote applied)."""
        if not self.empty_vote:
            return self.finish(self.predict_maps(image))
        members = self.member_probas(image)
        return self.finish(np.mean(members, axis=0), members)
