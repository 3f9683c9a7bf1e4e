"""int8 at first use, with no labels: for a model that has no int8 model yet (a packaged model,
a run trained with ``--no-quantize-at-end``), so that ``predict --precision auto`` can time int8
against fp32 and bf16 on this machine (``inference/core/precision_choice.py``).

Up to :data:`FIRST_USE_TILES` tiles of the input itself (tiles of a CSV or folder, windows of a
GeoTIFF or of an imagery service's AOI), at the model's GSD: half calibrate NNCF, half judge
the result against the fp32 model's own masks (fp32 scores 1 against them), kept when int8
agrees within :data:`AGREEMENT_DROP` (NNCF's accuracy control first, as ``quantize.py`` does;
at most :data:`FIRST_USE_SECONDS`). Why the user's tiles and not a calibration shipped with the
model: the repo holds no imagery, the user's imagery is the domain whose activation ranges
matter, and on one place of the development corpus plain int8 calibrated there emptied every
mask while agreement with fp32 caught it without labels (benchmarks/README.md, "int8 at first
use"). The model and its verdict go where ``buildseg quantize`` writes (the engine cache for a
packaged model): once per machine and model. No verdict (tried again next time) when the input
has fewer than 4 tiles or fp32 finds no building in the judged ones.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from buildseg import extras
from buildseg.inference.core import engines
from buildseg.inference.core.postprocess import PostProcess, apply
from buildseg.inference.jobs.quantize import Int8Verdict, calibrate_int8, sample_tiles
from buildseg.runtime.checkpoint import checkpoint_paths, load_model
from buildseg.settings.models import AGREEMENT_DROP, FIRST_USE_TILES

log = logging.getLogger("buildseg")
FIRST_USE_SECONDS = 180.0  # the whole calibration; past it int8 is refused (and not tried again)

Sampler = Callable[[Path], list]  # checkpoint -> (1, C, h, w) float32 raw-pixel tiles of the input at its GSD


def fp32_masks(checkpoint: Path, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The fp32 OpenVINO model's masks (its stored post-processing): the label-free truth."""
    import openvino as ov

    model, payload = load_model(checkpoint)
    post = PostProcess.from_dict(payload.get("postprocess"))
    onnx = str(engines.cached_onnx(model, engines.cache_folder(checkpoint)))
    compiled = ov.Core().compile_model(onnx, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    masks = []
    for image in images:
        logits = np.asarray(compiled(image)[0], dtype=np.float64)[0, 0]
        masks.append(apply((1.0 / (1.0 + np.exp(-logits))).astype(np.float32), post))
    return masks


def calibrate_on_images(checkpoint: Path, images: Sequence[np.ndarray], *,
                        time_limit: float = FIRST_USE_SECONDS) -> Int8Verdict | None:
    """Calibrate on the even tiles, judge on the odd ones against fp32's masks (see the module)."""
    if len(images) < 4:
        return None
    judged = list(images[1::2])
    validation = list(zip(judged, fp32_masks(checkpoint, judged)))
    if not any(mask.any() for _, mask in validation):
        log.info("int8 not judged: fp32 finds no building in the %d sampled tiles (tried again next time)", len(judged))
        return None
    return calibrate_int8(checkpoint, calibration=list(images[0::2]), validation=validation, max_drop=AGREEMENT_DROP,
                          time_limit=time_limit, truth="fp32 masks")


def tile_sampler(records: Sequence, *, tile: int = 224, n_tiles: int | None = None) -> Sampler:
    """Tiles of a CSV's or folder's images, as predict sees them (their masks are never read);
    ``n_tiles``: :data:`FIRST_USE_TILES`."""
    from buildseg.data.datasets import GridTileDataset

    n_tiles = n_tiles or FIRST_USE_TILES

    def sample(checkpoint: Path) -> list:
        model, payload = load_model(checkpoint)
        blank = [replace(r, rle="-1", mask_path=None) for r in records]
        dataset = GridTileDataset(blank, tile=tile, in_chans=model.card.in_chans,
                                  target_gsd=(payload.get("input") or {}).get("gsd"))
        return [image for image, _ in sample_tiles(dataset, n_tiles)]

    return sample


def int8_at_first_use(checkpoint: str | Path, sample: Sampler, *, engine: str, device: str,
                      time_limit: float = FIRST_USE_SECONDS) -> bool:
    """Each model of ``checkpoint`` with no int8 model and no verdict gets one (see the module);
    True when every model then has an accepted one. ``time_limit``: seconds per model (the
    saving the job could make, ``first_use.py``). Skipped where int8 cannot run or auto does
    not measure: another engine, a GPU, torchrun's ranks, no ``cpu`` extra,
    ``BUILDSEG_PRECISION_AUTO=rule``."""
    import time

    from buildseg.inference.core.payoff import record_cost
    from buildseg.inference.core.segmenter import PRECISION_AUTO_ENV
    from buildseg.runtime.device import resolve_device

    if (engine not in ("auto", "openvino") or resolve_device(device).type != "cpu"
            or int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get(PRECISION_AUTO_ENV, "measure") == "rule"
            or not (extras.installed("openvino") and extras.installed("nncf"))):
        return False
    accepted = True
    for path in checkpoint_paths(checkpoint):
        model, _ = load_model(path)
        if engines.int8_verdict(model, path) is not None:
            accepted = accepted and bool(engines.int8_verdict(model, path).get("accepted"))
            continue
        log.info("precision auto: %s has no int8 model yet; calibrating one on up to %d tiles of the input, judged by "
                 "agreement with fp32 (no labels; once per machine; at most %.0f s)", path.name, FIRST_USE_TILES,
                 time_limit)
        started = time.perf_counter()
        try:
            verdict = calibrate_on_images(path, sample(path), time_limit=time_limit)
        except Exception as exc:  # noqa: BLE001 - optional speed-up: prediction goes on without it (and reports bad input itself)
            log.warning("int8 at first use failed (%s: %s); predicting without it", type(exc).__name__,
                        (str(exc).strip().splitlines() or [""])[0][:200])
            accepted = False
            continue
        if verdict is None:
            accepted = False
            continue
        if not verdict.accuracy_control:  # a plain calibration's cost is what the next job's decision weighs
            record_cost(engines.cache_folder(None), "int8_first_use", time.perf_counter() - started)
        accepted = accepted and verdict.accepted
        log.info("int8 model %s (%.0f s): agreement with fp32's masks %s, %s", "accepted" if verdict.accepted else
                 "refused", verdict.seconds, "-" if verdict.dice_int8 is None else f"{verdict.dice_int8:.4f}",
                 verdict.reason)
    return accepted
