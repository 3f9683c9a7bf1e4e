"""``buildseg evaluate`` and ``buildseg report``: scoring predictions against truth."""

from __future__ import annotations

from dataclasses import dataclass

from buildseg.errors import BuildsegError
from buildseg.settings.fields import Settings, setting

MATCHING = ("spacenet", "buildseg")  # SpaceNet CSVs' matching rule; the first is the default
GROUPS = ("aoi",)


@dataclass(frozen=True)
class EvaluateSettings(Settings):
    COMMAND = "evaluate"

    pred: str = setting(None, "submission CSV img_id,mask_rle, or footprints (vector file / mask GeoTIFF)",
                        required=True)
    truth: str = setting(None, "truth CSV: img_id,mask_rle (224x224) or a dataset CSV with img_path; or footprints "
                         "(any vector file geopandas reads, or a mask GeoTIFF)", required=True)
    shape: tuple[int, int] | None = setting(None, "mask size for a bare truth CSV", nargs=2, metavar=("H", "W"), low=1)
    iou: float = setting(0.5, "IoU a predicted building needs to match a true one (as SpaceNet)", low=0, high=1,
                         low_open=True)
    details: str | None = setting(None, "write one row per building (side, area, matched building, IoU) to this CSV; "
                                  "SpaceNet CSVs: one row per image (tp, fp, fn, precision, recall, F1)")
    min_area: float | None = setting(None, "SpaceNet's area rule before matching: drop true buildings smaller than A "
                                     "and predicted ones of A or less (pixels, or the footprints' square CRS units; "
                                     "default 20 for SpaceNet pixel WKT, else 0: off)", low=0)
    matching: str | None = setting(None, "SpaceNet CSVs: spacenet (the scorer's rule: proposals in decreasing "
                                   "Confidence, default) or buildseg (highest IoU first, order-free)", choices=MATCHING)
    group_by: str | None = setting(None, "SpaceNet CSVs: also score each AOI (the ImageId before its last _ part, e.g. "
                                   "AOI_2_Vegas)", choices=GROUPS)
    json: bool = setting(False, "print the metrics as JSON")


@dataclass(frozen=True)
class ReportSettings(Settings):
    COMMAND = "report"

    pred: str | None = setting(None, "submission CSV img_id,mask_rle (with --truth)")
    truth: str | None = setting(None, "truth CSV: a dataset CSV with img_path, or img_id,mask_rle with --images")
    run: str | None = setting(None, "instead of --pred/--truth: the output folder of an AOI, many-scene or GeoTIFF "
                              "`predict` (its overview picture, counts and manifest on one page)", metavar="OUT_DIR")
    images: str | None = setting(None, "folder with <img_id>.png (when the truth CSV has no img_path)")
    shape: tuple[int, int] | None = setting(None, "mask size when no image gives it", nargs=2, metavar=("H", "W"), low=1)
    worst: int = setting(12, "how many worst tiles to show", low=1)
    before: str | None = setting(None, "predictions of the same tiles by another model (e.g. before `buildseg adapt`): "
                                 "a before/after section with the Dice change per tile and per source")
    out: str = setting(None, "the HTML file to write", required=True)

    def check(self) -> None:
        if self.run and (self.pred or self.truth or self.before):
            raise BuildsegError("--run OUT_DIR reports a prediction folder; --pred, --truth and --before score "
                                "tiles: give one or the other")
        if not self.run and not (self.pred and self.truth):
            raise BuildsegError("report needs --pred CSV and --truth CSV (scored tiles), or --run OUT_DIR (a "
                                "prediction folder)")
