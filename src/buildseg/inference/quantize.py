"""``buildseg quantize``: post-training int8 quantisation with NNCF for the OpenVINO engine.

The model's cached ONNX graph (see ``engines.py``) is read by OpenVINO and quantised with
NNCF on a few hundred tiles of validation images (a grid of ``tile`` tiles, as validation
cuts them); the int8 model is written next to the checkpoint's ONNX cache, where
``--engine openvino --precision int8`` finds it. The competition Dice of fp32 and int8 on
the validation tiles is printed, so the cost of int8 is known before it is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from buildseg.atomic import atomic_path
from buildseg.data.datasets import GridTileDataset
from buildseg.errors import BuildsegError
from buildseg.formats.tables import load_records
from buildseg.inference import engines
from buildseg.inference.segmenter import Segmenter
from buildseg.inference.tune import predict_tiles, search
from buildseg.runtime.checkpoint import checkpoint_paths

log = logging.getLogger("buildseg")


@dataclass
class QuantizeResult:
    path: Path
    n_calibration: int
    dice_fp32: float
    dice_int8: float
    accuracy_control: bool = False  # True: plain PTQ lost more than max_drop; NNCF kept some layers in fp32
    dice_plain_int8: float | None = None  # the plain PTQ's Dice when accuracy control replaced it


def _tile_dice(post):
    """NNCF validation function: the competition Dice of a compiled model's logits on
    (image, mask) tiles after the segmenter's post-processing ``post`` (threshold, min
    area, empty rule): the quantity int8 must not lose."""
    from buildseg.inference.postprocess import apply
    from buildseg.metrics import Scoreboard

    def validate(compiled, items) -> float:
        board = Scoreboard()
        for image, mask in items:
            logits = np.asarray(compiled(image)[0], dtype=np.float64)[0, 0]
            board.add(apply((1.0 / (1.0 + np.exp(-logits))).astype(np.float32), post), mask)
        return float(board.summary()["dice"])

    return validate


def _dice(segmenter: Segmenter, dataset: GridTileDataset) -> float:
    probs, truths = predict_tiles(segmenter, dataset)
    post = segmenter.postprocess
    return search(probs, truths, (post.threshold,), (post.min_area,), (post.empty_max_prob,))[0].summary["dice"]


def quantize(checkpoint: str | Path, data: str | Path, n_tiles: int = 300, tile: int = 224,
             max_drop: float | None = 0.005) -> QuantizeResult:
    """Plain NNCF post-training quantisation; when that loses more than ``max_drop`` Dice on
    the tiles, NNCF's accuracy control instead (layers that cost the most go back to fp32
    until the drop is within ``max_drop``). None: plain PTQ only."""
    if not engines._installed("openvino") or not engines._installed("nncf"):
        raise BuildsegError("int8 quantisation needs openvino and nncf: pip install 'buildseg[cpu]'")
    import nncf
    import openvino as ov

    path = checkpoint_paths(checkpoint)[0]
    fp32 = Segmenter.from_checkpoint(path, device="cpu", precision="fp32", engine="openvino")
    dataset = GridTileDataset(load_records(data, require_masks=True), tile=tile, in_chans=fp32.in_chans)
    if len(dataset) == 0:
        raise BuildsegError(f"{data} yields no validation tiles for calibration")
    picks = np.random.default_rng(0).permutation(len(dataset))[:n_tiles]
    items = [(image[None].float().numpy(), mask.numpy().reshape(tile, tile).astype(np.uint8))
             for image, mask, _ in (dataset[int(i)] for i in picks)]  # each tile read once
    model = fp32.models[0]
    folder = engines.cache_folder(path)
    onnx = str(engines.cached_onnx(model, folder))
    calibration = nncf.Dataset(items, lambda item: item[0])
    out = engines.int8_path(model, folder)
    quantized = nncf.quantize(ov.Core().read_model(onnx), calibration, subset_size=len(items))
    _save(quantized, out)
    int8 = Segmenter.from_checkpoint(path, device="cpu", precision="int8", engine="openvino")
    dice_fp32, dice_int8 = _dice(fp32, dataset), _dice(int8, dataset)
    result = QuantizeResult(out, len(items), dice_fp32, dice_int8)
    if max_drop is None or dice_fp32 - dice_int8 <= max_drop:
        return result
    log.info("int8 lost %.4f Dice (> %.4f): quantising again with NNCF accuracy control", dice_fp32 - dice_int8, max_drop)
    controlled = nncf.quantize_with_accuracy_control(
        ov.Core().read_model(onnx), calibration, calibration, _tile_dice(fp32.postprocess),
        max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(items))
    _save(controlled, out)
    int8 = Segmenter.from_checkpoint(path, device="cpu", precision="int8", engine="openvino")
    return QuantizeResult(out, len(items), dice_fp32, _dice(int8, dataset), True, dice_int8)


def _save(model, out: Path) -> None:
    """Write the int8 model atomically: a temp .xml/.bin pair renamed into place."""
    import openvino as ov

    with atomic_path(out, suffix=".xml", companions=(".bin",)) as tmp:
        ov.save_model(model, str(tmp))
