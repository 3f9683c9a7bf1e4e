"""Whether a one-off optimisation pays for itself on this job, before it is paid for.

``predict`` with ``--engine auto --precision auto`` can spend time up front to predict faster:
exporting the model's ONNX graph for OpenVINO (about 20 s for the default model on 2 cores, once
per machine and model) and calibrating an int8 model on the input (seconds; minutes when NNCF's
accuracy control has to run). Both are worth it for 60,000 competition tiles and a loss for 129:
a first run that spends three minutes to save one second is the product's worst impression.

So each step is taken only when the most it could save over *this* job exceeds what it costs:

    saving = job_tiles x (1 / rate_now - 1 / rate_ceiling)        cost = measured (or first guess)

* ``job_tiles``: the job's size in 224 px model tiles (``inference/jobs/job_size.py``);
* ``rate_now``: the fastest path available without the step, measured on this machine (tiles/s);
* ``rate_ceiling``: an optimistic bound on the path the step would open: :data:`OPENVINO_CEILING`
  x torch's best for the export, :data:`INT8_CEILING` x OpenVINO fp32 for int8 (never below
  ``rate_now``: where native bf16 exists, int8 must beat bf16, not fp32);
* ``cost``: what the step took the last time on this machine (:func:`record_cost`), else a first
  guess; an int8 calibration also gets the saving as its time cap, so it can never cost more
  than it could repay.

And a precision that changes the result is not chosen just for being faster: one that loses
more than :data:`LOSSLESS_DROP` Dice against fp32 (its verdict) is chosen by default only where it
is at least :data:`LOSSY_SPEEDUP` x the best precision that does not (:func:`lossy_allowed`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from buildseg.atomic import atomic_open
from buildseg.runtime.device import cpu_signature

log = logging.getLogger("buildseg")

OPENVINO_CEILING = 4.0  # OpenVINO's best against torch's best, at most (measured 1.8x bf16, 2.8x int8 on Zen 4)
INT8_CEILING = 3.0  # OpenVINO int8 against OpenVINO fp32, at most (measured 2.75x on Zen 4 VNNI, 2.1x on AMX)
EXPORT_GUESS_S = 25.0  # the ONNX export before this machine has timed one (22 s for efficientnet_lite0, 2 Zen 4 cores)
INT8_FIXED_S = 4.0  # NNCF's own work in a plain calibration, beyond the forward passes (measured 4-5 s)
LOSSLESS_DROP = 0.002  # a precision within this Dice of fp32 (on its verdict's tiles) does not change the result
LOSSY_SPEEDUP = 1.3  # ... one that loses more is chosen by default only at least this much faster
COSTS_FILE = "optimisation_costs.json"


@dataclass(frozen=True)
class Payoff:
    """One decision and the figures behind it, for the log's one line."""

    step: str
    worth: bool
    saving_s: float
    cost_s: float
    job_tiles: float

    def line(self, alternative: str) -> str:
        verdict = "worth it" if self.worth else f"not worth it; {alternative}"
        return (f"{self.step}: this job (~{self.job_tiles:,.0f} tiles of 224 px) could save at most {self.saving_s:.1f} s, "
                f"it costs ~{self.cost_s:.0f} s: {verdict}")


def projected_saving(job_tiles: float, *, rate_now: float, rate_ceiling: float) -> float:
    """Seconds the faster path could save over the job at best (0 when it is not faster)."""
    if rate_now <= 0 or rate_ceiling <= rate_now:
        return 0.0
    return job_tiles * (1.0 / rate_now - 1.0 / rate_ceiling)


def decide(step: str, *, job_tiles: float, rate_now: float, rate_ceiling: float, cost_s: float) -> Payoff:
    saving = projected_saving(job_tiles, rate_now=rate_now, rate_ceiling=rate_ceiling)
    return Payoff(step, saving > cost_s, saving, cost_s, job_tiles)


def int8_cost_guess(fp32_rate: float, n_tiles: int) -> float:
    """A plain first-use calibration: fp32 masks of half the tiles, NNCF's statistics on the
    other half, the int8 masks of the first half (three passes' worth), plus NNCF's own work."""
    return INT8_FIXED_S + 1.5 * n_tiles / max(fp32_rate, 1e-6)


def lossy_allowed(rates: dict[str, float], drops: dict[str, float]) -> tuple[set[str], str]:
    """(the precisions ``auto`` may pick, why any were dropped): a precision losing more than
    :data:`LOSSLESS_DROP` Dice against fp32 stays only if it is :data:`LOSSY_SPEEDUP` x faster
    than the best one that does not. ``drops``: the Dice lost per precision (absent: none)."""
    lossless = [p for p in rates if drops.get(p, 0.0) <= LOSSLESS_DROP]
    best = max((rates[p] for p in lossless), default=0.0)
    allowed, notes = set(lossless), []
    for precision in rates:
        if precision in allowed:
            continue
        gain = rates[precision] / best if best else float("inf")
        if gain >= LOSSY_SPEEDUP:
            allowed.add(precision)
            notes.append(f"{precision} loses {drops[precision]:.3f} Dice against fp32 but is {gain:.2f}x the best "
                         f"lossless precision (>= {LOSSY_SPEEDUP}x): chosen where fastest")
        else:
            notes.append(f"{precision} left out: it loses {drops[precision]:.3f} Dice against fp32 and is only "
                         f"{gain:.2f}x the best lossless precision (< {LOSSY_SPEEDUP}x); ask for it with --precision "
                         f"{precision}")
    return allowed, "; ".join(notes)


def _costs_path(folder: Path) -> Path:
    return Path(folder) / COSTS_FILE


def measured_cost(folder: Path, step: str) -> float | None:
    """Seconds ``step`` took the last time on this machine (the engine cache's record)."""
    try:
        value = json.loads(_costs_path(folder).read_text()).get(f"{step}/{cpu_signature()}")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def record_cost(folder: Path, step: str, seconds: float) -> None:
    """Remember what ``step`` took on this machine; a read-only cache only costs a guess."""
    path = _costs_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[f"{step}/{cpu_signature()}"] = round(float(seconds), 2)
        with atomic_open(path, "w") as handle:
            json.dump(data, handle, indent=1)
    except OSError as exc:
        log.debug("optimisation cost not recorded (%s)", exc)
