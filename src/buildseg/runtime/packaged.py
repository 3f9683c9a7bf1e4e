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
    # An older version kept by name may reuse another installed version's network: its own file
    # then holds only the tensors that differ (a fitted head), not a second copy of the network.
    weights_from: str = ""  # NAME@VERSION whose tensors fill in the rest

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
    """The packaged model called ``name``, or ``name@version`` (a script pins the version it
    was written for: the current model when its version matches, else an older one kept as
    ``NAME@VERSION.json``); an unknown name or version is one line naming the known ones."""
    path = ZOO / f"{name}.json"
    if "/" not in name and path.is_file():
        return _read_card(path)
    base, _, version = name.partition("@")
    current = ZOO / f"{base}.json"
    if version and "/" not in base and current.is_file():
        model = _read_card(current)
        if model.version == version:
            return model
        installed = [model.version] + [p.stem.partition("@")[2] for p in sorted(ZOO.glob(f"{base}@*.json"))]
        raise BuildsegError(f"packaged model {base!r} version {version} is not installed (installed: "
                            f"{', '.join(installed)}); use --model {base} for the current one")
    known = ", ".join(m.name for m in available()) or "none installed"
    raise BuildsegError(f"unknown packaged model {name!r} (known: {known}); `buildseg models` lists them")


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
    if model.weights_from:
        state = {**payload(weights_path(model.weights_from))["model"], **state}
    return {"format": FORMAT, "schema": SCHEMA_VERSION, "model_card": dict(model.model_card),
            "model": state, "postprocess": dict(model.postprocess), "input": dict(model.input),
            "buildseg_version": model.code_version, "packaged": {"name": model.name, "version": model.version},
            "monitor": "dice", "best_score": float(model.quality.get("val_dice", float("nan"))), "epoch": 0, "step": 0,
            "history": []}


def write_model(payload: dict[str, Any], *, name: str, version: str, zoo: Path | None = None, **card: Any) -> Path:
    """Package a checkpoint payload as ``zoo/NAME.safetensors`` (fp16) + ``NAME.json`` (the
    card: ``card`` holds sources, quality, recipe, code_version, notes). Returns the weights."""
    from safetensors.torch import save_file

    zoo = zoo or ZOO
    zoo.mkdir(parents=True, exist_ok=True)
    state = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in payload["model"].items()}
    weights = zoo / f"{name}.safetensors"
    save_file(state, str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    entry = PackagedModel(name=name, version=version, sha256=digest, model_card=dict(payload["model_card"]),
                          input=dict(payload.get("input") or {}), postprocess=dict(payload.get("postprocess") or {}), **card)
    (zoo / f"{name}.json").write_text(json.dumps(entry.__dict__, indent=1) + "\n", encoding="utf-8")
    return weights


def archive(name: str, *, reuse: str | None = None, zoo: Path | None = None) -> PackagedModel:
    """Keep the current ``name`` loadable as ``name@VERSION`` before a new version replaces it.
    With ``reuse`` (an installed ``NAME@VERSION`` sharing most of its network), the archived file
    holds only the tensors that differ from it, and its card names ``reuse`` in ``weights_from``."""
    from safetensors.torch import load_file, save_file

    zoo = zoo or ZOO
    current = _read_card(zoo / f"{name}.json")
    old = f"{name}@{current.version}"
    state = load_file(str(zoo / f"{name}.safetensors"))
    if reuse:
        shared = load_file(str(weights_path(reuse)))
        state = {k: v for k, v in state.items() if k not in shared or not shared[k].equal(v)}
    save_file(state, str(zoo / f"{old}.safetensors"))
    digest = hashlib.sha256((zoo / f"{old}.safetensors").read_bytes()).hexdigest()
    card = {**current.__dict__, "name": old, "sha256": digest, "weights_from": reuse or ""}
    (zoo / f"{old}.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    return current


def listing_lines(name: str | None = None, *, as_json: bool = False) -> list[str]:
    """What ``buildseg models`` prints: a table of every packaged model, or one model's card."""
    if name is not None:
        model = find(name)
        card = {k: v for k, v in model.__dict__.items()}
        card["size_mb"] = model.summary()["size_mb"]
        if as_json:
            return [json.dumps(card, indent=2)]
        lines = [f"{model.name} {model.version}: {model.summary()['arch']}, input {model.input.get('gsd') or 'native'} m/px, "
                 f"{model.model_card.get('in_chans')} bands, {card['size_mb']} MB (sha256 {model.sha256[:12]}...)"]
        lines += [f"  source {s['name']}: {s.get('tiles', '?')} tiles; terms: {s.get('terms', 'not stated')}" for s in model.sources]
        lines += [f"  quality {k}: {v}" for k, v in model.quality.items()]
        lines += [f"  recipe: {model.recipe}", f"  code: buildseg {model.code_version}"] + ([f"  notes: {model.notes}"] if model.notes else [])
        return lines
    rows = [m.summary() for m in available()]
    if as_json:
        return [json.dumps(rows, indent=2)]
    if not rows:
        return ["no packaged models installed"]
    head = ["name", "version", "arch", "gsd_m", "bands", "size_mb", "sources", "quality"]
    table = [head] + [[str(r[k]) for k in head] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
