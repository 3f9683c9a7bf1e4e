"""``buildseg export --format deepness``: an ONNX model that QGIS's Deepness plugin runs as it is.

Deepness (PUTvision/qgis-plugin-deepness) cuts the raster layer into square tiles at the
model's resolution, feeds each as float32 NCHW RGB scaled to 0..1 (pixel / 255; its input
standardisation left at mean 0, std 1), keeps the centre of each tile's output (half the
overlap is cut from inner edges), sets probabilities below ``seg_thresh`` to 0, median-blurs
the class image with ``seg_small_segment`` and polygonises it. It reads its defaults from
the model's metadata, each value JSON-encoded.

So the exported graph is ``sigmoid(buildseg model(x * 255))`` on the footprint channel:
buildseg's own normalisation, padding and deep-supervision ensemble are inside, the input is
a fixed square tile (Deepness requires square tiles; the batch is dynamic) and the output is
one probability channel, which Deepness treats as background/building. The metadata comes
from the run: class names, the training GSD in cm/px, the tile size and overlap buildseg's
sliding window uses, the tuned threshold, and the minimum area as the median filter that
removes blobs of about that size (the plugin has no component-area rule).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from buildseg.atomic import atomic_path
from buildseg.errors import BuildsegError
from buildseg.extras import require
from buildseg.inference.core.onnx_graph import check_onnx_path, export_model_onnx, onnx_parity
from buildseg.inference.core.postprocess import PostProcess
from buildseg.runtime.checkpoint import load_model
from buildseg.settings.inference import OVERLAP, WINDOW
from buildseg.settings.models import OPSET, TOLERANCE

CLASS_NAMES = {"0": "background", "1": "building"}


class DeepnessGraph(nn.Module):
    """0..1 input (Deepness' convention) -> building probability (B, 1, H, W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.stride = model.stride
        self.card = model.card

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x * 255.0)[:, :1])


def median_size_for(min_area: int) -> int:
    """The odd median-filter size that removes a square blob of fewer than ``min_area`` pixels
    (a blob survives a k x k median when it covers more than half the window: s^2 > k^2 / 2);
    0 (no filter) when there is no minimum area."""
    if min_area <= 1:
        return 0
    k = math.ceil(math.sqrt(2 * min_area))
    return k if k % 2 else k + 1


@dataclass(frozen=True)
class DeepnessSettings:
    gsd: float | None = None  # metres per pixel; None: the run's training GSD
    tile_size: int = WINDOW
    overlap: float = OVERLAP  # fraction of the tile, like predict --overlap

    def metadata(self, payload: dict, gsd: float) -> dict[str, str]:
        post = PostProcess.from_dict(payload.get("postprocess"))
        tiles_overlap = int(round(self.overlap * 100))
        values = {
            "model_type": "Segmentor",
            "class_names": CLASS_NAMES,
            "resolution": round(gsd * 100, 4),
            "tiles_size": self.tile_size,
            "tile_size": self.tile_size,  # the key the plugin's code reads (its docs say tiles_size)
            "tiles_overlap": tiles_overlap,
            "seg_thresh": round(float(post.threshold), 6),
            "seg_small_segment": median_size_for(int(post.min_area)),
            "model_name": f"buildseg {payload.get('model_card', {}).get('encoder', '')} buildings".strip(),
        }
        return {key: json.dumps(value) for key, value in values.items()}


def run_gsd(payload: dict, path: Path, gsd: float | None) -> float:
    """The metres per pixel the model should see: ``gsd`` if given, else the training GSD."""
    if gsd is not None:
        return float(gsd)
    trained = (payload.get("input") or {}).get("gsd")
    if trained:
        return float(trained)
    raise BuildsegError(f"{path} does not record the ground resolution it was trained at (trained on images without "
                        "georeferencing); pass --gsd METRES, e.g. --gsd 0.5 for the competition's 0.5 m/px imagery")


def export_deepness(checkpoint: str | Path, out: str | Path, settings: DeepnessSettings = DeepnessSettings(), *,
                    opset: int = OPSET, tolerance: float = TOLERANCE) -> tuple[Path, dict[str, str], float]:
    """Write the Deepness ONNX (checked against PyTorch) atomically; (path, metadata, max |prob diff|)."""
    onnx = require("onnx", "the Deepness export")
    out = check_onnx_path(out)
    model, payload = load_model(checkpoint, "cpu")
    if settings.tile_size < model.stride:
        raise BuildsegError(f"--tile-size {settings.tile_size} is smaller than the encoder's stride {model.stride}; "
                            f"use at least {model.stride} (ideally 512-1024)")
    if settings.tile_size % 2:
        raise BuildsegError(f"--tile-size {settings.tile_size} is odd; Deepness needs an even tile size")
    metadata = settings.metadata(payload, run_gsd(payload, Path(checkpoint), settings.gsd))
    graph = DeepnessGraph(model.eval()).eval()
    with atomic_path(out, scratch=(".data",)) as tmp:
        export_model_onnx(graph, tmp, opset, size=settings.tile_size, output_name="probability")
        proto = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(proto, str(tmp))
        diff = deepness_parity(graph, tmp, settings.tile_size)
        if diff > tolerance:
            raise BuildsegError(f"Deepness export parity check failed for {out}: max |probability diff| {diff:.2e} > "
                                f"{tolerance:.0e}; nothing written (try another --opset)")
    return out, metadata, diff


def deepness_parity(graph: DeepnessGraph, onnx_path: Path, size: int, seed: int = 0) -> float:
    """Max |probability difference| between onnxruntime and PyTorch on random 0..1 tiles."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 256, (2, graph.card.in_chans, size, size)) / 255.0).astype(np.float32)
    return onnx_parity(graph, onnx_path, [x])
