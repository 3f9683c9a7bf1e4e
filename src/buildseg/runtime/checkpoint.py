"""Checkpoints: where they are, atomic writes, ``weights_only`` loads, the model they hold,
RNG state capture. The one place below training and inference that reads checkpoints.

Two files per run: ``last.pt`` holds what resume needs (:data:`RESUME_KEYS`: optimizer,
scheduler, RNG, counters, history, ...); ``best.pt`` holds what prediction needs
(:data:`PREDICTION_KEYS`: weights, card, post-processing, input description), so the file
users ship is as small as its weights. Every payload read goes through
:func:`buildseg.schema.upgrade_checkpoint`, so checkpoints of older versions load the same way.

A checkpoint is written to a temporary file in the same folder, fsynced, then renamed over
the old one (and the folder fsynced), so a kill at any moment leaves either the previous
or the new checkpoint, never a torn file. Everything in it loads with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from buildseg.atomic import atomic_open
from buildseg.errors import BuildsegError
from buildseg.models.factory import ModelCard, SegmentationModel, build_model
from buildseg.runtime import packaged
from buildseg.schema import FORMAT, SCHEMA_VERSION, upgrade_checkpoint

RUN_FILES = ("best.pt", "last.pt")  # a run folder's checkpoints, in the order a folder argument picks them
# What prediction, tuning and export read; best.pt holds only these (plus format and schema).
PREDICTION_KEYS = ("model_card", "model", "postprocess", "input", "config", "buildseg_version", "monitor",
                   "best_score", "epoch", "step", "history")


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    payload = {"format": FORMAT, "schema": SCHEMA_VERSION, **payload}
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return Path(path)


def prediction_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a full (resume) payload that prediction needs: what best.pt holds."""
    return {k: payload[k] for k in PREDICTION_KEYS if k in payload}


def run_checkpoint(folder: Path) -> Path | None:
    """A run folder's checkpoint: best.pt, else last.pt; None when it has neither."""
    return next((folder / n for n in RUN_FILES if (folder / n).is_file()), None)


def checkpoint_paths(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Checkpoint files from one path, several, a run folder (its best.pt, else last.pt), a
    folder of *.pt / run folders, or a packaged model (``model:NAME``, its checked weight file).
    Every returned path is a file that exists."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[Path] = []
    for item in items:
        name = packaged.name_of(str(item))
        if name is not None:
            paths.append(packaged.weights_path(name))
            continue
        path = Path(item)
        if path.is_dir():
            run_file = run_checkpoint(path)
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
        raise BuildsegError(f"checkpoint {path} does not match its own model card ({card.arch}/{card.encoder}): "
                            f"{str(exc)[:300]}") from None
    return model.to(device).eval(), payload


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint file, run folder or packaged model, migrated to today's schema."""
    name = packaged.name_of(str(path))
    path = packaged.weights_path(name) if name is not None else Path(path)
    if packaged.is_packaged(path):
        return upgrade_checkpoint(packaged.payload(path))
    if path.is_dir():
        path = run_checkpoint(path) or path
    if not path.is_file():
        raise BuildsegError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise BuildsegError(
                f"refused to load {path}: it holds Python objects (code would run on loading); buildseg loads "
                "checkpoints with torch.load(weights_only=True): use a checkpoint written by `buildseg train`") from None
        raise BuildsegError(f"cannot load checkpoint {path}: not a PyTorch file or damaged ({_first_line(exc)})") from None
    except Exception as exc:  # torn/foreign files raise zip and runtime errors alike
        raise BuildsegError(f"cannot load checkpoint {path}: not a PyTorch file or damaged ({_first_line(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BuildsegError(f"{path} is not a buildseg checkpoint (no '{FORMAT}' marker); train one with `buildseg train`")
    if int(payload.get("schema", 1)) > SCHEMA_VERSION:
        raise BuildsegError(f"{path} was written by a newer buildseg (schema {payload['schema']} > {SCHEMA_VERSION}); "
                            "upgrade buildseg to read it")
    return upgrade_checkpoint(payload)


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text[:160]}"


def rng_state() -> dict[str, Any]:
    state, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
