"""The Ray runner's overhead against the local runner, in one run on the same scenes.

20 synthetic GeoTIFF scenes of mixed sizes (sides 256-1024 px times --scale, default 768-3072 px; 0.5 m) are predicted with the
default model (random weights: the cost is the same as a trained one's) three ways, each into
a fresh folder:
* local: `predict_scenes` in this process (the engine uses every core);
* ray, N workers x (cores / N) CPUs, for N = 1 and N = cores, on a local Ray started for the
  run; Ray's start (``ray.init``) is timed on its own and included in the wall time, as a
  user pays it.
Every wall time includes loading the model (the local process, or each Ray worker, builds
its Segmenter; the engine's on-disk cache is warm for all, from one scene predicted first).
The masks are compared with the local runner's (share of equal pixels). The ratio is wall / local wall.

    python benchmarks/ray_overhead.py [--scenes 20] [--engine auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from buildseg.data.synth import make_scene  # noqa: E402
from buildseg.inference.ray_runner import RayOptions, predict_scenes_ray  # noqa: E402
from buildseg.inference.scene_sources import list_scene_sources  # noqa: E402
from buildseg.inference.scenes import SceneSettings, predict_scenes  # noqa: E402
from buildseg.inference.segmenter import Segmenter  # noqa: E402
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


def main() -> None:
    import ray

    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--scale", type=int, default=3, help="scene sides are this times 256-1024 px (default 3)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"CPU flags: {cpu_flags()}; {cores} cores; {args.scenes} scenes, sides x{args.scale}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_scenes(tmp / "scenes", args.scenes, args.scale)
        ckpt = random_checkpoint("efficientnet_lite0", tmp / "model.pt")
        scenes = list_scene_sources(tmp / "scenes")
        options = dict(device="cpu", engine=args.engine)
        settings = SceneSettings(block=1024)
        warm = Segmenter.from_checkpoint(ckpt, **options)  # the engine's on-disk cache, for every runner
        predict_scenes(warm, scenes[:1], tmp / "warm", settings, progress=False)
        del warm
        rows = []
        began = time.monotonic()  # each runner's wall includes loading the model, as a user's run does
        segmenter = Segmenter.from_checkpoint(ckpt, **options)
        predict_scenes(segmenter, scenes, tmp / "local", settings, progress=False)
        rows.append(("local (one process)", time.monotonic() - began, 0.0))
        for workers in sorted({1, cores}):
            began = time.monotonic()
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            started = time.monotonic() - began
            predict_scenes_ray(segmenter, options, scenes, tmp / f"ray{workers}", settings,
                               RayOptions(workers=workers), progress=False)
            ray.shutdown()
            rows.append((f"ray, {workers} worker(s) x {cores // workers} CPU", time.monotonic() - began, started))
        base = rows[0][1]
        print(f"{'runner':<28} {'wall s':>8} {'of which ray.init s':>20} {'wall / local':>13} {'mask pixels = local':>20}")
        for (name, wall, start), folder in zip(rows, ["local", *(f"ray{w}" for w in sorted({1, cores}))]):
            print(f"{name:<28} {wall:>8.1f} {start:>20.1f} {wall / base:>13.2f} {mask_agreement(tmp / 'local', tmp / folder):>20.6f}")
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
