"""Checkpoints: atomic writes, ``weights_only`` loads, RNG state capture.

A checkpoint is written to a temporary file in the same folder, fsynced, then renamed over
the old one (and the folder fsynced), so a kill at any moment leaves either the previous
or the new checkpoint, never a torn file. Everything in it loads with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from buildseg.atomic import atomic_open
from buildseg.errors import BuildsegError

FORMAT = "buildseg-checkpoint-v1"


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
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
    return payload


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
