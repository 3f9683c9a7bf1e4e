"""Time to first result: the first and the second ``predict --model buildings`` on an empty user cache.

A new user's first run pays whatever one-off work ``predict`` decides to do (an ONNX export for
OpenVINO, an int8 calibration on the input, the precision timings); the second run finds it
cached. ``inference/core/payoff.py`` takes a step only when this job could repay it, so the
first run should cost at most about 2x the second. Three jobs, each run twice as a new process
(``buildseg predict``) with ``XDG_CACHE_HOME`` pointing at a fresh folder:

* tiles: the first 129 tiles of ``../shared/data/real_dev/test_224`` (224 px, a CSV-like folder);
* geotiff: a 4000 x 4000 px GeoTIFF at 0.5 m (4 km2), a mosaic of real 512 px development crops;
* aoi: about 1 km2 at zoom 19 (0.30 m) from a tile server on 127.0.0.1 (``http.server`` in its own
  process), the same kind of mosaic cut into 256 px PNG tiles; each run writes a new ``--out``
  (the second finds GDAL's tile cache warm, as a user's second run would).

Wall seconds include Python's start and the model's load. The log lines of each first run that
say what was decided are printed below the table.

    python benchmarks/first_use.py [--jobs tiles geotiff aoi]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loader_throughput import cpu_flags  # noqa: E402
from tile_service import ZOOM, bounds, mosaic_from, write_tiles  # noqa: E402

SHARED = HERE.parents[1] / "shared" / "data"
BUILDSEG = str(Path(sys.executable).with_name("buildseg"))
DECIDED = ("worth it", "precision auto", "int8 model", "calibrating")


def tiles_job(root: Path) -> list[str]:
    source = SHARED / "real_dev" / "test_224" / "images"
    images = root / "tiles" / "images"
    images.mkdir(parents=True)
    for path in sorted(source.glob("*.png"))[:129]:
        os.symlink(path, images / path.name)
    return ["--data", str(root / "tiles"), "--out", "{out}.csv"]


def geotiff_job(root: Path) -> list[str]:
    import rasterio
    from rasterio.transform import from_origin

    mosaic = mosaic_from([SHARED / "real_dev", SHARED / "more_dev", SHARED / "more_dev2"], 8)[:4000, :4000]
    path = root / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", height=4000, width=4000, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4100000, 0.5, 0.5), tiled=True, compress="deflate") as dst:
        dst.write(mosaic.transpose(2, 0, 1))
    return ["--data", str(path), "--out", "{out}.tif", "--footprints", "{out}.gpkg"]


def aoi_job(root: Path, port: int) -> list[str]:
    import geopandas as gpd
    from shapely.geometry import box

    mosaic = mosaic_from([SHARED / "real_dev", SHARED / "more_dev", SHARED / "more_dev2"], 7)  # 3584 px at 0.30 m: about 1.15 km2
    write_tiles(mosaic, root / "tiles_xyz")
    gpd.GeoDataFrame(geometry=[box(*bounds(mosaic))], crs="EPSG:3857").to_crs("EPSG:4326").to_file(root / "aoi.geojson")
    return ["--data", f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png", "--aoi", str(root / "aoi.geojson"), "--zoom",
            str(ZOOM), "--out", "{out}"]


def run(args: list[str], out: str, env: dict) -> tuple[float, str]:
    argv = [BUILDSEG, "predict", "--model", "buildings", "--no-progress", *[a.replace("{out}", out) for a in args]]
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", nargs="+", default=["tiles", "geotiff", "aoi"], choices=["tiles", "geotiff", "aoi"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="first_use_"))
    server = None
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        makers = {"tiles": lambda: tiles_job(root), "geotiff": lambda: geotiff_job(root), "aoi": lambda: aoi_job(root, port)}
        jobs = {name: makers[name]() for name in args.jobs}
        if "aoi" in jobs:
            server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                       "--directory", str(root / "tiles_xyz")], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        print(f"CPU: {cpu_flags()}; {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
        print("| job | first run (s) | second run (s) | first / second |")
        print("|---|---:|---:|---:|")
        logs = {}
        for name, job in jobs.items():
            cache = root / f"cache_{name}"  # an empty user cache: no ONNX graph, no timings, no int8, no tiles
            env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
            env.pop("BUILDSEG_ENGINE_CACHE", None)
            first, log = run(job, str(root / f"{name}_1"), env)
            second, _ = run(job, str(root / f"{name}_2"), env)
            logs[name] = [line for line in log.splitlines() if any(k in line for k in DECIDED)]
            print(f"| {name} | {first:.1f} | {second:.1f} | {first / second:.2f} |")
        for name, lines in logs.items():
            print(f"\n{name}, first run:")
            for line in lines:
                print("   ", line.strip()[:300])
    finally:
        if server is not None:
            server.terminate()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
