"""Packaged models: trained networks that ship inside the Python package, usable offline
right after install (``--model NAME``, ``train --init NAME``, ``buildseg models``).

Each model is two files in ``buildseg/zoo/``: ``NAME.safetensors`` (the weights, fp16 to
halve the package; widened to fp32 on load) and ``NAME.json`` (the model card: version,
architecture, input GSD and bands, the tuned post-processing, the training sources with their
terms, the recipe and the measured quality, and the weights' sha256). The loader checks the
sha256 before it trusts the file, so a damaged or swapped file is refused with one line.

A packaged model is named on the command line by ``--model NAME``; the settings turn that into
the checkpoint spec ``model:NAME`` (:data:`PACKAGED_PREFIX`), which
:func:`buildseg.runtime.checkpoint.checkpoint_paths` resolves to the weight file and
:func:`buildseg.runtime.checkpoint.load_checkpoint` reads as a checkpoint payload, so every
command that takes a checkpoint takes a packaged model the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buildseg.errors import BuildsegError

ZOO = Path(__file__).resolve().parents[1] / "zoo"
DEFAULT_MODEL = "buildings"
PACKAGED_PREFIX = "model:"  # a checkpoint spec naming a packaged model


@dataclass(frozen=True)
class PackagedModel:
    """One entry of the zoo: what ``NAME.json`` holds."""

    name: str
    version: str
    sha256: str
    model_card: dict[str, Any]
    input: dict[str, Any] = field(default_factory=dict)  # {"gsd": metres or None, "bands": [...] or None}
    postprocess: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "tiles", "terms"}]
    quality: dict[str, Any] = field(default_factory=dict)
    recipe: str = ""
    code_version: str = ""
    notes: str = ""

    @property
    def weights(self) -> Path:
        return ZOO / f"{self.name}.safetensors"

    def summary(self) -> dict[str, Any]:
        """The row ``buildseg models`` prints."""
        card = self.model_card
        size = self.weights.stat().st_size if self.weights.is_file() else 0
        return {"name": self.name, "version": self.version, "arch": f"{card.get('arch')}/{card.get('encoder')}",
                "gsd_m": self.input.get("gsd"), "bands": card.get("in_chans"), "size_mb": round(size / 2**20, 1),
                "sources": len(self.sources), "quality": self.quality.get("headline", "")}


def available() -> list[PackagedModel]:
    """Every packaged model, by name."""
    return [_read_card(p) for p in sorted(ZOO.glob("*.json"))]


def _read_card(path: Path) -> PackagedModel:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PackagedModel(**data)
    except (ValueError, TypeError) as exc:
        raise BuildsegError(f"packaged model card {path} is damaged ({exc}); reinstall buildseg") from None


def find(name: str) -> PackagedModel:
    """The packaged model called ``name``; an unknown name is one line naming the known ones."""
    path = ZOO / f"{name}.json"
    if "/" in name or not path.is_file():
        known = ", ".join(m.name for m in available()) or "none installed"
        raise BuildsegError(f"unknown packaged model {name!r} (known: {known}); `buildseg models` lists them")
    return _read_card(path)


@functools.lru_cache(maxsize=None)
def _verified(path: Path, size: int, mtime: float, expected: str) -> bool:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == expected


def weights_path(name: str) -> Path:
    """The packaged model's weight file, after checking its sha256 against its card."""
    model = find(name)
    path = model.weights
    if not path.is_file():
        raise BuildsegError(f"packaged model {name!r} has no weight file {path}; reinstall buildseg")
    stat = path.stat()
    if not _verified(path, stat.st_size, stat.st_mtime, model.sha256):
        raise BuildsegError(f"{path} does not match the sha256 in its model card (damaged or replaced); reinstall buildseg")
    return path


def is_packaged(path: Path) -> bool:
    return path.suffix == ".safetensors" and path.parent == ZOO


def name_of(spec: str) -> str | None:
    """``buildings`` of the checkpoint spec ``model:buildings``; None for a path."""
    return spec[len(PACKAGED_PREFIX):] if str(spec).startswith(PACKAGED_PREFIX) else None


def payload(path: Path) -> dict[str, Any]:
    """A checkpoint payload (today's schema) built from a packaged model's files: what
    ``best.pt`` would hold, with the weights widened to fp32."""
    from safetensors.torch import load_file

    from buildseg.schema import FORMAT, SCHEMA_VERSION

    model = find(path.stem)
    weights_path(model.name)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    return {"format": FORMAT, "schema": SCHEMA_VERSION, "model_card": dict(model.model_card),
            "model": state, "postprocess": dict(model.postprocess), "input": dict(model.input),
            "buildseg_version": model.code_version, "packaged": {"name": model.name, "version": model.version},
            "monitor": "dice", "best_score": float(model.quality.get("val_dice", float("nan"))), "epoch": 0, "step": 0,
            "history": []}
