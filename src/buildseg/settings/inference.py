"""Prediction's names and defaults shared by the core, the jobs and every predicting command
(``predict``, ``tune``): engines, precisions, TTA, sliding window, block size, layer formats."""

from __future__ import annotations

from dataclasses import dataclass

from buildseg.runtime.precisions import PRECISIONS
from buildseg.settings.fields import Settings, setting

ENGINES = ("auto", "torch", "openvino", "onnxruntime")
OPENVINO_MODES = ("auto", "latency", "throughput")
TTA_MODES = ("none", "flip", "d4")
PREDICT_PRECISIONS = (*PRECISIONS, "int8")
WINDOW = 1024  # the sliding window buildseg predicts large images with (predict --window)
OVERLAP = 0.25  # its overlap, a fraction of the window (predict --overlap)
BLOCK = 2048  # GeoTIFF pixels per processing block (predict --block)
LAYER_FORMATS = {"gpkg": ".gpkg", "parquet": ".parquet", "fgb": ".fgb", "geojson": ".geojson"}  # many scenes' layers
TILE_FORMATS = ("csv", "coco", "spacenet")  # what `predict --format` writes at --out for tiles (CSV/folder input)


@dataclass(frozen=True)
class EngineSettings(Settings):
    """How a checkpoint predicts: shared by every command that runs a model over images."""

    tta: str = setting("none", "test-time augmentation", choices=TTA_MODES)
    batch_size: int = setting(32, "images per engine call", low=1)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    precision: str = setting("auto", "auto: bf16 on GPUs; on a CPU the fastest of fp32, native bf16 and the run's "
                             "accepted int8 model (made at the end of `train`, or by `buildseg quantize`), timed on a "
                             "few batches at first use on the machine and cached",
                             choices=PREDICT_PRECISIONS)
    engine: str = setting("auto", "inference engine (auto: openvino on x86 CPUs where installed, else torch; falls back "
                          "to torch if the model does not compile); openvino and onnxruntime cache the ONNX graph next "
                          "to the checkpoint", choices=ENGINES)
