"""The few-label check: does fine-tuning on these few tiles beat the model it starts from?

``train --init MODEL --data FEW.csv`` (the few-label schedule, ``training/init.py``) has no
held-out tiles to tell a good fine-tune from a harmful one, and on one or three tiles of a new
place a fine-tune can score below the model it started from (benchmarks/README.md, "Few
labels"). So, before the real fine-tune, the same schedule runs twice on half of the labels and
is scored on the other half, against the init untouched on the same half (a two-fold
cross-fit):

* 2 or more tiles: the tiles are split into two groups (alternately, in a seeded order);
* 1 tile: the tile is cut into two halves across its longer side (written to
  ``RUN/few_check/data/``), each half a labelled image of its own.

The fine-tune is kept when its mean Dice gain over the two held-out halves is positive;
otherwise ``best.pt`` gets the init's weights and post-processing (the fine-tuned weights stay
in ``last.pt``) and the end-of-run line says so. A part with no building in its truth is
scored 1 for the model that predicts none there (the competition drops such an image, but the
other model's false buildings are errors); when both predict none it is not scored, and with
no scored part the init is kept (no evidence for a change).

The check costs two more few-label trainings (``train.few_check``, ``--no-few-check`` skips
it). Its result is ``RUN/few_check.json``; each half-run keeps only its ``score.json``, so a
resumed run skips what is done. Rank 0 only: under torchrun the check is skipped.

Lives beside ``pipeline.py``: it trains (``training/``) and scores with the inference core.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from buildseg.config import Config
from buildseg.data.corpus import with_manifest
from buildseg.formats import rle as rle_codec
from buildseg.formats.images import image_size, read_image, write_png
from buildseg.formats.tables import Record, load_records, write_atomic_csv
from buildseg.training.init import few_label_applies, few_regime, init_spec

log = logging.getLogger("buildseg")
CHECK_DIR = "few_check"
HALF_CHANNELS = (1, 3, 4)  # a half tile is written as PNG: gray, RGB or RGBA


@dataclass
class FoldScore:
    """The init and the half-run's fine-tune on one held-out part (competition Dice)."""

    base: float | None  # None: neither scored anything (no building in the truth, none predicted)
    tuned: float | None  # one model that predicts nothing on building-free truth, the other something: 1.0 and < 1
    held_out: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, base: float | None, tuned: float | None, *, held_out: list[str]) -> "FoldScore":
        """Nothing scored (None) against a score: no building drawn on building-free truth, 1.0."""
        if (base is None) != (tuned is None):
            base, tuned = (1.0 if base is None else base), (1.0 if tuned is None else tuned)
        return cls(base, tuned, held_out)


@dataclass
class FewCheck:
    unit: str  # "tiles" or "halves of the tile"
    folds: list[FoldScore]
    seconds: float = 0.0

    @property
    def gains(self) -> list[float]:
        return [f.tuned - f.base for f in self.folds if f.base is not None and f.tuned is not None]

    @property
    def accepted(self) -> bool:
        return bool(self.gains) and float(np.mean(self.gains)) > 0

    def line(self) -> str:
        """What the user reads at the end of ``buildseg train``."""
        parts = ", ".join("-" if f.base is None or f.tuned is None else f"{f.base:.3f} -> {f.tuned:.3f}" for f in self.folds)
        verdict = ("the fine-tune is kept in best.pt" if self.accepted else
                   "best.pt holds the init's weights (the fine-tune is in last.pt)")
        gain = f"mean gain {np.mean(self.gains):+.3f}" if self.gains else "nothing to score"
        return (f"few-label check ({self.unit}, {self.seconds:.0f} s): held-out Dice init -> fine-tune {parts}; "
                f"{gain}: {verdict}")


def check_applies(config: Config) -> bool:
    """The few-label schedule applies, the check is on, and this is a single process."""
    if (not config.train.init or not config.train.few_check or int(os.environ.get("WORLD_SIZE", "1")) > 1
            or config.data.labels):
        return False
    return few_label_applies(config, len(load_records(config.data.train, require_masks=True)))


def _labelled(config: Config) -> list[Record]:
    records = load_records(config.data.train, require_masks=True)
    return with_manifest(records, config.data.manifest) if config.data.manifest else records


def _halves(record: Record, folder: Path, in_chans: int) -> list[Record]:
    """The tile cut across its longer side into two labelled PNG images."""
    image = read_image(record.image_path, in_chans)
    mask = record.load_mask(image.shape[:2])
    axis = 1 if image.shape[1] >= image.shape[0] else 0
    cut = image.shape[axis] // 2
    out = []
    for name, part in (("a", slice(0, cut)), ("b", slice(cut, None))):
        index = (slice(None), part) if axis == 1 else (part, slice(None))
        path = folder / f"{record.img_id}_{name}.png"
        write_png(path, image[index])
        out.append(Record(f"{record.img_id}_{name}", path, rle=rle_codec.encode(mask[index]), source=str(path),
                          tile_source=record.tile_source, gsd=record.gsd))
    return out


def _parts(records: list[Record], folder: Path, in_chans: int, seed: int) -> tuple[str, list[list[Record]]] | None:
    """(unit, the two groups) or None when the labels cannot be split."""
    if len(records) >= 2:
        order = np.random.default_rng(seed).permutation(len(records))
        return "tiles", [[records[i] for i in order[0::2]], [records[i] for i in order[1::2]]]
    if in_chans not in HALF_CHANNELS:
        log.info("few-label check skipped: one %d-band tile cannot be cut into PNG halves", in_chans)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return "halves of the tile", [[half] for half in _halves(records[0], folder, in_chans)]


def _write_csv(records: list[Record], path: Path) -> Path:
    rows = [(r.img_id, str(Path(r.image_path).resolve()),
             r.rle if r.rle is not None else rle_codec.encode(r.load_mask(image_size(r.image_path))),
             r.tile_source, "" if r.gsd is None else r.gsd) for r in records]
    return write_atomic_csv(path, ("img_id", "img_path", "mask_rle", "source", "gsd"), rows)


def held_out_dice(checkpoint: str | Path, records: list[Record], *, config: Config) -> float | None:
    """Competition Dice of a checkpoint (its stored post-processing) on labelled images, at the
    model's GSD; None when no image has a building in truth or prediction."""
    from buildseg.data.datasets import GridTileDataset
    from buildseg.inference.core.postprocess import apply
    from buildseg.inference.core.segmenter import Segmenter
    from buildseg.inference.jobs.tune import predict_tiles
    from buildseg.metrics import Scoreboard

    segmenter = Segmenter.from_checkpoint(checkpoint, device=config.train.device, precision="fp32")
    gsd = config.data.gsd or segmenter.input.get("gsd")
    dataset = GridTileDataset(records, tile=config.data.val_tile, in_chans=config.model.in_chans, target_gsd=gsd)
    board = Scoreboard()
    probs, truths = predict_tiles(segmenter, dataset, batch_size=config.train.batch_size)
    for prob, truth in zip(probs, truths):
        board.add(apply(prob, segmenter.postprocess), truth)
    summary = board.summary()
    return float(summary["dice"]) if summary["n_scored"] else None


def _fold(config: Config, *, train: list[Record], held: list[Record], folder: Path, base: str,
          n_labels: int) -> FoldScore:
    """One half-run: the few-label schedule on ``train``, scored with the init on ``held``."""
    from buildseg.training.loop import train as run_training

    done = folder / "score.json"
    if done.is_file():
        return FoldScore(**json.loads(done.read_text()))
    sub = copy.deepcopy(config)
    lr, frozen = few_regime(config, n_labels)  # the half-runs run the schedule the whole fine-tune will run
    sub.train.few_lr = sub.train.few_lr_many = lr
    sub.train.few_freeze_norms = "on" if frozen else "off"
    sub.data.train, sub.data.manifest = str(_write_csv(train, folder / "labels.csv")), None
    sub.train.out, sub.train.tensorboard, sub.train.quantize_at_end = str(folder), False, False
    run_training(sub)
    score = FoldScore.of(held_out_dice(base, held, config=sub), held_out_dice(folder / "best.pt", held, config=sub),
                         held_out=[r.img_id for r in held])
    for name in ("best.pt", "last.pt"):
        (folder / name).unlink(missing_ok=True)  # 100+ MB each; the score is what the check needs
    done.write_text(json.dumps(asdict(score)))
    return score


def run_check(config: Config) -> FewCheck | None:
    """The two half-runs of the check, in ``RUN/few_check/`` (see the module)."""
    started = time.perf_counter()
    work = Path(config.train.out) / CHECK_DIR
    labelled = _labelled(config)
    split = _parts(labelled, work / "data", config.model.in_chans, config.train.seed)
    if split is None:
        return None
    unit, groups = split
    log.info("few-label check: fine-tune on half of the labels (%s), score on the other half, both ways", unit)
    base = init_spec(config.train.init)
    folds = [_fold(config, train=groups[i], held=groups[1 - i], folder=work / f"fold{i}", base=base,
                   n_labels=len(labelled)) for i in (0, 1)]
    check = FewCheck(unit, folds, time.perf_counter() - started)
    (Path(config.train.out) / "few_check.json").write_text(json.dumps({**asdict(check), "accepted": check.accepted}))
    log.info(check.line())
    return check


def keep_init(run_dir: Path, init: str) -> None:
    """``best.pt`` gets the init's weights, card and post-processing (the check refused the
    fine-tune): the init's network unchanged, so its fitted per-image heads still hold."""
    import torch

    from buildseg.runtime.checkpoint import load_checkpoint, save_atomic

    best = Path(run_dir) / "best.pt"
    payload = torch.load(best, map_location="cpu", weights_only=True)
    origin = load_checkpoint(init_spec(init))
    payload["model"] = origin["model"]
    payload["model_card"] = origin["model_card"]
    if origin.get("postprocess") is not None:
        payload["postprocess"] = origin["postprocess"]
    save_atomic(payload, best)
