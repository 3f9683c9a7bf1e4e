"""The Ray runner's overhead against the local runner: the same command a user types, timed.

20 synthetic GeoTIFF scenes of mixed sizes (sides 256-1024 px times --scale, default
768-3072 px; 0.5 m) are predicted with the default model (random weights: the cost is a
trained one's) by ``buildseg predict --data SCENES --out DIR`` in a fresh process each time:
* local: ``--runner local`` (one process; the engine uses every core);
* ray: ``--runner ray`` with the default pool (one worker per 2 cores) and with one
  1-CPU worker per core, on a local Ray started by the command.
Every wall time is the whole command's, as a user pays it: Python and torch start, the
model, Ray's start and its workers' (for ray), the scenes, the merge and the exit. The
engine's on-disk cache is warm for all (one scene predicted first; ``BUILDSEG_ENGINE_CACHE``).
The runners take turns, ``--repeats`` rounds; the table gives each runner's median and the
ratio to the local median. "Ray start" is the driver's ``ray.init`` (its log line).
The masks are compared with the first local run's (share of equal pixels).

    python benchmarks/ray_overhead.py [--scenes 20] [--scale 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from buildseg.data.synth import make_scene  # noqa: E402
from engine_throughput import random_checkpoint  # noqa: E402
from loader_throughput import cpu_flags  # noqa: E402


def write_scenes(folder: Path, n: int, scale: int, seed: int = 0) -> None:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for k in range(n):
        size = scale * int(rng.choice([256, 384, 512, 768, 1024], p=[0.3, 0.25, 0.2, 0.15, 0.1]))
        image, _ = make_scene(rng, size)
        with rasterio.open(folder / f"scene_{k:02d}.tif", "w", driver="GTiff", height=size, width=size, count=3,
                           dtype="uint8", crs="EPSG:32633", transform=from_origin(500000.0 + 600 * k, 4100000.0, 0.5, 0.5),
                           tiled=True, blockxsize=256, blockysize=256) as dst:
            dst.write(image.transpose(2, 0, 1))


def run_command(args: list[str], env: dict[str, str]) -> tuple[float, float | None]:
    """(wall seconds, Ray's start in seconds from the log, or None)."""
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "buildseg", *args], env=env, capture_output=True, text=True)
    wall = time.monotonic() - began
    if done.returncode:
        raise SystemExit(f"buildseg {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    found = re.search(r"Ray started in ([0-9.]+) s", done.stderr + done.stdout)
    return wall, float(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--scale", type=int, default=3, help="scene sides are this times 256-1024 px (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the runners take turns in each")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"CPU flags: {cpu_flags()}; {cores} cores; {args.scenes} scenes, sides x{args.scale}; {args.repeats} rounds")
    runners = {"local (one process)": ["--runner", "local"],
               f"ray, default pool ({max(1, cores // 2)} worker x {min(cores, 2)} CPUs)": ["--runner", "ray"]}
    if cores > 1:
        runners[f"ray, {cores} workers x 1 CPU"] = ["--runner", "ray", "--ray-workers", str(cores)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_scenes(tmp / "scenes", args.scenes, args.scale)
        (tmp / "one").mkdir()
        shutil.copy(tmp / "scenes" / "scene_00.tif", tmp / "one" / "scene_00.tif")
        ckpt = random_checkpoint("efficientnet_lite0", tmp / "model.pt")
        env = {**os.environ, "BUILDSEG_ENGINE_CACHE": str(tmp / "engine_cache"), "PYTHONWARNINGS": "ignore"}
        common = ["predict", "--checkpoint", str(ckpt), "--no-progress"]
        run_command([*common, "--data", str(tmp / "one"), "--out", str(tmp / "warm")], env)  # the engine cache
        walls: dict[str, list[float]] = {name: [] for name in runners}
        starts: dict[str, list[float]] = {name: [] for name in runners}
        agreement: dict[str, float] = {}
        for round_ in range(args.repeats):
            for k, (name, flags) in enumerate(runners.items()):
                out = tmp / f"out_{k}_{round_}"
                wall, start = run_command([*common, "--data", str(tmp / "scenes"), "--out", str(out), *flags], env)
                walls[name].append(wall)
                if start is not None:
                    starts[name].append(start)
                if round_ == 0:
                    agreement[name] = mask_agreement(tmp / "out_0_0", out)
                print(f"round {round_ + 1} {name}: {wall:.1f} s", flush=True)
        base = statistics.median(walls["local (one process)"])
        print(f"\n{'runner':<36} {'wall s (median)':>16} {'each run s':>16} {'Ray start s':>12} {'wall / local':>13} "
              f"{'mask pixels = local':>20}")
        for name in runners:
            each = " / ".join(f"{w:.1f}" for w in walls[name])
            start = f"{statistics.median(starts[name]):.1f}" if starts[name] else "0"
            median = statistics.median(walls[name])
            print(f"{name:<36} {median:>16.1f} {each:>16} {start:>12} {median / base:>13.3f} {agreement[name]:>20.6f}")
        print("(masks can differ in a few pixels where a thread count changes the last bits of a probability at the "
              "threshold: random weights put most pixels near 0.5)")


def mask_agreement(a: Path, b: Path) -> float:
    import rasterio

    same = total = 0
    for path in sorted(a.glob("*_mask.tif")):
        with rasterio.open(path) as x, rasterio.open(b / path.name) as y:
            same += int((x.read(1) == y.read(1)).sum())
            total += x.width * x.height
    return same / total


if __name__ == "__main__":
    main()
