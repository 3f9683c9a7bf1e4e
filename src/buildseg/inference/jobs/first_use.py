"""The model ``predict`` runs, with the one-off optimisations this job pays for and no others.

With ``--engine auto --precision auto`` on a CPU (one process), two steps can spend time before
the first tile: the ONNX export that OpenVINO needs (once per machine and model) and an int8
calibration on the input (``first_int8.py``, for a model with no int8 model). Each is taken
only when the most it could save over this job exceeds its cost (``inference/core/payoff.py``),
judged on speeds measured here:

1. no ONNX graph cached yet: torch's precisions are timed; the export is done when OpenVINO at
   :data:`~buildseg.inference.core.payoff.OPENVINO_CEILING` x torch's best would save more than
   the export costs, else the job runs on torch;
2. on OpenVINO, a model without an int8 verdict: fp32 and bf16 are timed; the calibration runs
   when int8 at :data:`~buildseg.inference.core.payoff.INT8_CEILING` x fp32 would save more than
   it costs over the fastest of them, with that saving as its time cap.

Each decision is one log line with its figures. Explicit choices skip all of it: ``--engine
openvino`` exports, ``buildseg quantize`` makes an int8 model whatever the job.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from buildseg.inference.core import engines, payoff
from buildseg.inference.core.segmenter import PRECISION_AUTO_ENV, Segmenter
from buildseg.runtime.checkpoint import checkpoint_paths, load_model

log = logging.getLogger("buildseg")


def applies(options: dict) -> bool:
    """Only where ``auto`` measures: the CPU, one process, precision auto, timing not switched off."""
    from buildseg.runtime.device import resolve_device

    return (options.get("precision") == "auto" and options.get("engine") in ("auto", "openvino")
            and resolve_device(options.get("device", "auto")).type == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) <= 1
            and os.environ.get(PRECISION_AUTO_ENV, "measure") != "rule")


def segmenter_for_job(checkpoint, options: dict, *, job_tiles: Callable[[], float],
                      sample: Callable[[Path], list]) -> Segmenter:
    """The Segmenter for this job (see the module). ``job_tiles()``: the job's size in 224 px
    tiles (``job_size.py``); ``sample(path)``: the input's tiles for an int8 calibration."""
    if not applies(options):
        return Segmenter.from_checkpoint(checkpoint, **options)
    paths = checkpoint_paths(checkpoint)
    models = [load_model(path)[0] for path in paths]
    tiles = job_tiles()
    if options["engine"] == "auto" and engines.resolve_engine("auto", _cpu()) == "openvino" and \
            not all(engines.onnx_cached(m, p) for m, p in zip(models, paths)):
        on_torch = Segmenter.from_checkpoint(checkpoint, **{**options, "engine": "torch"})
        if on_torch.rates:
            now = max(on_torch.rates.values())
            cost = (payoff.measured_cost(engines.cache_folder(None), "onnx_export") or payoff.EXPORT_GUESS_S) * len(paths)
            decision = payoff.decide("ONNX export for OpenVINO", job_tiles=tiles, rate_now=now,
                                     rate_ceiling=payoff.OPENVINO_CEILING * now, cost_s=cost)
            log.info("%s", decision.line(f"predicting with torch {on_torch.precision} ({now:.0f} tiles/s); "
                                         "--engine openvino exports anyway"))
            if not decision.worth:
                return on_torch
    if engines.resolve_engine(options["engine"], _cpu()) != "openvino" or \
            all(engines.int8_verdict(m, p) is not None for m, p in zip(models, paths)):
        return Segmenter.from_checkpoint(checkpoint, **options)
    segmenter = Segmenter.from_checkpoint(checkpoint, **options)
    if not segmenter.rates or "fp32" not in segmenter.rates or segmenter.engine != "openvino":
        return segmenter
    return _with_int8_if_it_pays(segmenter, checkpoint, options, tiles=tiles, sample=sample)


def _with_int8_if_it_pays(segmenter: Segmenter, checkpoint, options: dict, *, tiles: float,
                          sample: Callable[[Path], list]) -> Segmenter:
    from buildseg.inference.jobs.first_int8 import FIRST_USE_SECONDS, FIRST_USE_TILES, int8_at_first_use

    rates = segmenter.rates
    now = max(rates.values())
    cost = (payoff.measured_cost(engines.cache_folder(None), "int8_first_use")
            or payoff.int8_cost_guess(rates["fp32"], FIRST_USE_TILES))
    decision = payoff.decide("int8 calibration at first use", job_tiles=tiles, rate_now=now,
                             rate_ceiling=max(now, payoff.INT8_CEILING * rates["fp32"]), cost_s=cost)
    log.info("%s", decision.line(f"predicting in {segmenter.precision}; `buildseg quantize --model NAME|--checkpoint RUN "
                                 "--data SAMPLE` makes an int8 model for later jobs"))
    if not decision.worth:
        return segmenter
    made = int8_at_first_use(checkpoint, sample, engine=options["engine"], device=options.get("device", "auto"),
                             time_limit=min(FIRST_USE_SECONDS, decision.saving_s))
    return Segmenter.from_checkpoint(checkpoint, **options) if made else segmenter


def _cpu():
    import torch

    return torch.device("cpu")
