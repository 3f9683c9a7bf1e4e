"""Commands that turn a checkpoint into another artefact: ``export`` (ONNX, Deepness),
``quantize`` (int8) and ``tune`` (post-processing stored in the checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass

from buildseg.errors import BuildsegError
from buildseg.settings.fields import Settings, model_setting, setting
from buildseg.settings.inference import OVERLAP, WINDOW, EngineSettings

OPSET = 18  # the ONNX opset written
TOLERANCE = 1e-3  # the largest |difference| onnxruntime may show against PyTorch
EXPORT_FORMATS = ("onnx", "deepness")
MAX_DROP = 0.005  # the competition Dice int8 may lose against fp32 and still be accepted
CALIBRATION_TILES = 300  # NNCF's own default subset size
FIRST_USE_TILES = 64  # a label-free int8 calibration at first use reads this many input tiles: half calibrate, half judge
AGREEMENT_DROP = 0.02  # ... and keeps int8 when its masks agree with fp32's within this Dice (benchmarks/README.md)
OBJECTIVES = ("dice", "f1")  # what tuning maximises: the competition Dice or building F1 at IoU 0.5


@dataclass(frozen=True)
class ExportSettings(Settings):
    COMMAND = "export"

    CHECKPOINT_REQUIRED = True

    checkpoint: str | None = setting(None, "checkpoint .pt or run folder")
    model: str | None = model_setting()
    onnx: str = setting(None, "output .onnx file", required=True)
    opset: int = setting(OPSET, "ONNX opset", low=7)
    tolerance: float = setting(TOLERANCE, "max |logit diff| allowed in the parity check", low=0, low_open=True)
    format: str = setting("onnx", "onnx (raw 0..255 pixels of any size -> logits) or deepness (QGIS's Deepness plugin: "
                          "0..1 square tiles -> building probability, with the plugin's metadata from the run)",
                          choices=EXPORT_FORMATS)
    gsd: float | None = setting(None, "deepness: metres per pixel the model should see (default: the run's training "
                                "GSD)", low=0, low_open=True)
    tile_size: int = setting(WINDOW, "deepness: the tile the plugin feeds, in pixels (buildseg's window)", low=32)
    overlap: float = setting(OVERLAP, "deepness: tile overlap as a fraction (buildseg's)", low=0, high=1,
                             high_open=True)

    def check(self) -> None:
        if self.gsd is not None and self.format != "deepness":
            raise BuildsegError("--gsd applies to --format deepness (the resolution the plugin resamples to); drop it")


@dataclass(frozen=True)
class QuantizeSettings(Settings):
    COMMAND = "quantize"

    CHECKPOINT_REQUIRED = True

    checkpoint: str | None = setting(None, "checkpoint .pt or run folder")
    model: str | None = model_setting()
    data: str = setting(None, "validation CSV/folder with masks: calibration tiles and the Dice check", required=True)
    n_tiles: int = setting(CALIBRATION_TILES, "calibration tiles", low=1)
    tile: int = setting(224, "calibration and validation tile side in pixels", low=32)
    max_drop: float = setting(MAX_DROP, "largest Dice loss allowed; beyond it NNCF's accuracy control keeps the "
                              "costliest layers in fp32, and a model still beyond it is refused for --precision auto "
                              "(0 disables the control: plain int8)", low=0)


@dataclass(frozen=True)
class TuneSettings(EngineSettings):
    COMMAND = "tune"

    CHECKPOINT_REQUIRED = True

    checkpoint: list[str] | None = setting(None, "checkpoint .pt; repeat to tune an ensemble", repeat=True)
    model: str | None = model_setting()
    data: str = setting(None, "validation CSV/folder with masks (cut into a grid of --tile tiles)", required=True)
    tile: int = setting(224, "tile side in pixels", low=16)
    objective: str = setting("dice", "what the best setting maximises: competition Dice or building F1 at IoU 0.5",
                             choices=OBJECTIVES)
    save: bool = setting(True, "write the best setting into the checkpoint (--no-save: print only)")
    out: str | None = setting(None, "write the tuned model to this new run folder (its best.pt) and leave the "
                              "checkpoint as it is: a packaged model learns a place's threshold and empty-tile rule "
                              "from a few labelled tiles of it")
    json: str | None = setting(None, "also write all results to this JSON file")

    def check(self) -> None:
        if self.model and self.save and not self.out:
            raise BuildsegError("tune --model: a packaged model is read-only; add --out DIR (a new run with the tuned "
                                "setting) or --no-save (print only)")
        if self.out and len(self.checkpoint or [None]) > 1:
            raise BuildsegError("tune --out writes one model: tune an ensemble in place (its checkpoints), or one "
                                "checkpoint at a time")


@dataclass(frozen=True)
class ModelsSettings(Settings):
    COMMAND = "models"

    name: str | None = setting(None, "show one packaged model's whole card (sources and their terms, recipe, quality)")
    json: bool = setting(False, "print JSON instead of a table")
