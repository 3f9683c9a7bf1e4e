"""The public prediction API, used by the CLI itself.

>>> from buildseg import Segmenter
>>> seg = Segmenter.from_checkpoint("runs/demo/best.pt")
>>> mask = seg.predict(image)                    # HxWx3 uint8 -> HxW uint8 0/1
>>> masks = seg.predict_batch(batch)             # (B, 3, H, W) uint8 tensor -> B masks
>>> maps = seg.probabilities(batch).mean         # (B, K, H, W) float32: footprint first

Jobs that drive it over files (CSV prediction, GeoTIFF blocks, many scenes, tuning) sit
above it and use ``probabilities`` and the :class:`MaskRules` of ``seg.rules``.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from buildseg.data.datasets import to_tensors
from buildseg.errors import BuildsegError
from buildseg.inference.core import postprocess as pp_mod
from buildseg.inference.core.checkpoint_info import stored_settings
from buildseg.inference.core.engines import auto_cpu_precision, build_engine, resolve_engine
from buildseg.inference.core.postprocess import PostProcess
from buildseg.inference.core.split import split_mask
from buildseg.inference.core.tiling import sliding_window_proba
from buildseg.inference.core.tta import predict_tta, transforms
from buildseg.models.factory import SegmentationModel
from buildseg.runtime.checkpoint import checkpoint_paths, load_model
from buildseg.runtime.device import resolve_device, resolve_precision
from buildseg.settings.inference import OVERLAP, WINDOW

log = logging.getLogger("buildseg")


def _members_agree(models: Sequence[SegmentationModel]) -> tuple[int, list[str]]:
    """(in_chans, output names) that every member of an ensemble shares; one line where they differ."""
    in_chans = {m.card.in_chans for m in models}
    if len(in_chans) > 1:
        raise BuildsegError(f"ensemble members expect different channel counts {sorted(in_chans)}")
    targets = {tuple(getattr(m, "output_names", None) or getattr(m.card, "targets", ["footprint"])) for m in models}
    if len(targets) > 1:
        raise BuildsegError(f"ensemble members predict different outputs {sorted(targets)}: combine models trained "
                            "with the same --targets (and the same fitted per-image heads)")
    return in_chans.pop(), list(targets.pop())


# the settings a Segmenter is built with: frozen after __init__ (a new Segmenter for new settings)
FROZEN = ("device", "tta", "channels_last", "postprocess", "window", "overlap", "empty_vote", "engine", "precision",
          "split", "input")
PRECISION_AUTO_ENV = "BUILDSEG_PRECISION_AUTO"  # measure (default) | rule: the flag rule, no timing (tests)
CHANGEABLE = ("tta", "postprocess", "window", "overlap", "empty_vote", "split")  # with_settings: no engine rebuild


def _check_window(*, window: int, overlap: float, empty_vote: int, n_models: int) -> None:
    if not 0.0 <= overlap < 1.0:
        raise BuildsegError(f"overlap {overlap} is out of range: sliding windows overlap by a fraction in [0, 1)")
    if window < 32:
        raise BuildsegError(f"window {window} is too small: use at least 32 px (ideally 512-1024)")
    if not 0 <= int(empty_vote) <= n_models:
        raise BuildsegError(f"empty vote {empty_vote} needs 0..{n_models} (the number of models in the ensemble)")


class Segmenter:
    """One or more models (an ensemble averages their probabilities) on one engine, with the
    device, precision, TTA, sliding-window and post-processing settings they predict with.

    ``from_checkpoint`` loads checkpoints or run folders and takes the post-processing stored
    by ``buildseg tune`` (threshold, min_area, empty rules), each overridable. Prediction:
    :meth:`predict` (one image of any size), :meth:`predict_batch` (a same-size batch) and
    :meth:`probabilities` (the maps behind both); :attr:`rules` turns maps into masks.
    """

    def __init__(
        self,
        models: Sequence[SegmentationModel],
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        tta: str = "none",
        postprocess: PostProcess | None = None,
        channels_last: bool = True,
        window: int = WINDOW,
        overlap: float = OVERLAP,
        empty_vote: int = 0,
        engine: str = "torch",
        checkpoints: Sequence[Path] | None = None,
        split: bool | None = None,
        threads: int | None = None,
        engine_mode: str = "auto",
        inputs: dict | None = None,
    ) -> None:
        if not models:
            raise BuildsegError("a Segmenter needs at least one model")
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        transforms(tta)  # validates the mode
        self.tta = tta
        self.channels_last = channels_last
        self.models = []
        for model in models:
            model = model.to(self.device).eval()
            self.models.append(model.to(memory_format=torch.channels_last) if channels_last else model)
        self.in_chans, self.targets = _members_agree(self.models)
        self.split = "contact" in self.targets if split is None else bool(split) and "contact" in self.targets
        self.postprocess = postprocess or PostProcess()
        _check_window(window=window, overlap=overlap, empty_vote=empty_vote, n_models=len(self.models))
        self.window = window
        self.overlap = overlap
        self.window_batch = 4  # sliding-window tiles per engine call
        self.empty_vote = int(empty_vote)  # >0: tile is empty if at least this many models predict it empty
        self.engine = resolve_engine(engine, self.device)
        paths = list(checkpoints) if checkpoints is not None else [None] * len(self.models)
        built: dict[str, list] = {}  # precision -> engines, built while measuring (reused, not rebuilt)
        self.rates: dict[str, float] = {}  # precision auto: tiles/s measured per candidate (empty: not measured)
        if precision == "auto" and self.device.type == "cpu":
            self.precision, why = self._auto_precision(paths, built, threads=threads, engine_mode=engine_mode)
            log.info("precision auto: %s (%s)", self.precision, why)
        else:
            self.precision = "int8" if precision == "int8" else resolve_precision(precision, self.device)
        self.input: dict = dict(inputs or {})  # what the models were trained on: {"gsd": metres or None, "bands": [...]}
        self.checkpoint_paths: list[Path] = [p for p in (checkpoints or []) if p is not None]
        if self.precision in built:
            self.runners = built[self.precision]
        else:
            self._build_runners(paths, asked=(engine, precision), threads=threads, engine_mode=engine_mode)
        self._frozen = True

    def __setattr__(self, name: str, value) -> None:
        if getattr(self, "_frozen", False) and name in FROZEN:
            raise AttributeError(f"a Segmenter's settings are frozen: use segmenter.with_settings({name}=...), which "
                                 "returns a new Segmenter sharing the loaded models and engines")
        object.__setattr__(self, name, value)

    def with_settings(self, **changes) -> "Segmenter":
        """A new Segmenter with other post-processing or sliding-window settings (any of
        :data:`CHANGEABLE`), sharing this one's models and compiled engines: nothing reloads."""
        unknown = sorted(set(changes) - set(CHANGEABLE))
        if unknown:
            raise BuildsegError(f"with_settings cannot change {', '.join(unknown)} (they need new engines: build a new "
                                f"Segmenter); it changes {', '.join(CHANGEABLE)}")
        merged = {name: changes.get(name, getattr(self, name)) for name in CHANGEABLE}
        transforms(merged["tta"])
        _check_window(window=merged["window"], overlap=merged["overlap"], empty_vote=merged["empty_vote"],
                      n_models=len(self.models))
        if "split" in changes:
            merged["split"] = bool(changes["split"]) and "contact" in self.targets
        new = copy.copy(self)
        for name, value in merged.items():
            object.__setattr__(new, name, value)
        return new

    def _auto_precision(self, paths: list, built: dict, *, threads: int | None, engine_mode: str) -> tuple[str, str]:
        """``--precision auto`` on a CPU: the fastest allowed precision, measured once per machine
        and model (inference/core/precision_choice.py); the flag rule when measuring is off
        (``BUILDSEG_PRECISION_AUTO=rule``) or an engine fails to build (the fallback below runs)."""
        from buildseg.inference.core.precision_choice import measured_precision

        if os.environ.get(PRECISION_AUTO_ENV, "measure") == "rule":
            return auto_cpu_precision(self.engine, self.models, paths)

        def build(precision: str) -> list:
            built[precision] = [build_engine(self.engine, m, self.device, precision, self.channels_last, p, threads,
                                             mode=engine_mode) for m, p in zip(self.models, paths)]
            return built[precision]

        try:
            return measured_precision(self.engine, self.models, paths, build=build, rates_out=self.rates)
        except Exception as exc:  # noqa: BLE001 - _build_runners reports a failing engine; the rule decides meanwhile
            built.clear()
            log.debug("precision auto: measuring failed (%s); the flag rule decides", exc)
            return auto_cpu_precision(self.engine, self.models, paths)

    def _build_runners(self, paths: list, *, asked: tuple[str, str], threads: int | None, engine_mode: str) -> None:
        """One engine per model; with ``--engine auto``, a model that does not export or compile
        still predicts, with torch."""
        try:
            self.runners = [build_engine(self.engine, m, self.device, self.precision, self.channels_last, p, threads,
                                         mode=engine_mode) for m, p in zip(self.models, paths)]
        except Exception as exc:
            if asked[0] != "auto" or self.engine == "torch" or asked[1] == "int8":
                raise
            log.warning("engine %s failed for this model (%s: %s); predicting with torch instead",
                        self.engine, type(exc).__name__, (str(exc).strip().splitlines() or [""])[0][:200])
            self.engine = "torch"
            if self.precision == "int8":  # chosen by auto: torch has no int8
                self.precision = resolve_precision("auto", self.device)
            self.runners = [build_engine("torch", m, self.device, self.precision, self.channels_last, p, threads)
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
        models, paths, payloads = [], [], []
        for p in checkpoint_paths(path):
            model, payload = load_model(p)
            if ds_ensemble is not None:
                model.ds_ensemble = bool(ds_ensemble) and model.card.deep_supervision
            models.append(model)
            paths.append(p)
            payloads.append(payload)
        post, inputs = stored_settings(payloads, threshold=threshold, min_area=min_area)
        return cls(models, device=device, precision=precision, tta=tta, postprocess=post, checkpoints=paths, inputs=inputs,
                   **kwargs)

    @classmethod
    def from_model(cls, name: str = "buildings", **kwargs) -> "Segmenter":
        """A packaged model by name (``buildseg models`` lists them), offline: the same as
        ``--model NAME`` on the command line. ``kwargs`` are :meth:`from_checkpoint`'s."""
        from buildseg.runtime.packaged import PACKAGED_PREFIX, find

        find(name)  # an unknown name is one line naming the known ones
        return cls.from_checkpoint(PACKAGED_PREFIX + name, **kwargs)

    @property
    def rules(self) -> MaskRules:
        """The post-processing of this segmenter's (frozen) settings."""
        return MaskRules(self.postprocess, self.targets, self.empty_vote, self.split)

    # -- the public surface: probabilities, predict_batch, predict (and from_checkpoint) --------
    @torch.no_grad()
    def probabilities(self, images: torch.Tensor | np.ndarray) -> EnsembleMaps:
        """Ensemble probability maps, TTA applied, as float32 NumPy on the CPU.

        ``images``: a uint8 batch (B, C, H, W) of one size, or one HxWxC image array. An image
        larger than ``window`` goes through the sliding window, model by model. Per-member
        maps are kept only when the empty vote needs them.
        """
        batch = images if isinstance(images, torch.Tensor) else self._as_tensor(images)[None]
        if batch.ndim != 4:
            raise BuildsegError(f"expected a (B, C, H, W) batch or an HxWxC image, got shape {tuple(batch.shape)}")
        if max(batch.shape[-2:]) <= self.window:
            members = [self._member_batch(k, batch) for k in range(len(self.models))]
        else:
            members = [torch.stack([sliding_window_proba(lambda x, k=k: self._member_batch(k, x), image, self.window,
                                                         self.overlap, self.window_batch) for image in batch])
                       for k in range(len(self.models))]
        mean = members[0] if len(members) == 1 else torch.stack(members).mean(0)
        return EnsembleMaps(mean.numpy(), [m.numpy() for m in members] if self.empty_vote else None)

    def predict_batch(self, images: torch.Tensor) -> list[np.ndarray]:
        """HxW uint8 0/1 masks of a uint8 (B, C, H, W) batch (empty vote, thresholds, split)."""
        maps = self.probabilities(images)
        return [self.rules(*maps.image(k)) for k in range(len(maps.mean))]

    def predict(self, image: np.ndarray) -> np.ndarray:
        """HxW uint8 0/1 building mask of one HxWxC image of any size."""
        return self.rules(*self.probabilities(image).image(0))

    # -- internals ---------------------------------------------------------------------
    def _member_batch(self, k: int, images: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) probabilities of ensemble member ``k`` on its engine, TTA applied, on CPU."""
        return predict_tta(lambda x: torch.sigmoid(self.runners[k](x).float()), images, self.tta).cpu()

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


@dataclass
class EnsembleMaps:
    """Probability maps of a batch: ``mean`` (B, K, H, W), one map per target (the footprint
    first), and ``members``, each model's own (B, K, H, W), when the empty vote needs them."""

    mean: np.ndarray
    members: list[np.ndarray] | None = None

    def image(self, k: int) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """(mean maps, member maps) of image ``k``: the arguments of :class:`MaskRules`."""
        return self.mean[k], None if self.members is None else [m[k] for m in self.members]


@dataclass
class MaskRules:
    """Probability maps -> mask: the empty vote, the threshold and area rules, the tile head's
    decision (models with one: ``tile_threshold``), and for models with a contact channel
    (unless ``split`` is off) the watershed that cuts touching buildings apart. A separate
    object so that callers can post-process in another thread (CSV prediction) or after
    resampling (GeoTIFF blocks). ``targets``: the output channels' names, in order."""

    postprocess: PostProcess
    targets: list[str]
    empty_vote: int = 0  # > 0: the image is empty if at least this many members predict it empty
    split: bool = False

    def __call__(self, maps: np.ndarray, members: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """One image's (K, H, W) maps (or its (H, W) footprint map) -> HxW uint8 0/1 mask."""
        footprint = maps[0] if maps.ndim == 3 else maps
        if self.empty_vote and members is not None:
            empty = sum(int(pp_mod.apply(m[0] if m.ndim == 3 else m, self.postprocess).sum() == 0) for m in members)
            if empty >= self.empty_vote:
                return np.zeros(footprint.shape, dtype=np.uint8)
        mask = pp_mod.apply(footprint, self.postprocess)
        if self.postprocess.tile_threshold > 0 and "tile" in self.targets and maps.ndim == 3 and mask.any():
            mask[maps[self.targets.index("tile")] < self.postprocess.tile_threshold] = 0  # a tile: all or nothing
        if self.split and maps.ndim == 3 and len(maps) == len(self.targets) and mask.any():
            mask = split_mask(mask, footprint, maps[self.targets.index("contact")], self.postprocess.contact_threshold)
        return mask
