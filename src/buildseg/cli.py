"""Command line: parse arguments, call the library, print results. Nothing else.

``buildseg train|predict|evaluate|tune|export|synth|demo``; ``python -m buildseg`` is the same.
Training flags are generated from the config dataclasses, so every YAML key has a flag
(``model.deep_supervision`` -> ``--deep-supervision``) and the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from buildseg.errors import BuildsegError, one_line
from buildseg.outputs import FILE, FOLDER, check_outputs

log = logging.getLogger("buildseg")

# Flags whose names differ from their config key (the public contract of the CLI).
FLAG_NAMES = {"data.train": "--data", "data.val": "--val-data", "train.out": "--out"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: exit 2, the flag, the value and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def flag_name(dotted: str) -> str:
    return FLAG_NAMES.get(dotted, "--" + dotted.split(".", 1)[1].replace("_", "-"))


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key; values are parsed by :func:`buildseg.config.coerce`, like YAML."""
    from buildseg.config import SECTIONS

    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} (YAML section '{section}:')")
        for f in fields(cls):
            dotted = f"{section}.{f.name}"
            kind = str(f.type)
            common = dict(dest=dotted, default=argparse.SUPPRESS, help=f"{dotted} (default: {f.default if f.default is not None else 'none'})")
            if kind == "bool":
                group.add_argument(flag_name(dotted), action=argparse.BooleanOptionalAction, **common)
            elif kind.startswith("list["):
                group.add_argument(flag_name(dotted), nargs="+", **common)
            else:
                group.add_argument(flag_name(dotted), **common)
    parser.add_argument("--loss", dest="loss", default=argparse.SUPPRESS,
                        help="loss sum, e.g. bce+dice, 'bce:0.5,dice:1,lovasz:0.5' (default: bce+dice)")


def add_adapt_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`AdaptSettings` field, with its default and comment's meaning."""
    from buildseg.adaptation.settings import AdaptSettings
    from buildseg.inference.options import TTA_MODES

    kinds = {"steps": POSITIVE_INT, "batch_size": POSITIVE_INT, "crop": _ranged(int, 32), "bn_batches": POSITIVE_INT,
             "val_every": POSITIVE_INT, "time_limit": _ranged(float, 0.0, low_open=True),
             "lr": _ranged(float, 0.0, low_open=True), "ema": _ranged(float, 0.0, 1.0), "low": _ranged(float, 0.0, 1.0),
             "high": _ranged(float, 0.0, 1.0, high_open=False), "save_every": _ranged(float, 0.0), "seed": int}
    helps = {"steps": "optimizer steps: the stopping rule without --val", "time_limit": "minutes; stops at a step "
             "boundary and saves", "crop": "target crop side in pixels", "ema": "teacher = ema x teacher + (1 - ema) x "
             "student after each step", "low": "teacher probability at or below: background pseudo-label",
             "high": "at or above: building pseudo-label (in between: ignored)", "self_training": "the mean-teacher "
             "loop (off: only --bn)", "bn": "re-estimate batch-norm statistics on the target first",
             "bn_batches": "target batches for --bn", "labelled": "the original labelled data (CSV/folder): one "
             "labelled batch per step", "val": "labelled target tiles (CSV/folder): best.pt = the best-scoring step",
             "val_every": "steps between --val scores", "save_every": "minutes between last.pt checkpoints",
             "teacher_tta": "the teacher's probabilities averaged over flips (flip) or all 8 flips and turns (d4)"}
    choices = {"teacher_tta": TTA_MODES}
    for f in fields(AdaptSettings):
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, f.name.replace('_', ' '))} (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kinds.get(f.name, str), default=f.default, help=text,
                                choices=choices.get(f.name))


def _ranged(kind: type, low: float | None = None, high: float | None = None, high_open: bool = True,
            low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``kind`` within [low, high) (or the bounds asked for)."""

    def parse(text: str):
        try:
            value = kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {' and '.join(x for x in (lo, hi) if x)}")
        return value

    return parse


PROBABILITY = _ranged(float, 0.0, 1.0, low_open=True)
POSITIVE_INT = _ranged(int, 1)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if "." in k or k == "loss"}


def inference_flags() -> argparse.ArgumentParser:
    """Flags every predicting command shares (predict, tune), declared once; the choices come
    from the modules that define them."""
    from buildseg.inference.options import ENGINES, TTA_MODES
    from buildseg.runtime.precisions import PRECISIONS

    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--tta", default="none", choices=TTA_MODES, help="test-time augmentation (default none)")
    parent.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    parent.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parent.add_argument("--precision", default="auto", choices=[*PRECISIONS, "int8"],
                        help="auto: bf16 on GPUs and CPUs with native bf16; on other CPUs int8 when the run has an "
                             "accepted int8 model (made at the end of `train`, or by `buildseg quantize`), else fp32")
    parent.add_argument("--engine", default="auto", choices=ENGINES,
                        help="inference engine (default auto: openvino on x86 CPUs where installed, else torch; falls "
                             "back to torch if the model does not compile); openvino and onnxruntime cache the ONNX "
                             "graph next to the checkpoint")
    return parent


def build_parser() -> argparse.ArgumentParser:
    from buildseg import __version__
    from buildseg.inference.options import MAX_DROP, OPENVINO_MODES, OVERLAP, WINDOW

    parser = Parser(prog="buildseg", description="Building footprint segmentation in overhead imagery.")
    parser.add_argument("--version", action="version", version=f"buildseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on a competition CSV or images/masks folder")
    p.add_argument("--config", help="YAML config (sections data, model, train, loss); flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--nproc", type=POSITIVE_INT, default=1, help="launch N processes with torchrun (DDP)")
    add_config_flags(p)

    shared = inference_flags()
    p = sub.add_parser("predict", parents=[shared], help="predict a test CSV/folder into a submission CSV")
    p.add_argument("--checkpoint", action="append", help="checkpoint .pt or run folder; repeat to ensemble (required "
                   "except with --merge)")
    p.add_argument("--data", help="test CSV (img_id,img_path) or folder with images/; a GeoTIFF (a path, an https:// or "
                   "s3:// URL or a GDAL /vsi path); or many scenes: a folder of GeoTIFFs, a CSV with a 'path' column "
                   "(paths or URLs), or a STAC ItemCollection/Catalog JSON")
    p.add_argument("--out", help="submission CSV to write (GeoTIFF input: the mask COG; many scenes: the output folder)")
    p.add_argument("--stac-asset", help="STAC input: the item asset holding the image (default: the item's only GeoTIFF "
                   "asset, else 'visual')")
    p.add_argument("--shard", type=_shard, metavar="I/N", help="many scenes: predict only every N-th scene from the "
                   "I-th (0-based; an array job's index, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); the last "
                   "shard to finish merges")
    p.add_argument("--merge", metavar="OUT_DIR", help="only merge OUT_DIR's finished scenes into its layer and "
                   "manifest (after array jobs); no model needed")
    p.add_argument("--runner", choices=["local", "ray"], default="local",
                   help="many scenes: local (this process, or torchrun's ranks) or ray (a pool of Ray workers, one "
                        "model each, scenes handed out largest first, a dead worker's scene retried)")
    p.add_argument("--ray-address", help="--runner ray: the cluster to join (default: start a local Ray for the run)")
    p.add_argument("--ray-workers", type=POSITIVE_INT, help="--runner ray: workers (default: one per GPU, else one "
                   "per 2 CPU cores of the cluster)")
    p.add_argument("--max-retries", type=_ranged(int, 0), default=2,
                   help="--runner ray: times a scene is retried when its worker dies (default 2)")
    p.add_argument("--ray-split-megapixels", type=_ranged(float, 0.0), metavar="MPX",
                   help="--runner ray: cut scenes larger than this into pieces of about this size, predicted on "
                        "several workers and joined as block borders are (default: auto, scenes over a quarter of "
                        "one worker's share of all the pixels, in 64 Mpx pieces; 0: never split)")
    p.add_argument("--threshold", type=PROBABILITY, help="probability threshold (default: the checkpoint's, else 0.5)")
    p.add_argument("--min-area", type=_ranged(int, 0), help="remove components smaller than this many pixels")
    p.add_argument("--ds-ensemble", action=argparse.BooleanOptionalAction, default=None,
                   help="average all deep-supervision heads (default: the checkpoint's setting)")
    p.add_argument("--empty-vote", type=_ranged(int, 0), default=0,
                   help="tile is empty if at least K ensemble members see nothing (0: off; K <= number of checkpoints)")
    p.add_argument("--window", type=_ranged(int, 32), default=WINDOW, help="sliding-window size for larger images")
    p.add_argument("--overlap", type=_ranged(float, 0.0, 1.0), default=OVERLAP, help="sliding-window overlap, in [0, 1)")
    p.add_argument("--num-workers", type=_ranged(int, -1), default=-1)
    p.add_argument("--masks-dir", help="also write PNG masks here")
    p.add_argument("--overlays-dir", help="also write overlay PNGs here")
    p.add_argument("--skip-bad", action="store_true", help="write -1 for unreadable images instead of stopping")
    p.add_argument("--threads", type=POSITIVE_INT, help="the engine's compute threads (default: the engine's own, all "
                   "cores this process may use)")
    p.add_argument("--engine-mode", default="auto", choices=OPENVINO_MODES,
                   help="openvino: latency (the whole batch in one request on every core) or throughput (the batch "
                        "split over OpenVINO's streams, all in flight); auto: the one measured faster on this many "
                        "cores (benchmarks/README.md), latency where not measured")
    p.add_argument("--profile", action="store_true", help="print seconds per pipeline stage (decode wait, model, "
                   "post-processing, CSV) and the engine's threads")
    p.add_argument("--footprints", help="GeoTIFF input: also write building footprints here; the format follows the "
                   "extension: .gpkg, .parquet, .fgb, .geojson")
    p.add_argument("--geojson", help="GeoTIFF input: footprints as GeoJSON (same as --footprints FILE.geojson)")
    from buildseg.inference.options import LAYER_FORMATS
    from buildseg.inference.tile_layers import TILE_FORMATS

    p.add_argument("--format", choices=[*TILE_FORMATS, *LAYER_FORMATS],
                   help="tiles (CSV/folder input): csv (the submission, default), spacenet (SpaceNet's proposal CSV: "
                        "ImageId, BuildingId, PolygonWKT_Pix, Confidence) or coco (COCO instance JSON at --out, "
                        "one scored annotation per building); many scenes: the footprint layer format (default gpkg)")
    p.add_argument("--block", type=_ranged(int, 64), default=2048, help="GeoTIFF input: pixels per processing block")
    p.add_argument("--simplify", type=_ranged(float, 0.0), default=None,
                   help="GeoTIFF input: footprint simplification tolerance in CRS units (default: one pixel; 0: off)")
    p.add_argument("--min-area-m2", type=_ranged(float, 0.0), default=0.0,
                   help="GeoTIFF input: drop footprints smaller than this ground area")
    p.add_argument("--regularize", action="store_true",
                   help="GeoTIFF input: right-angle footprints (buildingregulariser)")
    p.add_argument("--gsd", type=_ranged(float, 0.0, low_open=True),
                   help="GeoTIFF input: metres per pixel to predict at (default: the GSD the model was trained at)")
    p.add_argument("--native-resolution", action="store_true",
                   help="GeoTIFF input: predict at the raster's own pixel size, ignoring the training GSD")
    p.add_argument("--bands", help="GeoTIFF input: 1-based bands to read, e.g. 1,2,3 (default: the training bands)")
    p.add_argument("--stretch", default="percentile", choices=["percentile", "none"],
                   help="GeoTIFF input that is not 8-bit: per-band 2-98 percentile stretch to 0-255 (default), or clip")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("report", help="one self-contained HTML page: scores, Dice histogram, worst tiles, errors")
    p.add_argument("--pred", required=True, help="submission CSV img_id,mask_rle")
    p.add_argument("--truth", required=True, help="truth CSV: a dataset CSV with img_path, or img_id,mask_rle with --images")
    p.add_argument("--images", help="folder with <img_id>.png (when the truth CSV has no img_path)")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"), help="mask size when no image gives it")
    p.add_argument("--worst", type=POSITIVE_INT, default=12, help="how many worst tiles to show (default 12)")
    p.add_argument("--before", help="predictions of the same tiles by another model (e.g. before `buildseg adapt`): "
                   "a before/after section with the Dice change per tile and per source")
    p.add_argument("--out", required=True, help="the HTML file to write")

    p = sub.add_parser("evaluate", help="score predictions: competition Dice and building F1")
    p.add_argument("--pred", required=True, help="submission CSV img_id,mask_rle, or footprints (vector file / mask GeoTIFF)")
    p.add_argument("--truth", required=True, help="truth CSV: img_id,mask_rle (224x224) or a dataset CSV with img_path; "
                   "or footprints (any vector file geopandas reads, or a mask GeoTIFF)")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"), help="mask size for a bare truth CSV")
    p.add_argument("--iou", type=_ranged(float, 0.0, 1.0, low_open=True, high_open=False), default=0.5,
                   help="IoU a predicted building needs to match a true one (default 0.5, as SpaceNet)")
    p.add_argument("--details", help="write one row per building (side, area, matched building, IoU) to this CSV; "
                   "SpaceNet CSVs: one row per image (tp, fp, fn, precision, recall, F1)")
    p.add_argument("--min-area", type=_ranged(float, 0.0), default=None,
                   help="SpaceNet's area rule before matching: drop true buildings smaller than A and predicted ones "
                        "of A or less (pixels, or the footprints' square CRS units; default 20 for SpaceNet pixel "
                        "WKT, else 0: off)")
    from buildseg.spacenet_scoring import GROUPS, MATCHING

    p.add_argument("--matching", choices=MATCHING, default=None,
                   help="SpaceNet CSVs: spacenet (the scorer's rule: proposals in decreasing Confidence, default) or "
                        "buildseg (highest IoU first, order-free); they differ only where true buildings overlap")
    p.add_argument("--group-by", choices=GROUPS, help="SpaceNet CSVs: also score each AOI (the ImageId before its "
                   "last _ part, e.g. AOI_2_Vegas)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = sub.add_parser("tune", parents=[shared], help="search threshold x min-area x empty rule for the competition Dice; store it in the checkpoint")
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint .pt; repeat to tune an ensemble")
    p.add_argument("--data", required=True, help="validation CSV/folder with masks (cut into a grid of --tile tiles)")
    p.add_argument("--tile", type=_ranged(int, 16), default=224)
    p.add_argument("--objective", default="dice", choices=["dice", "f1"],
                   help="what the best setting maximises: competition Dice or building F1 at IoU 0.5 (default dice)")
    p.add_argument("--no-save", action="store_true", help="print only; do not write the setting into the checkpoint")
    p.add_argument("--json", help="also write all results to this JSON file")

    p = sub.add_parser("export", help="export a checkpoint to ONNX (dynamic batch and size) with a parity check")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--tolerance", type=_ranged(float, 0.0, low_open=True), default=1e-3, help="max |logit diff| allowed in the parity check")
    p.add_argument("--format", choices=["onnx", "deepness"], default="onnx",
                   help="onnx (raw 0..255 pixels of any size -> logits) or deepness (QGIS's Deepness plugin: 0..1 "
                        "square tiles -> building probability, with the plugin's metadata from the run)")
    p.add_argument("--gsd", type=_ranged(float, 0.0, low_open=True),
                   help="deepness: metres per pixel the model should see (default: the run's training GSD)")
    p.add_argument("--tile-size", type=_ranged(int, 32), default=WINDOW,
                   help=f"deepness: the tile the plugin feeds, in pixels (default {WINDOW}, buildseg's window)")
    p.add_argument("--overlap", type=_ranged(float, 0.0, 1.0), default=OVERLAP,
                   help=f"deepness: tile overlap as a fraction, in [0, 1) (default {OVERLAP}, buildseg's)")

    p = sub.add_parser("adapt", help="adapt a trained model to unlabelled imagery of a new place (self-training)")
    p.add_argument("--checkpoint", required=True, help="the trained run folder or checkpoint to adapt")
    p.add_argument("--data", required=True, help="the target imagery, anything predict reads (a test CSV, an images "
                   "folder, a GeoTIFF or many scenes); only pixels are read, never masks")
    p.add_argument("--out", required=True, help="the new run folder: best.pt predicts like any run")
    p.add_argument("--resume", action="store_true", help="continue the adapt run in --out from its last.pt")
    p.add_argument("--stac-asset", help="STAC target: the item asset holding the image")
    add_adapt_flags(p)

    p = sub.add_parser("quantize", help="int8 model for --engine openvino --precision int8, calibrated with NNCF")
    p.add_argument("--checkpoint", required=True, help="checkpoint .pt or run folder")
    p.add_argument("--data", required=True, help="validation CSV/folder with masks: calibration tiles and the Dice check")
    p.add_argument("--n-tiles", type=POSITIVE_INT, default=300, help="calibration tiles (default 300)")
    p.add_argument("--tile", type=_ranged(int, 32), default=224)
    p.add_argument("--max-drop", type=_ranged(float, 0.0), default=MAX_DROP,
                   help="largest Dice loss allowed; beyond it NNCF's accuracy control keeps the costliest layers in "
                        f"fp32, and a model still beyond it is refused for --precision auto (default {MAX_DROP}; 0 "
                        "disables the control: plain int8)")

    p = sub.add_parser("cache", help="decode a training set once into the disk store ahead of a run")
    p.add_argument("--data", required=True, help="training CSV or images/+masks/ folder")
    p.add_argument("--cache-dir", help="store folder (default ~/.cache/buildseg/decoded)")
    p.add_argument("--in-chans", type=POSITIVE_INT, default=3, help="channels the model will read (default 3)")

    p = sub.add_parser("synth", help="write a synthetic demo dataset in the competition format")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=POSITIVE_INT, default=16)
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--test-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="synth data -> train a few minutes -> predict -> evaluate")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    p.add_argument("--encoder", default="resnet18")
    return parser


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """argv with ``--nproc N`` / ``--nproc=N`` removed (torchrun starts the processes instead)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from buildseg.config import apply_overrides, load_config

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        import subprocess

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "buildseg", *_without_nproc(sys.argv[1:])]
        return subprocess.call(cmd)
    from buildseg.pipeline import train_and_tune
    from buildseg.training.loop import resume_config

    base = resume_config(args.resume) if args.resume else load_config(args.config)
    overrides = overrides_from(args)
    config = apply_overrides(base, overrides, {k: flag_name(k) for k in overrides if k != "loss"})
    check_outputs((config.train.out, "--out", FOLDER))
    result, finished = train_and_tune(config, resume=args.resume)
    tuned, int8 = finished.tuned, finished.int8
    if result.is_main:
        print(f"best val {'building F1' if result.monitor == 'f1' else 'Dice'} {result.best_score:.4f} after {result.epochs_done} epochs (stopped by {result.stopped_by})")
        print(f"checkpoints: {result.run_dir / 'best.pt'}  {result.run_dir / 'last.pt'}")
        print(f"curves: {result.run_dir / 'curves.png'}")
        if tuned is not None:
            p, a, b = tuned.post, tuned.before, tuned.after
            print(f"post-processing tuned on the validation tiles and stored in best.pt: threshold {p.threshold:.2f}, "
                  f"min_area {p.min_area}, empty if max prob < {p.empty_max_prob:.2f}; Dice {a['dice']:.4f} -> "
                  f"{b['dice']:.4f}, building F1 {a['f1']:.4f} -> {b['f1']:.4f}, empty-tile FP rate "
                  f"{a['empty_fp_rate']:.3f} -> {b['empty_fp_rate']:.3f}")
        if int8 is not None:
            print(_int8_line(int8, "end of training"))
    return 0


def _int8_line(verdict, when: str) -> str:
    """One line on an int8 calibration: kept or refused, the Dice of both, the time it took."""
    scored = "" if verdict.dice_int8 is None else (f"; Dice fp32 {verdict.dice_fp32:.4f}, int8 {verdict.dice_int8:.4f} "
                                                   f"({verdict.change:+.4f})")
    control = " with NNCF accuracy control" if verdict.accuracy_control else ""
    use = ("`predict --precision auto` uses it on CPUs without bf16" if verdict.accepted
           else "predict stays fp32/bf16; `buildseg quantize` can retry")
    state = f"accepted ({verdict.path})" if verdict.accepted else f"refused: {verdict.reason}"
    return (f"int8 model ({when}, {verdict.n_calibration} calibration / {verdict.n_validation} validation tiles"
            f"{control}, {verdict.seconds:.0f} s) {state}{scored}; {use}")


def _geo_settings(args: argparse.Namespace, segmenter) -> dict[str, Any]:
    """The GeoTiffSettings fields from the flags; GSD and bands default to what the checkpoint
    was trained on."""
    from buildseg.config import coerce

    gsd = None if args.native_resolution else args.gsd or segmenter.input.get("gsd")
    bands = coerce(args.bands, "list[int] | None", "data.bands", "--bands") if args.bands else segmenter.input.get("bands")
    return {"block": args.block, "simplify": args.simplify, "stretch": args.stretch, "gsd": gsd, "bands": bands,
            "min_area_m2": args.min_area_m2, "regularize": args.regularize}


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` with 0 <= I < N."""
    try:
        first, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 3/10: the 4th of 10 shards, 0-based)") from None
    if count < 1 or not 0 <= first < count:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= I < N (I is 0-based; with SLURM use --array=0-{max(count, 1) - 1})")
    return first, count


def cmd_merge(args: argparse.Namespace) -> int:
    from buildseg.inference.scenes import merge_outputs

    summary = merge_outputs(args.merge)
    print(f"merged {summary['scenes']} scenes into {summary['merged']} ({summary['n_footprints']} footprints); "
          f"manifest {Path(args.merge) / 'manifest.json'}")
    return 0


def _segmenter_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Segmenter.from_checkpoint``'s keywords from predict's flags (the checkpoint aside)."""
    return dict(device=args.device, precision=args.precision, tta=args.tta, threshold=args.threshold,
                min_area=args.min_area, ds_ensemble=args.ds_ensemble, window=args.window, overlap=args.overlap,
                empty_vote=args.empty_vote, engine=args.engine, threads=args.threads, engine_mode=args.engine_mode)


def cmd_predict(args: argparse.Namespace) -> int:
    from buildseg.formats.locations import is_remote, location_suffix
    from buildseg.formats.tables import load_records
    from buildseg.inference.options import LAYER_FORMATS as FORMATS
    from buildseg.inference.scene_sources import is_scene_collection, list_scene_sources
    from buildseg.inference.tile_layers import TILE_FORMATS, TILE_LAYERS

    if args.merge:
        if args.checkpoint or args.data or args.out:
            raise BuildsegError("--merge OUT_DIR works from the folder's done-records alone: drop --checkpoint, --data "
                                "and --out")
        return cmd_merge(args)
    for flag in ("checkpoint", "data", "out"):
        if not getattr(args, flag):
            raise BuildsegError(f"predict needs --{flag} (or --merge OUT_DIR to merge finished scenes)")
    geotiff = location_suffix(args.data) in (".tif", ".tiff") and (is_remote(args.data) or Path(args.data).is_file())
    many = not geotiff and is_scene_collection(args.data)
    if not many and (args.shard or args.runner != "local" or args.stac_asset):
        flag = "--shard" if args.shard else "--runner" if args.runner != "local" else "--stac-asset"
        raise BuildsegError(f"{flag} applies to many scenes (a folder or list of GeoTIFFs, or a STAC catalogue); "
                            f"--data {args.data} is not one")
    if args.ray_split_megapixels is not None and args.runner != "ray":
        raise BuildsegError("--ray-split-megapixels applies to --runner ray (the local runner predicts a scene in one "
                            "process); add --runner ray or drop it")
    if args.runner == "ray" and args.shard:
        raise BuildsegError("--shard splits scenes over array jobs; --runner ray hands them out itself: use one of them")
    if not (geotiff or many) and (args.gsd or args.bands or args.native_resolution or args.footprints or args.geojson):
        raise BuildsegError("--gsd, --bands, --native-resolution, --footprints and --geojson apply to GeoTIFF input; "
                            f"--data {args.data} is not a GeoTIFF or a folder/list of them")
    if (geotiff or many) and args.empty_vote:
        raise BuildsegError("--empty-vote blanks whole tiles (CSV/folder input); a GeoTIFF scene is not a tile: drop --empty-vote")
    if args.footprints and args.geojson:
        raise BuildsegError("give either --footprints or --geojson (the same thing, GeoJSON only), not both")
    LAYER_FORMATS = tuple(FORMATS)
    if args.format in TILE_FORMATS and (geotiff or many):
        raise BuildsegError(f"--format {args.format} is for tiles (CSV/folder input); scenes write masks and "
                            f"footprint layers: use --format {'|'.join(LAYER_FORMATS)} or --footprints FILE")
    if args.format in LAYER_FORMATS and not many:
        raise BuildsegError(f"--format {args.format} is the footprint layer format of many scenes; for tiles use "
                            f"--format {'|'.join(TILE_FORMATS)}, for one GeoTIFF --footprints FILE.{args.format}")
    check_outputs((args.out, "--out", FOLDER if many else FILE), (args.masks_dir, "--masks-dir", FOLDER),
                  (args.overlays_dir, "--overlays-dir", FOLDER), (args.footprints, "--footprints", FILE),
                  (args.geojson, "--geojson", FILE))
    scenes = None
    if many:
        scenes = list_scene_sources(args.data, args.stac_asset)
        for scene in scenes:
            scene.check()
    records = None if (geotiff or many) else load_records(args.data)  # bad data fails before the models load
    layer = args.format in TILE_LAYERS  # coco / spacenet: that file at --out instead of the submission CSV
    ray_workers = None
    if many and args.runner == "ray":  # Ray and its workers start first: the driver loads its own model meanwhile
        from buildseg.inference.ray_workers import RayOptions, RayWorkers

        split = {} if args.ray_split_megapixels is None else {"split_megapixels": args.ray_split_megapixels}
        ray_options = RayOptions(address=args.ray_address, workers=args.ray_workers, max_retries=args.max_retries,
                                 **split)
        ray_workers = RayWorkers.start(ray_options, args.checkpoint, _segmenter_options(args), most=len(scenes))
    try:
        return _predict(args, geotiff=geotiff, many=many, scenes=scenes, records=records, layer=layer,
                        ray_workers=ray_workers)
    finally:
        if ray_workers is not None:
            ray_workers.close()


def _predict(args: argparse.Namespace, *, geotiff: bool, many: bool, scenes, records, layer: bool, ray_workers) -> int:
    """cmd_predict once the input is checked: the models load here (and torch with them)."""
    from buildseg.distributed import cleanup, init_distributed
    from buildseg.inference.options import LAYER_FORMATS
    from buildseg.inference.predict import predict_records
    from buildseg.inference.segmenter import Segmenter
    from buildseg.inference.tile_layers import TILE_LAYERS

    dist = init_distributed(args.device)
    device = str(dist.device) if dist.device.type == "cuda" else args.device  # each rank on its LOCAL_RANK GPU
    try:
        if many and args.runner == "ray":  # the driver needs the run key and the scenes' plans, not a model
            from buildseg.inference.checkpoint_info import CheckpointInfo

            segmenter = CheckpointInfo.read(args.checkpoint, **_segmenter_options(args))
        else:
            segmenter = Segmenter.from_checkpoint(args.checkpoint, **{**_segmenter_options(args), "device": device})
        if many:
            from buildseg.inference.scenes import SceneSettings, predict_scenes

            settings = SceneSettings(**_geo_settings(args, segmenter), format=args.format or next(iter(LAYER_FORMATS)))
            if args.runner == "ray":
                from buildseg.inference.ray_runner import predict_scenes_ray

                summary = predict_scenes_ray(segmenter, _segmenter_options(args), scenes, args.out, settings,
                                             ray_workers.ray_options, progress=not args.no_progress, workers=ray_workers)
            else:
                summary = predict_scenes(segmenter, scenes, args.out, settings, dist, progress=not args.no_progress,
                                         shard=args.shard or (0, 1))
            if dist.is_main:
                done = f"{summary['predicted']} scenes predicted, {summary['skipped']} already done"
                if summary["remaining"]:
                    print(f"{done}; {summary['remaining']} scenes of other shards remain: the last shard merges, or run "
                          f"buildseg predict --merge {args.out}")
                else:
                    print(f"{done}; merged layer {summary['merged']} ({summary['n_footprints']} footprints); manifest "
                          f"{Path(args.out) / 'manifest.json'}")
            return 0
        if geotiff:
            from buildseg.inference.geotiff import GeoTiffSettings, predict_geotiff

            result = predict_geotiff(segmenter, args.data, args.out, args.footprints or args.geojson,
                                     GeoTiffSettings(**_geo_settings(args, segmenter)), progress=not args.no_progress)
            print(f"wrote {result.mask_path} (CRS {result.crs or 'none: pixel coordinates'})")
            if result.footprints_path:
                print(f"wrote {result.footprints_path}: {result.n_polygons} building footprints (area in "
                      f"{result.area_unit or 'CRS units'})")
            return 0
        _, stats = predict_records(
            segmenter, records, None if layer else args.out, batch_size=args.batch_size, num_workers=args.num_workers,
            masks_dir=args.masks_dir, overlays_dir=args.overlays_dir, skip_bad=args.skip_bad,
            progress=not args.no_progress and dist.is_main, dist=dist,
            layer=TILE_LAYERS[args.format](args.out) if layer else None,
        )
    finally:
        cleanup(dist)
    if dist.is_main:
        print(f"wrote {args.out}: {stats.n} images, {stats.n_empty} empty, {stats.img_per_s:.1f} img/s")
        if args.profile:
            import torch

            from buildseg.runtime.device import cpu_predict_workers, default_workers

            workers = (default_workers if segmenter.device.type == "cuda" else cpu_predict_workers)(args.num_workers)
            print(f"engine {segmenter.engine}, precision {segmenter.precision}, torch threads "
                  f"{torch.get_num_threads()}, loader workers {workers}")
            print(stats.profile_table())
        if stats.skipped:
            print(f"skipped {len(stats.skipped)} unreadable images (written as -1): {', '.join(stats.skipped[:10])}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from buildseg.report import render_report

    check_outputs((args.out, "--out", FILE))
    path = render_report(args.pred, args.truth, args.out, args.images, tuple(args.shape) if args.shape else None,
                         args.worst, before=args.before)
    print(f"wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from buildseg.evaluation import evaluate_csv, evaluate_vectors, is_footprint_file
    from buildseg.formats.spacenet import spacenet_columns

    check_outputs((args.details, "--details", FILE))
    spacenet = [spacenet_columns(args.pred) is not None, spacenet_columns(args.truth) is not None]
    if any(spacenet) and not all(spacenet):
        one, other = ("--pred", "--truth") if spacenet[0] else ("--truth", "--pred")
        raise BuildsegError(f"{one} {getattr(args, one[2:])} is a SpaceNet CSV but {other} {getattr(args, other[2:])} "
                            "is not: give both in SpaceNet's format (ImageId, BuildingId, PolygonWKT_Pix[, Confidence])")
    if not all(spacenet) and (args.matching or args.group_by):
        flag = "--matching" if args.matching else "--group-by"
        raise BuildsegError(f"{flag} applies to SpaceNet CSVs (ImageId, PolygonWKT_Pix); --pred {args.pred} is not one")
    vectors = [is_footprint_file(args.pred), is_footprint_file(args.truth)]
    if any(vectors) and not all(vectors):
        raise BuildsegError(f"--pred {args.pred} and --truth {args.truth} must both be CSVs or both footprints "
                            "(vector files or mask GeoTIFFs)")
    if all(spacenet):
        from buildseg.spacenet_scoring import evaluate_spacenet, group_table

        summary = evaluate_spacenet(args.pred, args.truth, iou_threshold=args.iou, min_area=args.min_area,
                                    matching=args.matching, group_by=args.group_by, details=args.details)
    elif all(vectors):
        summary = evaluate_vectors(args.pred, args.truth, args.iou, args.details, min_area=args.min_area or 0)
    else:
        summary = evaluate_csv(args.pred, args.truth, tuple(args.shape) if args.shape else None, args.iou, args.details,
                               min_area=args.min_area or 0)
    if args.json:
        print(json.dumps(summary))
        return 0
    if "groups" in summary:
        print(group_table(summary["groups"]))
    if "matching" in summary:
        print(f"SpaceNet CSVs: {summary['n_images']} images, {summary['geometry']}, min area {summary['min_area']:g}, "
              f"{summary['matching']} matching")
    if "dice" in summary:
        print(f"competition Dice {summary['dice']:.4f} over {summary['n_scored']} of {summary['n']} images "
              f"(both-empty dropped); IoU {summary['iou']:.4f}, pixel precision {summary['pixel_precision']:.4f}, "
              f"pixel recall {summary['pixel_recall']:.4f}, empty-tile FP rate {summary['empty_fp_rate']:.3f}")
    print(f"buildings (IoU >= {args.iou:g}): F1 {summary['f1']:.4f}, precision {summary['precision']:.4f}, "
          f"recall {summary['recall']:.4f}; {summary['n_matched']} matched of {summary['n_true']} true and "
          f"{summary['n_pred']} predicted, mean IoU of matches {summary['mean_iou']:.3f}")
    if args.details:
        print(f"{'per-image' if 'matching' in summary else 'per-building'} table: {args.details}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from buildseg.data.datasets import GridTileDataset
    from buildseg.formats.tables import load_records
    from buildseg.inference.segmenter import Segmenter
    from buildseg.inference.tune import format_table, store_in_checkpoint, tune_segmenter
    from buildseg.runtime.checkpoint import checkpoint_paths

    check_outputs((args.json, "--json", FILE))
    paths = checkpoint_paths(args.checkpoint)  # files, checked before any prediction work
    if not args.no_save:
        for path in paths:
            if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
                raise BuildsegError(f"cannot store the tuned setting in {path}: not writable; copy it somewhere writable or pass --no-save")
    records = load_records(args.data, require_masks=True)
    segmenter = Segmenter.from_checkpoint(paths, device=args.device, precision=args.precision, tta=args.tta,
                                          engine=args.engine)
    dataset = GridTileDataset(records, tile=args.tile, in_chans=segmenter.in_chans)
    tuned = tune_segmenter(segmenter, dataset, args.objective, args.batch_size)
    rows, best = tuned.rows, tuned.best
    print(f"{len(dataset)} validation tiles, {len(rows)} settings, best by {args.objective}\n")
    print(format_table(rows, tuned.default))
    if tuned.contact_rows:
        print("\nwatershed split of touching buildings: " + ", ".join(
            f"contact < {r.post.contact_threshold:.1f}: {args.objective} {r.summary[args.objective]:.4f}"
            for r in sorted(tuned.contact_rows, key=lambda r: r.post.contact_threshold)))
    if args.json:
        from buildseg.atomic import atomic_open

        with atomic_open(args.json, "w") as handle:
            handle.write(json.dumps([{**r.post.to_dict(), **r.summary} for r in rows], indent=1))
    if not args.no_save:
        for path in paths:
            store_in_checkpoint(path, best)
            print(f"stored threshold={best.threshold} min_area={best.min_area} empty_max_prob={best.empty_max_prob}"
                  f"{f' contact_threshold={best.contact_threshold}' if tuned.contact_rows else ''} in {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from buildseg.inference.export import export_checked

    check_outputs((args.onnx, "--onnx", FILE))
    if args.format == "deepness":
        from buildseg.inference.deepness import DeepnessSettings, export_deepness

        settings = DeepnessSettings(gsd=args.gsd, tile_size=args.tile_size, overlap=args.overlap)
        path, metadata, diff = export_deepness(args.checkpoint, args.onnx, settings, opset=args.opset,
                                               tolerance=args.tolerance)
        print(f"wrote {path} for QGIS Deepness; onnxruntime vs PyTorch: max |probability diff| {diff:.2e}")
        print("metadata: " + ", ".join(f"{k}={v}" for k, v in metadata.items()))
        return 0
    if args.gsd is not None:
        raise BuildsegError("--gsd applies to --format deepness (the resolution the plugin resamples to); drop it")
    path, diff = export_checked(args.checkpoint, args.onnx, args.opset, args.tolerance)
    print(f"wrote {path}; onnxruntime vs PyTorch fp32: max |logit diff| {diff:.2e}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from buildseg.adaptation.loop import AdaptSettings, adapt

    settings = AdaptSettings(**{f.name: getattr(args, f.name) for f in fields(AdaptSettings)})
    if settings.low >= settings.high:
        raise BuildsegError(f"--low {settings.low} must be below --high {settings.high}: pixels in between are ignored")
    if not settings.self_training and not settings.bn:
        raise BuildsegError("--no-self-training with --no-bn adapts nothing: turn one of them on")
    out = Path(args.out)
    if args.resume and not (out / "last.pt").is_file():
        raise BuildsegError(f"cannot resume: {out / 'last.pt'} does not exist; drop --resume to start a new adapt run")
    if not args.resume:
        check_outputs((out, "--out", FOLDER))
        if (out / "best.pt").exists() or (out / "last.pt").exists():
            raise BuildsegError(f"{out} already holds a run; give a new --out, or --resume to continue it")
    result = adapt(args.checkpoint, args.data, out, settings, resume=args.resume, stac_asset=args.stac_asset)
    print(f"adapted for {result.steps_done} steps (stopped by {result.stopped_by}); {100 * result.kept_fraction:.0f}% of "
          f"target pixels were confident pseudo-labels")
    if result.history:
        best = max(result.history, key=lambda r: r["val_dice"])
        print(f"target validation Dice: best {best['val_dice']:.4f} at step {best['step']}")
    print(f"adapted model: {out / 'best.pt'} (predict with --checkpoint {out})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from buildseg.inference.quantize import quantize

    verdict = quantize(args.checkpoint, args.data, n_tiles=args.n_tiles, tile=args.tile, max_drop=args.max_drop or None)
    print(f"wrote {verdict.path} (int8, calibrated on {verdict.n_calibration} tiles)")
    if verdict.accuracy_control:
        print(f"plain int8 lost {verdict.dice_fp32 - verdict.dice_plain_int8:.4f} Dice (> --max-drop {args.max_drop}); "
              "NNCF's accuracy control kept the costliest layers in fp32")
    print(f"competition Dice on the validation tiles: fp32 {verdict.dice_fp32:.4f}, int8 {verdict.dice_int8:.4f} "
          f"(change {verdict.change:+.4f}); {'accepted' if verdict.accepted else 'refused'} for --precision auto: "
          f"{verdict.reason}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from buildseg.data.store import DecodedStore, StoreUnavailable
    from buildseg.formats.tables import load_records

    store = DecodedStore(load_records(args.data, require_masks=True), args.in_chans, "disk", args.cache_dir)
    try:
        stats = store.build(progress=True)
    except StoreUnavailable as exc:
        raise BuildsegError(f"{exc}; pass --cache-dir DIR on a writable disk with room") from None
    print(f"decoded-image store in {stats.folder}: {stats.entries} images ({stats.built} decoded now), "
          f"{stats.bytes / 1e9:.2f} GB for this dataset")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from buildseg.data.synth import write_dataset

    check_outputs((args.out, "--out", FOLDER))
    paths = write_dataset(args.out, args.n_train, args.train_size, args.n_test, args.test_size, seed=args.seed)
    print(f"wrote {paths.train_csv}, {paths.test_csv}, {paths.test_truth_csv}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from buildseg.demo import run_demo

    check_outputs((args.out, "--out", FOLDER))
    run_demo(Path(args.out), minutes=args.minutes, encoder=args.encoder)
    return 0


COMMANDS = {"adapt": cmd_adapt, "quantize": cmd_quantize, "cache": cmd_cache, "train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "report": cmd_report, "tune": cmd_tune, "export": cmd_export, "synth": cmd_synth, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("timm", "PIL", "matplotlib", "pyogrio", "fiona", "rasterio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except BuildsegError as exc:
        print(f"buildseg {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
