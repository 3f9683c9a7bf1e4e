"""Command line: parse arguments, build the command's settings, call one library function,
print what it returns. Nothing else.

``buildseg train|predict|evaluate|report|tune|export|adapt|quantize|cache|synth|demo``;
``python -m buildseg`` is the same. Every flag is generated from a settings dataclass
(``settings/``, ``adaptation/settings.py``; ``config.py`` for ``train``), which owns its
default, help, choices, range and the rules between flags; none is declared here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from buildseg.errors import BuildsegError, one_line
from buildseg.outputs import FILE, FOLDER, check_outputs
from buildseg.settings.fields import add_flags

log = logging.getLogger("buildseg")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: exit 2, the flag, the value and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def commands() -> dict[str, tuple[type, str]]:
    """command -> (its settings class, one line of help), in the order --help lists them."""
    from buildseg.adaptation.settings import AdaptRun
    from buildseg.settings.data import CacheSettings, DemoSettings, SynthSettings
    from buildseg.settings.evaluate import EvaluateSettings, ReportSettings
    from buildseg.settings.models import ExportSettings, ModelsSettings, QuantizeSettings, TuneSettings
    from buildseg.settings.predict import PredictSettings
    from buildseg.settings.train import TrainRun

    return {
        "train": (TrainRun, "train a model on a competition CSV, an images/masks folder or GeoTIFF scenes + footprints"),
        "predict": (PredictSettings, "predict tiles into a submission CSV, a GeoTIFF into a mask and footprints, or "
                    "many scenes into a folder"),
        "report": (ReportSettings, "one self-contained HTML page: scores, Dice histogram, worst tiles, errors"),
        "evaluate": (EvaluateSettings, "score predictions: competition Dice and building F1"),
        "tune": (TuneSettings, "search threshold x min-area x empty rule for the competition Dice; store it in the "
                 "checkpoint"),
        "export": (ExportSettings, "export a checkpoint to ONNX (dynamic batch and size) with a parity check"),
        "adapt": (AdaptRun, "adapt a trained model to unlabelled imagery of a new place (self-training)"),
        "quantize": (QuantizeSettings, "int8 model for --engine openvino --precision int8, calibrated with NNCF"),
        "models": (ModelsSettings, "list the packaged models (--model NAME, train --init NAME), or one model's card"),
        "cache": (CacheSettings, "decode a training set once into the disk store ahead of a run"),
        "synth": (SynthSettings, "write a synthetic demo dataset in the competition format"),
        "demo": (DemoSettings, "synth data -> train a few minutes -> predict -> evaluate"),
    }


def build_parser() -> argparse.ArgumentParser:
    from buildseg import __version__
    from buildseg.adaptation.settings import AdaptSettings
    from buildseg.config import add_config_flags

    parser = Parser(prog="buildseg", description="Building footprint segmentation in overhead imagery.")
    parser.add_argument("--version", action="version", version=f"buildseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (settings, text) in commands().items():
        command = sub.add_parser(name, help=text)
        add_flags(command, settings)
        if name == "train":
            add_config_flags(command)
        if name == "adapt":
            add_flags(command, AdaptSettings)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from buildseg.launch import needs_relaunch, relaunch_with_torchrun

    if needs_relaunch(args.nproc):
        return relaunch_with_torchrun(args.nproc, sys.argv[1:])
    from buildseg.pipeline import config_from_args, train_and_tune

    config = config_from_args(args)
    check_outputs((config.train.out, "--out", FOLDER))
    result, finished = train_and_tune(config, resume=args.resume)
    if result.is_main:
        score = "building F1" if result.monitor == "f1" else "Dice"
        print(f"best val {score} {result.best_score:.4f} after {result.epochs_done} epochs (stopped by "
              f"{result.stopped_by})")
        print(f"checkpoints: {result.run_dir / 'best.pt'}  {result.run_dir / 'last.pt'}")
        print(f"curves: {result.run_dir / 'curves.png'}")
        for line in finished.lines():
            print(line)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from buildseg.inference.prediction import run_prediction
    from buildseg.settings.predict import PredictSettings

    settings = PredictSettings.from_args(args)
    outcome = run_prediction(settings)
    if not outcome.is_main:
        return 0
    if outcome.kind == "merge":
        summary = outcome.summary
        print(f"merged {summary['scenes']} scenes into {summary['merged']} ({summary['n_footprints']} footprints); "
              f"manifest {Path(settings.merge) / 'manifest.json'}")
    elif outcome.kind == "scenes":
        summary = outcome.summary
        if "area" in summary:
            area = summary["area"]
            print(f"tile service at zoom {area['zoom']} ({area['gsd_m']} m per pixel): the AOI in {area['pieces']} "
                  f"piece(s)")
        done = f"{summary['predicted']} scenes predicted, {summary['skipped']} already done"
        if summary["remaining"]:
            print(f"{done}; {summary['remaining']} scenes of other shards remain: the last shard merges, or run "
                  f"buildseg predict --merge {settings.out}")
        else:
            print(f"{done}; merged layer {summary['merged']} ({summary['n_footprints']} footprints); manifest "
                  f"{Path(settings.out) / 'manifest.json'}")
            if summary.get("gaps"):
                print(f"warning: {summary['gaps']} tile(s) could not be read and are gaps (no buildings there); their "
                      "bounds are in the manifest under areas; run again later to fill them")
    elif outcome.kind == "geotiff":
        result = outcome.geo
        print(f"wrote {result.mask_path} (CRS {result.crs or 'none: pixel coordinates'})")
        if result.footprints_path:
            print(f"wrote {result.footprints_path}: {result.n_polygons} building footprints (area in "
                  f"{result.area_unit or 'CRS units'})")
    else:
        _print_tiles(settings, outcome)
    if outcome.conflation:
        c = outcome.conflation
        print(f"against {settings.existing}: {c['new']} new, {c['mapped']} already mapped, {c['unconfirmed']} mapped "
              f"buildings unconfirmed; new ones for editors: {c['editor']}; unconfirmed: {c['unconfirmed_layer']}")
    if outcome.overview:
        print(f"overview: {outcome.overview} (the imagery with what was found; `buildseg report --run "
              f"{Path(outcome.overview).parent}` makes a page of it)")
    return 0


def _print_tiles(settings, outcome) -> None:
    stats = outcome.stats
    print(f"wrote {settings.out}: {stats.n} images, {stats.n_empty} empty, {stats.img_per_s:.1f} img/s")
    if settings.profile:
        import torch

        from buildseg.runtime.device import cpu_predict_workers, default_workers

        workers = (default_workers if outcome.device_type == "cuda" else cpu_predict_workers)(settings.num_workers)
        print(f"engine {outcome.engine}, precision {outcome.precision}, torch threads {torch.get_num_threads()}, "
              f"loader workers {workers}")
        print(stats.profile_table())
    for note in stats.notes:
        print(note)
    if stats.skipped:
        print(f"skipped {len(stats.skipped)} unreadable images (written as -1): {', '.join(stats.skipped[:10])}")


def cmd_report(args: argparse.Namespace) -> int:
    from buildseg.report import render_report
    from buildseg.settings.evaluate import ReportSettings

    s = ReportSettings.from_args(args)
    check_outputs((s.out, "--out", FILE))
    if s.run:
        from buildseg.report import render_run_report

        print(f"wrote {render_run_report(s.run, s.out)}")
        return 0
    print(f"wrote {render_report(s.pred, s.truth, s.out, s.images, s.shape, s.worst, before=s.before)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from buildseg.evaluation import evaluate, summary_lines
    from buildseg.settings.evaluate import EvaluateSettings

    settings = EvaluateSettings.from_args(args)
    check_outputs((settings.details, "--details", FILE))
    summary = evaluate(settings)
    print(json.dumps(summary) if settings.json else "\n".join(summary_lines(summary, settings)))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from buildseg.inference.jobs.tune import run_tune
    from buildseg.settings.models import TuneSettings

    settings = TuneSettings.from_args(args)
    check_outputs((settings.json, "--json", FILE))
    for line in run_tune(settings):
        print(line)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from buildseg.settings.models import ExportSettings

    s = ExportSettings.from_args(args)
    check_outputs((s.onnx, "--onnx", FILE))
    if s.format == "deepness":
        from buildseg.inference.jobs.deepness import DeepnessSettings, export_deepness

        path, metadata, diff = export_deepness(s.checkpoint, s.onnx, DeepnessSettings(s.gsd, s.tile_size, s.overlap),
                                               opset=s.opset, tolerance=s.tolerance)
        print(f"wrote {path} for QGIS Deepness; onnxruntime vs PyTorch: max |probability diff| {diff:.2e}")
        print("metadata: " + ", ".join(f"{k}={v}" for k, v in metadata.items()))
        return 0
    from buildseg.inference.jobs.export import export_checked

    path, diff = export_checked(s.checkpoint, s.onnx, opset=s.opset, tolerance=s.tolerance)
    print(f"wrote {path}; onnxruntime vs PyTorch fp32: max |logit diff| {diff:.2e}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from buildseg.adaptation.loop import adapt, check_adapt_output
    from buildseg.adaptation.settings import AdaptRun, AdaptSettings

    run, settings = AdaptRun.from_args(args), AdaptSettings.from_args(args)
    out = check_adapt_output(Path(run.out), resume=run.resume)
    result = adapt(run.checkpoint, run.data, out, settings, resume=run.resume, stac_asset=run.stac_asset, service=run)
    print(f"adapted for {result.steps_done} steps (stopped by {result.stopped_by}); {100 * result.kept_fraction:.0f}% of "
          f"target pixels were confident pseudo-labels")
    if result.history:
        best = max(result.history, key=lambda r: r["val_dice"])
        print(f"target validation Dice: best {best['val_dice']:.4f} at step {best['step']}")
    print(f"adapted model: {out / 'best.pt'} (predict with --checkpoint {out})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from buildseg.inference.jobs.quantize import quantize
    from buildseg.settings.models import QuantizeSettings

    s = QuantizeSettings.from_args(args)
    verdict = quantize(s.checkpoint, s.data, n_tiles=s.n_tiles, tile=s.tile, max_drop=s.max_drop or None)
    print(f"wrote {verdict.path} (int8, calibrated on {verdict.n_calibration} tiles)")
    if verdict.accuracy_control:
        print(f"plain int8 lost {verdict.dice_fp32 - verdict.dice_plain_int8:.4f} Dice (> --max-drop {s.max_drop}); "
              "NNCF's accuracy control kept the costliest layers in fp32")
    print(f"competition Dice on the validation tiles: fp32 {verdict.dice_fp32:.4f}, int8 {verdict.dice_int8:.4f} "
          f"(change {verdict.change:+.4f}); {'accepted' if verdict.accepted else 'refused'} for --precision auto: "
          f"{verdict.reason}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from buildseg.runtime.packaged import listing_lines
    from buildseg.settings.models import ModelsSettings

    settings = ModelsSettings.from_args(args)
    print("\n".join(listing_lines(settings.name, as_json=settings.json)))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from buildseg.data.store import build_disk_store
    from buildseg.settings.data import CacheSettings

    s = CacheSettings.from_args(args)
    stats = build_disk_store(s.data, in_chans=s.in_chans, cache_dir=s.cache_dir)
    print(f"decoded-image store in {stats.folder}: {stats.entries} images ({stats.built} decoded now), "
          f"{stats.bytes / 1e9:.2f} GB for this dataset")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from buildseg.data.synth import write_dataset
    from buildseg.settings.data import SynthSettings

    s = SynthSettings.from_args(args)
    check_outputs((s.out, "--out", FOLDER))
    paths = write_dataset(s.out, s.n_train, s.train_size, s.n_test, s.test_size, seed=s.seed)
    print(f"wrote {paths.train_csv}, {paths.test_csv}, {paths.test_truth_csv}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from buildseg.demo import run_demo
    from buildseg.settings.data import DemoSettings

    s = DemoSettings.from_args(args)
    check_outputs((s.out, "--out", FOLDER))
    run_demo(Path(s.out), minutes=s.minutes, encoder=s.encoder)
    return 0


COMMANDS = {"adapt": cmd_adapt, "quantize": cmd_quantize, "cache": cmd_cache, "train": cmd_train, "predict": cmd_predict,
            "evaluate": cmd_evaluate, "report": cmd_report, "tune": cmd_tune, "export": cmd_export, "synth": cmd_synth,
            "demo": cmd_demo, "models": cmd_models}


def _error(command: str, message: str) -> int:
    print(f"buildseg {command}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    from buildseg.extras import missing_extra_message

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("timm", "PIL", "matplotlib", "pyogrio", "fiona", "rasterio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except BuildsegError as exc:
        return _error(args.command, one_line(exc))
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        return _error(args.command, message)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
