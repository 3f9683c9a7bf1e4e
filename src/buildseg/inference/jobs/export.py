"""``buildseg export``: ONNX with dynamic batch and spatial size, checked against PyTorch.

The exported graph includes normalisation, stride padding (reflect) and the crop back, so
it takes raw pixels (float32, 0..255, NCHW) of any H, W >= the encoder's stride and
returns logits of the same H, W. The check runs onnxruntime on random images of several
sizes and compares with the PyTorch model in fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from buildseg.atomic import atomic_path
from buildseg.errors import BuildsegError
from buildseg.inference.core.onnx_graph import check_onnx_path, export_model_onnx, onnx_parity
from buildseg.runtime.checkpoint import load_model
from buildseg.settings.models import OPSET, TOLERANCE


def export_checked(checkpoint: str | Path, out: str | Path, *, opset: int = OPSET,
                   tolerance: float = TOLERANCE) -> tuple[Path, float]:
    """Export to a temporary file beside ``out``, check parity, then rename it to ``out``.

    A failed export or parity check leaves no ``.onnx`` behind (and an older ``out`` intact).
    """
    out = check_onnx_path(out)
    with atomic_path(out, scratch=(".data",)) as tmp:
        export_onnx(checkpoint, tmp, opset)
        diff = check_parity(checkpoint, tmp)
        if diff > tolerance:
            raise BuildsegError(f"ONNX parity check failed for {out}: max |logit diff| {diff:.2e} > {tolerance:.0e}; "
                                "nothing written (try another --opset)")
    return out, diff


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = OPSET) -> Path:
    model, _ = load_model(checkpoint, "cpu")
    return export_model_onnx(model, out, opset)


def check_parity(checkpoint: str | Path, onnx_path: str | Path,
                 shapes=((1, 224, 224), (3, 100, 300), (2, 47, 33)), seed: int = 0) -> float:
    """Max |logit difference| between onnxruntime and PyTorch (fp32) over ``shapes``."""
    model, _ = load_model(checkpoint, "cpu")
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(0, 256, (b, model.card.in_chans, max(h, model.stride), max(w, model.stride))).astype(np.float32)
              for b, h, w in shapes]
    return onnx_parity(model.eval(), onnx_path, inputs)
