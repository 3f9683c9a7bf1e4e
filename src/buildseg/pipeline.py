"""Training followed by the post-processing search and the int8 model: what ``buildseg train`` runs.

Kept apart from ``training/`` (which never imports ``inference/``) and from the CLI (which only
parses and prints). After training, when there are validation tiles and ``train.tune_at_end``
is on, the threshold x min-area x empty-tile rule that scores best on them (by the monitored
score, Dice or building F1) is stored in ``best.pt``, where ``predict`` picks it up. The
empty-tile false-positive rate (a speck on an empty tile scores 0) is reported with it.

Then, with ``train.quantize_at_end`` (default) and the ``cpu`` extra installed, an int8
OpenVINO model of ``best.pt`` is calibrated on training crops and kept only if the validation
Dice (after the tuned post-processing) stays within ``quantize.MAX_DROP`` of fp32
(``inference/jobs/quantize.py``); ``predict --precision auto`` uses it on CPUs without bf16.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from buildseg.config import Config, apply_overrides, flag_name, load_config, overrides_from

log = logging.getLogger("buildseg")


@dataclass
class TuneOutcome:
    post: object  # PostProcess
    before: dict  # the plain setting (threshold 0.5, nothing removed) on the validation tiles
    after: dict


def tune_best(config: Config, run_dir: Path, val_set) -> TuneOutcome | None:
    """Search the post-processing for ``run_dir/best.pt`` on ``val_set`` and store it there."""
    from buildseg.inference.core.segmenter import Segmenter
    from buildseg.inference.jobs.tune import store_in_checkpoint, tune_segmenter

    best = Path(run_dir) / "best.pt"
    if val_set is None or len(val_set) == 0 or not best.is_file():
        return None
    t = config.train
    segmenter = Segmenter.from_checkpoint(best, device=t.device, precision=t.precision)
    tuned = tune_segmenter(segmenter, val_set, t.monitor, t.batch_size)
    store_in_checkpoint(best, tuned.best)
    after = (tuned.contact_rows or tuned.rows)[0].summary
    return TuneOutcome(tuned.best, tuned.default.summary, after)


INT8_SHARE = 0.25  # the end-of-training int8 step may take at most this share of the training's own time
INT8_MIN_S = 15.0  # ... and is left to predict/quantize when that share is shorter (a plain calibration takes ~10 s)


def quantize_best(config: Config, run_dir: Path, train_set, val_set, *, train_seconds: float | None = None):
    """The int8 model of ``run_dir/best.pt`` and its verdict (``quantize.Int8Verdict``), or
    None when there is nothing to judge it on, the ``cpu`` extra is missing, or the step would
    not be cheap against the run: it gets at most :data:`INT8_SHARE` of ``train_seconds`` (and
    ``train.quantize_time_limit``), so a 2-minute run is not made 5 minutes long by NNCF."""
    from buildseg import extras
    from buildseg.inference.jobs.quantize import CALIBRATION_TILES, VALIDATION_TILES, calibrate_int8, sample_images, sample_tiles

    best = Path(run_dir) / "best.pt"
    if val_set is None or len(val_set) == 0 or train_set is None or len(train_set) == 0 or not best.is_file():
        return None
    if not (extras.installed("openvino") and extras.installed("nncf")):
        log.info("int8 at the end of training skipped: it needs the cpu extra (pip install 'buildseg[cpu]')")
        return None
    limit = config.train.quantize_time_limit * 60
    if train_seconds is not None:
        limit = min(limit, INT8_SHARE * train_seconds)
        if limit < INT8_MIN_S:
            log.info("int8 at the end of training skipped: the run took %.0f s and the step may take %.0f%% of it (%.0f s "
                     "< %.0f s); `predict --precision auto` makes one when a job repays it, `buildseg quantize` now",
                     train_seconds, 100 * INT8_SHARE, limit, INT8_MIN_S)
            return None
    tiles = sample_tiles(val_set, VALIDATION_TILES, seed=config.train.seed)
    images = sample_images(train_set, CALIBRATION_TILES, side=config.data.val_tile, seed=config.train.seed)
    return calibrate_int8(best, calibration=images, validation=tiles, time_limit=limit)


@dataclass
class Finished:
    """What ``buildseg train`` did after the loop: the post-processing search and the int8 model."""

    tuned: TuneOutcome | None = None
    int8: object | None = None  # quantize.Int8Verdict
    few_check: object | None = None  # few_check.FewCheck: fine-tune or init in best.pt

    def lines(self) -> list[str]:
        """What the user reads about it at the end of ``buildseg train``."""
        out = [self.few_check.line()] if self.few_check is not None else []
        if self.tuned is not None:
            p, a, b = self.tuned.post, self.tuned.before, self.tuned.after
            out.append(f"post-processing tuned on the validation tiles and stored in best.pt: threshold "
                       f"{p.threshold:.2f}, min_area {p.min_area}, empty if max prob < {p.empty_max_prob:.2f}; Dice "
                       f"{a['dice']:.4f} -> {b['dice']:.4f}, building F1 {a['f1']:.4f} -> {b['f1']:.4f}, empty-tile FP "
                       f"rate {a['empty_fp_rate']:.3f} -> {b['empty_fp_rate']:.3f}")
        if self.int8 is not None:
            out.append(int8_line(self.int8, "end of training"))
        return out


def int8_line(verdict, when: str) -> str:
    """One line on an int8 calibration: kept or refused, the Dice of both, the time it took."""
    scored = "" if verdict.dice_int8 is None else (f"; Dice fp32 {verdict.dice_fp32:.4f}, int8 {verdict.dice_int8:.4f} "
                                                   f"({verdict.change:+.4f})")
    control = " with NNCF accuracy control" if verdict.accuracy_control else ""
    use = ("`predict --precision auto` uses it on CPUs without bf16" if verdict.accepted
           else "predict stays fp32/bf16; `buildseg quantize` can retry")
    state = f"accepted ({verdict.path})" if verdict.accepted else f"refused: {verdict.reason}"
    return (f"int8 model ({when}, {verdict.n_calibration} calibration / {verdict.n_validation} validation tiles"
            f"{control}, {verdict.seconds:.0f} s) {state}{scored}; {use}")


def config_from_args(args) -> Config:
    """The run's config from ``buildseg train``'s flags: the resumed run's or ``--config``'s,
    with the flags given on top."""
    if args.resume:
        from buildseg.training.loop import resume_config

        base = resume_config(args.resume)
    else:
        base = load_config(args.config)
    overrides = overrides_from(args)
    return apply_overrides(base, overrides, {k: flag_name(k) for k in overrides if k != "loss"})


def check_training_inputs(config: Config) -> None:
    """What ``train`` can refuse without reading the data or writing into ``--out``: an imagery
    service without its ``--labels``/``--aoi``, and an ``--init`` that is missing, has no
    checkpoint, or is another network, other bands or targets than this run's (checked on a copy
    of the config: the run applies it itself)."""
    import copy

    from buildseg.training.init import apply_init
    from buildseg.training.setup import check_bands_config, check_service_input

    check_service_input(config)
    if config.train.init:
        trial = copy.deepcopy(config)
        check_bands_config(trial)
        apply_init(trial)


def train_and_tune(config: Config, resume: str | Path | None = None):
    """(TrainResult, Finished); tuning and int8 run on rank 0 only, tuning first (the
    int8 verdict judges the tuned post-processing). A few-label fine-tune is checked first
    (``few_check.py``) and best.pt gets the init back when the check refuses it."""
    from buildseg.few_check import check_applies, keep_init, run_check
    from buildseg.training.loop import train

    if resume is None:
        check_training_inputs(config)  # a refused --init or service area before the few-label check writes
    check = run_check(config) if check_applies(config) else None
    started = time.monotonic()
    result = train(config, resume=resume)
    train_seconds = time.monotonic() - started
    finished = Finished(few_check=check)
    if check is not None and not check.accepted and result.is_main:
        keep_init(result.run_dir, config.train.init)
    if config.train.tune_at_end and result.is_main:
        finished.tuned = tune_best(config, result.run_dir, result.val_set)
    if config.train.quantize_at_end and result.is_main:
        finished.int8 = quantize_best(config, result.run_dir, result.train_set, result.val_set,
                                      train_seconds=train_seconds)
    return result, finished
