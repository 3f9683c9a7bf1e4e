"""A model's ONNX graph, written once for every use: the engine cache (OpenVINO, ONNX
Runtime), ``buildseg export`` and the Deepness export; and the one parity measure they check
it with (onnxruntime against PyTorch in fp32).

The graph includes normalisation, stride padding (reflect) and the crop back, so it takes
raw pixels (float32, 0..255, NCHW) of any H, W >= the encoder's stride and returns logits of
the same H, W; dynamic batch and, unless a square ``size`` is fixed, dynamic height and width.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch

from buildseg.errors import BuildsegError
from buildseg.extras import require
from buildseg.settings.models import OPSET

log = logging.getLogger("buildseg")


def check_onnx_path(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise BuildsegError(f"--onnx {out}: the output file must end in .onnx")
    return out


def export_model_onnx(model, out: str | Path, opset: int = OPSET, *, size: int | None = None,
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
            if size is None or not _traced_export(model, example, out, opset=opset, output_name=output_name):
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


def _traced_export(model, example: torch.Tensor, out: str | Path, *, opset: int, output_name: str) -> bool:
    """A fixed-size graph by tracing (TorchScript): about 1 s where torch.export takes 20 s for
    the default model on 2 cores. Correct only because height and width are fixed, so the
    shapes the trace bakes in are the graph's; the batch stays dynamic. Every caller checks
    the graph against PyTorch (``onnx_parity``). False when this exporter is gone (a later
    torch) or fails: then torch.export writes it."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's constant-shape notes and the exporter's deprecation
            torch.onnx.export(model, (example,), str(out), input_names=["image"], output_names=[output_name],
                              dynamo=False, dynamic_axes={"image": {0: "batch"}, output_name: {0: "batch"}},
                              opset_version=opset)
        _static_output_size(Path(out), tuple(example.shape[-2:]))
        return True
    except Exception as exc:  # noqa: BLE001 - any failure of the old exporter: the new one writes the graph
        log.debug("traced ONNX export unavailable (%s); using torch.export", exc)
        return False


def _static_output_size(path: Path, size: tuple[int, int]) -> None:
    """Write the fixed height and width into the graph's declared outputs (the tracer leaves
    them symbolic): consumers such as Deepness read the tile size from the output's shape."""
    import onnx

    model = onnx.load(str(path))
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        for axis, value in zip((len(dims) - 2, len(dims) - 1), size):
            dims[axis].Clear()
            dims[axis].dim_value = int(value)
    onnx.save_model(model, str(path))


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


def onnx_parity(module: torch.nn.Module, onnx_path: str | Path, inputs: list[np.ndarray]) -> float:
    """Max |output difference| between onnxruntime running ``onnx_path`` and ``module`` in
    fp32, over ``inputs``; a shape mismatch is an error."""
    ort = require("onnxruntime", "the ONNX parity check")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    for array in inputs:
        with torch.no_grad():
            expected = module(torch.from_numpy(array)).numpy()
        got = session.run(None, {name: array})[0]
        if got.shape != expected.shape:
            raise BuildsegError(f"ONNX output {got.shape} differs from PyTorch {expected.shape} for input {array.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
