"""Every setting of an adapt run, its default, help and range, declared once (the CLI's flags
and docs/cli.md follow them), in a module with no heavy imports."""

from __future__ import annotations

from dataclasses import dataclass

from buildseg.errors import BuildsegError
from buildseg.settings.fields import Settings, model_setting, setting
from buildseg.settings.inference import TTA_MODES
from buildseg.settings.predict import ServiceSettings

CONFIDENT_HIGH = 0.7  # a teacher pixel at or above this is taken as building
CONFIDENT_LOW = 0.3  # at or below this, as background; in between: ignored


@dataclass(frozen=True)
class AdaptSettings(Settings):
    """The adapt run's hyper-parameters (what changes the adapted model)."""

    steps: int = setting(300, "optimizer steps: the stopping rule without --val", low=1)
    time_limit: float | None = setting(None, "minutes; stops at a step boundary and saves", low=0, low_open=True)
    batch_size: int = setting(8, "target crops per step", low=1)
    crop: int = setting(256, "target crop side in pixels", low=32)
    lr: float = setting(1e-4, "learning rate", low=0, low_open=True)
    ema: float = setting(0.99, "teacher = ema x teacher + (1 - ema) x student after each step", low=0, high=1,
                         high_open=True)
    teacher_tta: str = setting("none", "the teacher's probabilities averaged over flips (flip) or all 8 flips and "
                               "turns (d4)", choices=TTA_MODES)
    low: float = setting(CONFIDENT_LOW, "teacher probability at or below: background pseudo-label", low=0, high=1,
                         high_open=True)
    high: float = setting(CONFIDENT_HIGH, "at or above: building pseudo-label (in between: ignored)", low=0, high=1)
    self_training: bool = setting(True, "the mean-teacher loop (off: only --bn)")
    bn: bool = setting(False, "re-estimate batch-norm statistics on the target first")
    bn_batches: int = setting(20, "target batches for --bn", low=1)
    labelled: str | None = setting(None, "the original labelled data (CSV/folder): one labelled batch per step")
    val: str | None = setting(None, "labelled target tiles (CSV/folder): best.pt = the best-scoring step")
    val_every: int = setting(50, "steps between --val scores", low=1)
    save_every: float = setting(5.0, "minutes between last.pt checkpoints", low=0)
    seed: int = setting(0, "random seed")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    progress: bool = setting(True, "progress bar")

    def check(self) -> None:
        if self.low >= self.high:
            raise BuildsegError(f"--low {self.low} must be below --high {self.high}: pixels in between are ignored")
        if not self.self_training and not self.bn:
            raise BuildsegError("--no-self-training with --no-bn adapts nothing: turn one of them on")


@dataclass(frozen=True)
class AdaptRun(ServiceSettings):
    """What an adapt run reads and writes (``buildseg adapt``'s other flags)."""

    COMMAND = "adapt"

    CHECKPOINT_REQUIRED = True

    checkpoint: str | None = setting(None, "the trained run folder or checkpoint to adapt")
    model: str | None = model_setting()
    data: str = setting(None, "the target imagery, anything predict reads (a test CSV, an images folder, a GeoTIFF, "
                        "many scenes, or an imagery service with --aoi); only pixels are read, never masks",
                        required=True)
    out: str = setting(None, "the new run folder: best.pt predicts like any run", required=True)
    resume: bool = setting(False, "continue the adapt run in --out from its last.pt")
    stac_asset: str | None = setting(None, "STAC target: the item asset holding the image")
