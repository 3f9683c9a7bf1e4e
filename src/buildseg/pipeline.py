"""Training followed by the post-processing search: what ``buildseg train`` runs.

Kept apart from ``training/`` (which never imports ``inference/``) and from the CLI (which only
parses and prints). After training, when there are validation tiles and ``train.tune_at_end``
is on, the threshold x min-area x empty-tile rule that scores best on them (by the monitored
score, Dice or building F1) is stored in ``best.pt``, where ``predict`` picks it up. The
empty-tile false-positive rate (a speck on an empty tile scores 0) is reported with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from buildseg.config import Config

log = logging.getLogger("buildseg")


@dataclass
class TuneOutcome:
    post: object  # PostProcess
    before: dict  # the plain setting (threshold 0.5, nothing removed) on the validation tiles
    after: dict


def tune_best(config: Config, run_dir: Path, val_set) -> TuneOutcome | None:
    """Search the post-processing for ``run_dir/best.pt`` on ``val_set`` and store it there."""
    from buildseg.inference.segmenter import Segmenter
    from buildseg.inference.tune import store_in_checkpoint, tune_segmenter

    best = Path(run_dir) / "best.pt"
    if val_set is None or len(val_set) == 0 or not best.is_file():
        return None
    t = config.train
    segmenter = Segmenter.from_checkpoint(best, device=t.device, precision=t.precision)
    tuned = tune_segmenter(segmenter, val_set, t.monitor, t.batch_size)
    store_in_checkpoint(best, tuned.best)
    after = (tuned.contact_rows or tuned.rows)[0].summary
    return TuneOutcome(tuned.best, tuned.default.summary, after)


def train_and_tune(config: Config, resume: str | Path | None = None):
    """(TrainResult, TuneOutcome or None); tuning runs on rank 0 only."""
    from buildseg.training.loop import train

    result = train(config, resume=resume)
    outcome = None
    if config.train.tune_at_end and result.is_main:
        outcome = tune_best(config, result.run_dir, result.val_set)
    return result, outcome
