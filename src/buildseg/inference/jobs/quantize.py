"""int8 models for the OpenVINO engine, calibrated with NNCF and kept only if they keep the Dice.

On CPUs without native bf16 (AVX2, AVX-512 without BF16) int8 is the fast path
(benchmarks/README.md, "Engines"). Two ways make one:

* at the end of ``buildseg train`` (``pipeline.quantize_best``, on by default when there are
  validation tiles and the ``cpu`` extra is installed): calibrated on training crops,
  judged on the validation tiles, bounded by ``train.quantize_time_limit``;
* ``buildseg quantize --checkpoint CKPT --data VAL`` for older runs and checkpoints from
  elsewhere: calibrated and judged on the tiles of ``VAL``.

Either way plain post-training quantisation comes first; when it loses more than
:data:`MAX_DROP` competition Dice (after the run's tuned post-processing), NNCF's accuracy
control puts the costliest layers back in fp32 until the loss is within it. The model
(``RUN/int8/<model key>.xml``) and its verdict (``.json`` beside it: both Dice, accepted or
refused and why) are written atomically with the run; ``--precision auto`` uses int8 on a
CPU without bf16 only when the verdict says accepted. A refused model is not kept at the end
of training (its verdict is); ``buildseg quantize`` keeps it, since a user asked for it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from buildseg import __version__, extras
from buildseg.atomic import atomic_open, atomic_path
from buildseg.errors import BuildsegError
from buildseg.inference.core import engines
from buildseg.inference.core.postprocess import PostProcess, apply
from buildseg.metrics import Scoreboard
from buildseg.runtime.checkpoint import checkpoint_paths, load_model
from buildseg.settings.models import CALIBRATION_TILES, MAX_DROP

log = logging.getLogger("buildseg")
VALIDATION_TILES = 500  # tiles the verdict is judged on (a random subset of larger validation sets)
RANKING_TILES = 100  # accuracy control ranks layers on this many of them

Tile = tuple[np.ndarray, np.ndarray]  # (1, C, h, w) float32 raw pixels, (h, w) uint8 truth


class TimeCapReached(Exception):
    """Raised from the Dice function once the time cap has passed: stops NNCF mid-search."""


@dataclass
class Int8Verdict:
    """What a calibration found; written as JSON beside the int8 model."""

    accepted: bool
    reason: str
    dice_fp32: float
    dice_int8: float | None  # the kept candidate's Dice (None: none was scored in time)
    max_drop: float | None  # None: plain int8 only, no acceptance rule (``buildseg quantize --max-drop 0``)
    n_calibration: int
    n_validation: int
    accuracy_control: bool = False  # the candidate came from NNCF's accuracy control
    dice_plain_int8: float | None = None  # the plain PTQ model's Dice
    seconds: float = 0.0
    path: str | None = None  # the int8 model's .xml; None when it was refused and not kept
    truth: str = "labels"  # what the Dice was measured against: "labels", or "fp32 masks" (label-free, first use)

    @property
    def change(self) -> float | None:
        return None if self.dice_int8 is None else self.dice_int8 - self.dice_fp32


def tile_dice(post: PostProcess, deadline: float | None = None) -> Callable[[object, Sequence[Tile]], float]:
    """The competition Dice of a compiled OpenVINO model on ``(image, truth)`` tiles after
    the run's post-processing: the quantity int8 must not lose, and NNCF's validation
    function. Raises :class:`TimeCapReached` once ``deadline`` (time.monotonic) has passed."""

    def score(compiled, tiles: Sequence[Tile]) -> float:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeCapReached
        board = Scoreboard()
        for image, truth in tiles:
            logits = np.asarray(compiled(image)[0], dtype=np.float64)[0, 0]
            board.add(apply((1.0 / (1.0 + np.exp(-logits))).astype(np.float32), post), truth)
        return float(board.summary()["dice"])

    return score


def calibrate_int8(checkpoint: str | Path, *, calibration: Sequence[np.ndarray], validation: Sequence[Tile],
                   max_drop: float | None = MAX_DROP, time_limit: float | None = None,
                   keep_refused: bool = False, truth: str = "labels") -> Int8Verdict:
    """Quantise ``checkpoint``'s graph on ``calibration`` images ((1, C, h, w) float32 raw
    pixels) and judge it on ``validation`` tiles; write the model (when accepted or
    ``keep_refused``) and the verdict with the run. ``time_limit``: seconds for the whole
    step; past it the step stops at the next Dice evaluation and the candidate is refused."""
    if not extras.installed("openvino") or not extras.installed("nncf"):
        raise BuildsegError("int8 quantisation needs openvino and nncf: pip install 'buildseg[cpu]'")
    if not calibration or not validation:
        raise BuildsegError("int8 calibration needs at least one calibration image and one validation tile")
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    start = time.monotonic()
    path = Path(checkpoint)
    model, payload = load_model(path)
    post = PostProcess.from_dict(payload.get("postprocess"))
    onnx = str(engines.cached_onnx(model, engines.cache_folder(path)))
    core = ov.Core()
    score = tile_dice(post, None if time_limit is None else start + time_limit)
    out = engines.int8_path(model, path)
    tally = dict(max_drop=max_drop, n_calibration=len(calibration), n_validation=len(validation), truth=truth)
    candidate, plain, controlled, dice_fp32 = None, None, False, float("nan")
    try:
        dice_fp32 = score(core.compile_model(onnx, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), validation)
        dataset = nncf.Dataset(list(calibration))
        candidate = nncf.quantize(core.read_model(onnx), dataset, subset_size=len(calibration))
        plain = score(core.compile_model(candidate, "CPU"), validation)
        dice_int8 = plain
        if max_drop is not None and dice_fp32 - plain > max_drop:
            log.info("plain int8 lost %.4f Dice (> %.4f): quantising again with NNCF's accuracy control",
                     dice_fp32 - plain, max_drop)
            restorer = AdvancedAccuracyRestorerParameters(ranking_subset_size=min(len(validation), RANKING_TILES))
            candidate = nncf.quantize_with_accuracy_control(
                core.read_model(onnx), dataset, nncf.Dataset(list(validation), lambda tile: tile[0]), score,
                max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration),
                advanced_accuracy_restorer_parameters=restorer)
            controlled = True
            dice_int8 = score(core.compile_model(candidate, "CPU"), validation)
    except TimeCapReached:
        seconds = time.monotonic() - start
        verdict = Int8Verdict(False, f"stopped at the time cap ({time_limit:.0f} s) before a candidate was judged",
                              dice_fp32=dice_fp32, dice_int8=None,
                              accuracy_control=plain is not None, dice_plain_int8=plain, seconds=seconds, **tally)
        return _record(verdict, None, out)
    accepted = max_drop is None or dice_fp32 - dice_int8 <= max_drop
    if max_drop is None:
        reason = "plain int8, no accuracy rule asked for"
    elif accepted:
        reason = f"Dice change {dice_int8 - dice_fp32:+.4f} is within {max_drop:g} of fp32"
    else:
        reason = f"Dice change {dice_int8 - dice_fp32:+.4f} exceeds the {max_drop:g} allowed, even with accuracy control"
    verdict = Int8Verdict(accepted, reason, dice_fp32=dice_fp32, dice_int8=dice_int8, accuracy_control=controlled,
                          dice_plain_int8=plain, seconds=time.monotonic() - start, **tally)
    return _record(verdict, candidate if accepted or keep_refused else None, out)


def _record(verdict: Int8Verdict, model, out: Path) -> Int8Verdict:
    """Write the model (or remove a stale one of the same weights) and then the verdict,
    each atomically: an accepted verdict on disk always has its model beside it."""
    import openvino as ov

    if model is not None:
        with atomic_path(out, suffix=".xml", companions=(".bin",)) as tmp:
            ov.save_model(model, str(tmp))
        verdict.path = str(out)
    else:
        for stale in (out, out.with_suffix(".bin")):
            stale.unlink(missing_ok=True)
    with atomic_open(out.with_suffix(".json"), "w") as handle:
        json.dump({**asdict(verdict), "buildseg_version": __version__}, handle, indent=1)
    return verdict


def sample_tiles(dataset, n: int, *, seed: int = 0) -> list[Tile]:
    """Up to ``n`` random ``(image, truth)`` tiles of a validation dataset (items
    ``(image, mask, valid)``), cropped to their real pixels: each tile read once."""
    picks = np.random.default_rng(seed).permutation(len(dataset))[:n]
    tiles = []
    for index in sorted(int(i) for i in picks):  # in dataset order: grid datasets cache one image at a time
        image, mask, valid = dataset[index]
        h, w = (int(v) for v in valid)
        truth = mask.numpy().reshape(-1, *mask.shape[-2:])[0]
        tiles.append((image[None, :, :h, :w].float().numpy(), truth[:h, :w].astype(np.uint8)))
    return tiles


def sample_images(dataset, n: int, *, side: int, seed: int = 0) -> list[np.ndarray]:
    """Up to ``n`` calibration images from a training dataset (items start with a (C, H, W)
    image), cropped to ``side`` px: the pixels the model meets, at the validation tile's size."""
    picks = np.random.default_rng(seed).permutation(len(dataset))[:n]
    return [dataset[int(i)][0][None, :, :side, :side].float().numpy() for i in picks]


def quantize(checkpoint: str | Path, data: str | Path, *, n_tiles: int = CALIBRATION_TILES, tile: int = 224,
             max_drop: float | None = MAX_DROP) -> Int8Verdict:
    """``buildseg quantize``: calibrate and judge on the tiles of a labelled ``data`` set."""
    from buildseg.data.datasets import GridTileDataset
    from buildseg.formats.tables import load_records

    path = checkpoint_paths(checkpoint)[0]
    model, _ = load_model(path)
    dataset = GridTileDataset(load_records(data, require_masks=True), tile=tile, in_chans=model.card.in_chans)
    if len(dataset) == 0:
        raise BuildsegError(f"{data} yields no validation tiles for calibration")
    tiles = sample_tiles(dataset, n_tiles)
    return calibrate_int8(path, calibration=[image for image, _ in tiles], validation=tiles, max_drop=max_drop,
                          keep_refused=True)

