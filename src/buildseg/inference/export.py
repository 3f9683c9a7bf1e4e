"""``buildseg export``: ONNX with dynamic batch and spatial size, checked against PyTorch.

The exported graph includes normalisation, stride padding (reflect) and the crop back, so
it takes raw pixels (float32, 0..255, NCHW) of any H, W >= the encoder's stride and
returns logits of the same H, W. The check runs onnxruntime on random images of several
sizes and compares with the PyTorch model in fp32.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch

from buildseg.atomic import atomic_path
from buildseg.errors import BuildsegError
from buildseg.runtime.checkpoint import load_model

log = logging.getLogger("buildseg")


def export_checked(checkpoint: str | Path, out: str | Path, opset: int = 18, tolerance: float = 1e-3) -> tuple[Path, float]:
    """Export to a temporary file beside ``out``, check parity, then rename it to ``out``.

    A failed export or parity check leaves no ``.onnx`` behind (and an older ``out`` intact).
    """
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise BuildsegError(f"--onnx {out}: the output file must end in .onnx")
    with atomic_path(out, scratch=(".data",)) as tmp:
        export_onnx(checkpoint, tmp, opset)
        diff = check_parity(checkpoint, tmp)
        if diff > tolerance:
            raise BuildsegError(f"ONNX parity check failed for {out}: max |logit diff| {diff:.2e} > {tolerance:.0e}; "
                                "nothing written (try another --opset)")
    return out, diff


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = 18) -> Path:
    model, _ = load_model(checkpoint, "cpu")
    return export_model_onnx(model, out, opset)


def export_model_onnx(model, out: str | Path, opset: int = 18, *, size: int | None = None,
                      output_name: str = "logits") -> Path:
    """ONNX of a SegmentationModel (eval mode, CPU, fp32): dynamic batch, and dynamic height
    and width unless ``size`` fixes a square input (what Deepness needs)."""
    model = model.eval()
    stride = model.stride
    if size is None:
        example = torch.randint(0, 256, (2, model.card.in_chans, 3 * stride, 4 * stride)).float()
        dims = {0: torch.export.Dim("batch", min=1, max=4096),
                2: torch.export.Dim("height", min=stride, max=16384),
                3: torch.export.Dim("width", min=stride, max=16384)}
    else:
        example = torch.rand(2, model.card.in_chans, size, size)
        dims = {0: torch.export.Dim("batch", min=1, max=4096)}
    chatter = io.StringIO()  # the exporter prints its progress to stdout, which is the user's output
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:  # and logs every graph rewrite at INFO
            logger.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(chatter):
            torch.onnx.export(model, (example,), str(out), input_names=["image"], output_names=[output_name],
                              dynamo=True, dynamic_shapes={"x": dims}, opset_version=opset)
    except ImportError as exc:
        raise BuildsegError(f"ONNX export needs the onnx extra: pip install 'buildseg[onnx]' ({exc})") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        log.debug("torch.onnx: %s", chatter.getvalue())
    _inline_weights(Path(out))
    return Path(out)


def _inline_weights(path: Path) -> None:
    """One self-contained file: the exporter may put weights in ``<name>.data`` beside the
    graph, which breaks as soon as the graph is renamed or copied alone (models < 2 GB)."""
    import onnx

    external = [p for p in path.parent.glob(path.name + "*.data")] + list(path.parent.glob(path.stem + "*.data"))
    if not external:
        return
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=False)
    for data in set(external):
        data.unlink(missing_ok=True)


def check_parity(checkpoint: str | Path, onnx_path: str | Path,
                 shapes=((1, 224, 224), (3, 100, 300), (2, 47, 33)), seed: int = 0) -> float:
    """Max |logit difference| between onnxruntime and PyTorch (fp32) over ``shapes``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BuildsegError("the parity check needs onnxruntime: pip install 'buildseg[onnx]'") from None
    model, _ = load_model(checkpoint, "cpu")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch, h, w in shapes:
        h, w = max(h, model.stride), max(w, model.stride)
        image = rng.integers(0, 256, (batch, model.card.in_chans, h, w)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(image)).numpy()
        got = session.run(["logits"], {"image": image})[0]
        if got.shape != ref.shape:
            raise BuildsegError(f"ONNX output {got.shape} differs from PyTorch {ref.shape} for input {image.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst
