"""``--precision auto`` on a CPU, chosen by measurement on the machine, not by a flag rule.

Which precision is fastest depends on the CPU in ways its flags do not settle: on an AMD Zen 4
(avx512_bf16 and VNNI, no AMX) bf16 and int8 tie for the default model but not for a
ResNet-50; AMX makes bf16 fast, VNNI makes int8 fast, and a small model's memory traffic can
hide both. So the candidates that are allowed are timed on a few batches the first time a
model runs on a machine, the fastest wins, and the choice is cached beside the engine cache,
keyed by the model, the engine, the candidates and the CPU (model name, flags, usable cores),
so later runs pay nothing.

Candidates: fp32 always; bf16 where the CPU runs it natively (emulated bf16 is always slower);
int8 on OpenVINO where every model has an int8 model whose verdict says it kept the
validation Dice (``buildseg quantize`` or the end of training). One candidate: no timing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from buildseg.atomic import atomic_open
from buildseg.inference.core import engines
from buildseg.models.factory import SegmentationModel
from buildseg.runtime import device as device_rules
from buildseg.runtime.device import cpu_signature

log = logging.getLogger("buildseg")

TIMING_BATCH = 8  # tiles per timed call
TIMING_SIZE = 224  # px: the competition's test tile
TIMING_CALLS = 3  # timed calls per candidate, after one warm-up call; the median counts
CHOICE_FILE = "precision_choice.json"


def candidates(engine: str, models: Sequence[SegmentationModel], checkpoints: Sequence[Path | None]) -> tuple[list[str], str]:
    """(the allowed precisions, why the others are not), fp32 first."""
    allowed, notes = ["fp32"], []
    if device_rules.cpu_has_native_bf16() and engine in ("openvino", "torch"):
        allowed.append("bf16")
    else:
        notes.append("no native bf16 on this CPU" if not device_rules.cpu_has_native_bf16() else f"{engine} runs no bf16")
    if engine == "openvino":
        verdicts = [engines.int8_verdict(m, c) for m, c in zip(models, checkpoints)]
        if all(v and v.get("accepted") and engines.find_int8(m, c) is not None
               for v, m, c in zip(verdicts, models, checkpoints)):
            allowed.append("int8")
        else:
            refused = next((v for v in verdicts if v and not v.get("accepted")), None)
            notes.append(f"the int8 model was refused ({refused.get('reason')})" if refused else
                         "no accepted int8 model (`buildseg quantize` makes one)")
    else:
        notes.append(f"int8 runs on openvino only (this is {engine})")
    return allowed, "; ".join(notes)


def choice_key(engine: str, models: Sequence[SegmentationModel], allowed: Sequence[str]) -> str:
    keys = "+".join(engines.model_key(m) for m in models)
    return f"{engine}/{'-'.join(allowed)}/{cpu_signature()}/{hashlib.sha256(keys.encode()).hexdigest()[:16]}"


def time_engine(run: Callable[[torch.Tensor], torch.Tensor], in_chans: int) -> float:
    """Tiles per second of ``run`` on random uint8 batches (median of the timed calls)."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (TIMING_BATCH, in_chans, TIMING_SIZE, TIMING_SIZE), dtype=torch.uint8, generator=generator)
    run(batch)  # warm-up: first-call allocations, lazy compilation
    seconds = []
    for _ in range(TIMING_CALLS):
        started = time.perf_counter()
        run(batch)
        seconds.append(time.perf_counter() - started)
    return TIMING_BATCH / sorted(seconds)[len(seconds) // 2]


def int8_drops(models: Sequence[SegmentationModel], checkpoints: Sequence[Path | None]) -> dict[str, float]:
    """The Dice the int8 models lose against fp32 on their verdicts' tiles (the worst member)."""
    drops = []
    for model, checkpoint in zip(models, checkpoints):
        verdict = engines.int8_verdict(model, checkpoint) or {}
        if verdict.get("dice_int8") is not None and verdict.get("dice_fp32") is not None:
            drops.append(float(verdict["dice_fp32"]) - float(verdict["dice_int8"]))
    return {"int8": max(drops)} if drops else {}


def measured_precision(engine: str, models: Sequence[SegmentationModel], checkpoints: Sequence[Path | None], *,
                       build: Callable[[str], list], timer: Callable | None = None,
                       rates_out: dict | None = None) -> tuple[str, str]:
    """(precision, why): the fastest allowed candidate, measured once per machine and model
    and cached; a candidate that loses Dice against fp32 only where clearly faster
    (``payoff.lossy_allowed``). ``build(precision)`` returns one engine per model;
    ``rates_out`` receives the tiles/s measured per candidate."""
    from buildseg.inference.core.payoff import lossy_allowed

    allowed, notes = candidates(engine, models, checkpoints)
    if len(allowed) == 1 and rates_out is None:
        return allowed[0], f"the only candidate: {notes}"
    path = engines.cache_folder(checkpoints[0] if checkpoints else None) / CHOICE_FILE
    key = choice_key(engine, models, allowed)
    cached = _read(path).get(key)
    if cached:
        rates, source = cached["rates"], f"measured on this machine before ({_rates(cached['rates'])}; {path})"
    else:
        timer = timer or time_engine
        rates = {}
        for precision in allowed:
            runners = build(precision)
            rates[precision] = min(timer(run, models[0].card.in_chans) for run in runners)
        source = f"measured now: {_rates(rates)}; cached in {path}"
    usable, lossy = lossy_allowed(rates, int8_drops(models, checkpoints) if "int8" in rates else {})
    best = max(usable, key=rates.get)
    if not cached:
        _write(path, key, {"precision": best, "rates": rates})
    if rates_out is not None:
        rates_out.update(rates)
    return best, source + (f"; {lossy}" if lossy else "")


def _rates(rates: dict) -> str:
    return ", ".join(f"{p} {r:.0f} tiles/s" for p, r in sorted(rates.items(), key=lambda kv: -kv[1]))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, key: str, value: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[key] = value
        with atomic_open(path, "w") as handle:
            json.dump(data, handle, indent=1)
    except OSError as exc:  # a read-only cache only costs the next run a re-measurement
        log.debug("precision choice not cached (%s)", exc)
