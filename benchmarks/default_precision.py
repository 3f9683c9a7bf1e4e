"""Does the default change the result? ``predict --model buildings`` with the defaults against
``--engine torch --precision fp32``, scored with the competition Dice on labelled real tiles.

Each run is a new ``buildseg predict`` process on an empty user cache (as a first run), then
``buildseg evaluate`` against the tiles' truth. The default's engine and precision are read from
its log; the difference is the default's Dice minus fp32's (the rule: a precision losing more
than 0.002 is chosen only where 1.3x faster, ``inference/core/payoff.py``).

    python benchmarks/default_precision.py [--data ../shared/data/real_dev/test_224]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loader_throughput import cpu_flags  # noqa: E402

BUILDSEG = str(Path(sys.executable).with_name("buildseg"))


def predict(data: Path, out: Path, cache: Path, extra: list[str]) -> tuple[float, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    env.pop("BUILDSEG_ENGINE_CACHE", None)
    started = time.perf_counter()
    proc = subprocess.run([BUILDSEG, "-v", "predict", "--model", "buildings", "--data", str(data), "--out", str(out),
                           "--no-progress", "--profile", *extra], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return time.perf_counter() - started, proc.stdout + proc.stderr


def dice(pred: Path, truth: Path) -> float:
    proc = subprocess.run([BUILDSEG, "evaluate", "--pred", str(pred), "--truth", str(truth), "--json"],
                          capture_output=True, text=True, check=True)
    return float(json.loads(proc.stdout)["dice"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data" / "real_dev" / "test_224")
    args = parser.parse_args()
    truth = args.data / "train.csv" if (args.data / "train.csv").is_file() else args.data
    root = Path(tempfile.mkdtemp(prefix="default_precision_"))
    try:
        rows = []
        for name, extra in (("default (auto)", []), ("torch fp32", ["--engine", "torch", "--precision", "fp32"])):
            seconds, log = predict(args.data, root / f"{len(rows)}.csv", root / f"cache{len(rows)}", extra)
            used = re.search(r"engine (\w+), precision (\w+)", log) or re.search(r"precision auto: (\w+)", log)
            rows.append((name, used.group(0) if used else "?", dice(root / f"{len(rows)}.csv", truth), seconds))
        print(f"CPU: {cpu_flags()}; {time.strftime('%Y-%m-%d')}; {args.data}")
        print("| run | what ran | competition Dice | vs torch fp32 | wall s (first run) |")
        print("|---|---|---:|---:|---:|")
        for name, used, value, seconds in rows:
            print(f"| {name} | {used} | {value:.4f} | {value - rows[-1][2]:+.4f} | {seconds:.1f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
