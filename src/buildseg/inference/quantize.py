"""``buildseg quantize``: post-training int8 quantisation with NNCF for the OpenVINO engine.

The model's cached ONNX graph (see ``engines.py``) is read by OpenVINO and quantised with
NNCF on a few hundred tiles of validation images (a grid of ``tile`` tiles, as validation
cuts them); the int8 model is written next to the checkpoint's ONNX cache, where
``--engine openvino --precision int8`` finds it. The competition Dice of fp32 and int8 on
the validation tiles is printed, so the cost of int8 is known before it is used.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from buildseg.data.datasets import GridTileDataset
from buildseg.errors import BuildsegError
from buildseg.formats.tables import load_records
from buildseg.inference import engines
from buildseg.inference.segmenter import Segmenter, checkpoint_paths
from buildseg.inference.tune import predict_tiles, search

log = logging.getLogger("buildseg")


@dataclass
class QuantizeResult:
    path: Path
    n_calibration: int
    dice_fp32: float
    dice_int8: float


def _dice(segmenter: Segmenter, dataset: GridTileDataset) -> float:
    probs, truths = predict_tiles(segmenter, dataset)
    post = segmenter.postprocess
    return search(probs, truths, (post.threshold,), (post.min_area,), (post.empty_max_prob,))[0].summary["dice"]


def quantize(checkpoint: str | Path, data: str | Path, n_tiles: int = 300, tile: int = 224) -> QuantizeResult:
    if not engines._installed("openvino") or not engines._installed("nncf"):
        raise BuildsegError("int8 quantisation needs openvino and nncf: pip install 'buildseg[cpu]'")
    import nncf
    import openvino as ov

    path = checkpoint_paths(checkpoint)[0]
    fp32 = Segmenter.from_checkpoint(path, device="cpu", precision="fp32", engine="openvino")
    dataset = GridTileDataset(load_records(data, require_masks=True), tile, fp32.in_chans)
    if len(dataset) == 0:
        raise BuildsegError(f"{data} yields no validation tiles for calibration")
    picks = np.random.default_rng(0).permutation(len(dataset))[:n_tiles]
    calibration = [dataset[int(i)][0][None].float().numpy() for i in picks]
    model = fp32.models[0]
    folder = engines.cache_folder(path)
    ov_model = ov.Core().read_model(str(engines.cached_onnx(model, folder)))
    quantized = nncf.quantize(ov_model, nncf.Dataset(calibration), subset_size=len(calibration))
    out = engines.int8_path(model, folder)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.xml")
    try:
        ov.save_model(quantized, str(tmp))
        os.replace(tmp.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    int8 = Segmenter.from_checkpoint(path, device="cpu", precision="int8", engine="openvino")
    return QuantizeResult(out, len(calibration), _dice(fp32, dataset), _dice(int8, dataset))
