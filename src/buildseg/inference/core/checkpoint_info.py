"""What a checkpoint (or an ensemble of them) says about prediction, read without building a model.

The Ray driver needs the run key (the checkpoints' bytes, the post-processing, the window
settings), the input the models were trained on (GSD, bands) and their channel count to plan
scenes; building the models for that would cost it seconds of CPU (timm, torchvision) that
its workers need on a small machine. ``Segmenter.from_checkpoint`` reads the same stored
settings through :func:`stored_settings`, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from buildseg.errors import BuildsegError
from buildseg.inference.core.postprocess import PostProcess
from buildseg.models.card import ModelCard
from buildseg.runtime.checkpoint import checkpoint_paths, load_checkpoint
from buildseg.settings.inference import OVERLAP, WINDOW


def stored_settings(payloads: Sequence[dict[str, Any]], *, threshold: float | None = None,
                    min_area: int | None = None) -> tuple[PostProcess, dict]:
    """(post-processing, input description) of an ensemble's payloads: the first stored
    post-processing (``buildseg tune`` writes it), with ``threshold``/``min_area`` overriding
    it, and the input every member must share."""
    stored = next((p.get("postprocess") for p in payloads if p.get("postprocess")), None)
    inputs = [p.get("input") or {} for p in payloads]
    if any(i != inputs[0] for i in inputs):
        raise BuildsegError(f"the ensemble's checkpoints were trained on different inputs ({inputs}): "
                            "combine models trained at the same --gsd and --bands")
    post = PostProcess.from_dict(stored)
    if threshold is not None:
        post = replace(post, threshold=float(threshold))
    if min_area is not None:
        post = replace(post, min_area=int(min_area))
    return post, inputs[0]


@dataclass(frozen=True)
class CheckpointInfo:
    """The fields of a Segmenter that the run key and a scene's plan read, without its models."""

    checkpoint_paths: list[Path]
    postprocess: PostProcess
    input: dict = field(default_factory=dict)
    in_chans: int = 3
    tta: str = "none"
    window: int = WINDOW
    overlap: float = OVERLAP

    @classmethod
    def read(cls, spec: str | Path | Sequence[str | Path], *, tta: str = "none", threshold: float | None = None,
             min_area: int | None = None, window: int = WINDOW, overlap: float = OVERLAP,
             **_engine_options: Any) -> CheckpointInfo:
        """From checkpoint files or run folders, with predict's options (the engine's are ignored)."""
        paths = checkpoint_paths(spec)
        payloads = [load_checkpoint(p) for p in paths]
        post, inputs = stored_settings(payloads, threshold=threshold, min_area=min_area)
        chans = {ModelCard.from_dict(p["model_card"]).in_chans for p in payloads}
        if len(chans) > 1:
            raise BuildsegError(f"ensemble members expect different channel counts {sorted(chans)}")
        return cls(paths, post, inputs, chans.pop(), tta, window, overlap)
