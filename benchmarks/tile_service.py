"""Mapping an area from a tile service against predicting the same imagery as one GeoTIFF.

A mosaic of real development images (``../shared/data/real_dev`` and ``more_dev``, 512 px crops) is cut into
256 px PNG tiles of Web Mercator zoom 19 near the equator (0.30 m) and served by Python's
``http.server`` in its own process on 127.0.0.1 (it shares the 2 cores: a remote server
would not). The same mosaic is written as a GeoTIFF on the same grid. With one Segmenter
(the packaged ``buildings`` model, the engine and precision ``predict`` picks), in the same
process and in turns:

* geotiff: the many-scene path on the GeoTIFF (``predict --data mosaic.tif``'s work);
* service, cold: ``predict --data http://127.0.0.1/{z}/{x}/{y}.png --aoi AOI``'s work with an
  empty tile cache (every tile fetched over HTTP and decoded by GDAL);
* service, warm: the same with GDAL's tile cache filled (decoding, no HTTP);
* fetch + decode only: the AOI's VRT read block by block with an empty cache, no model.

km² per hour counts ground area (0.30 m pixels). The shares of the cold service run's time:
what it costs over the GeoTIFF, the HTTP part (cold minus warm), and a bare read of the VRT.
The masks of the three runs are compared pixel for pixel.

    python benchmarks/tile_service.py [--tiles-side 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader_throughput import cpu_flags  # noqa: E402

ZOOM = 19
X0, Y0 = 2**18 + 40, 2**18 - 300  # a little north of the equator: 0.30 m per pixel
WORLD = 20037508.342789244


CROP = 512  # the mosaic's pieces: real images of at least this side, cropped to it


def mosaic_from(folders: list[Path], side: int) -> np.ndarray:
    """``side`` x ``side`` real 512 px crops of the development images, in one array."""
    from PIL import Image

    paths = [p for folder in folders for p in sorted((folder / "images").glob("*.png"))]
    crops = []
    for path in paths:
        image = Image.open(path)
        if min(image.size) >= CROP:
            crops.append(np.asarray(image.convert("RGB"))[:CROP, :CROP])
        if len(crops) == side * side:
            break
    if len(crops) < side * side:
        raise SystemExit(f"only {len(crops)} images of {CROP} px or more: use a smaller --tiles-side")
    rows = [np.concatenate(crops[r * side:(r + 1) * side], axis=1) for r in range(side)]
    return np.concatenate(rows, axis=0)


def write_tiles(mosaic: np.ndarray, root: Path) -> None:
    from PIL import Image

    for j in range(mosaic.shape[0] // 256):
        for i in range(mosaic.shape[1] // 256):
            folder = root / str(ZOOM) / str(X0 + i)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mosaic[j * 256:(j + 1) * 256, i * 256:(i + 1) * 256]).save(folder / f"{Y0 + j}.png")


def bounds(mosaic: np.ndarray) -> tuple[float, float, float, float]:
    res = 2 * WORLD / (256 * 2**ZOOM)
    left, top = -WORLD + X0 * 256 * res, WORLD - Y0 * 256 * res
    return left, top - mosaic.shape[0] * res, left + mosaic.shape[1] * res, top


def write_geotiff(mosaic: np.ndarray, path: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    res = 2 * WORLD / (256 * 2**ZOOM)
    left, _, _, top = bounds(mosaic)
    with rasterio.open(path, "w", driver="GTiff", height=mosaic.shape[0], width=mosaic.shape[1], count=3, dtype="uint8",
                       crs="EPSG:3857", transform=from_origin(left, top, res, res), tiled=True, compress="deflate") as dst:
        dst.write(mosaic.transpose(2, 0, 1))


def run_geotiff(segmenter, tif: Path, out: Path) -> float:
    from buildseg.data.scene_sources import SceneSource
    from buildseg.inference.jobs.scenes import SceneSettings
    from buildseg.inference.runners.local import predict_scenes

    started = time.perf_counter()
    predict_scenes(segmenter, [SceneSource.of(tif)], out, SceneSettings(), progress=False)
    return time.perf_counter() - started


def run_service(segmenter, url: str, aoi: Path, out: Path, cache: Path) -> float:
    from buildseg.inference.jobs.scenes import SceneSettings
    from buildseg.inference.jobs.tile_service import plan_area
    from buildseg.inference.runners.local import predict_scenes
    from buildseg.settings.predict import PredictSettings

    started = time.perf_counter()
    settings = PredictSettings(checkpoint=["unused"], data=url, aoi=str(aoi), out=str(out), zoom=ZOOM,
                               tile_cache=str(cache), progress=False)
    scenes, _ = plan_area(settings, trained_gsd=None)
    predict_scenes(segmenter, scenes, out, SceneSettings(), progress=False)
    return time.perf_counter() - started


def fetch_only(url: str, aoi: Path, out: Path, cache: Path) -> float:
    """The AOI's VRT read in 2048 px blocks with an empty cache: fetching and decoding alone."""
    import rasterio
    from rasterio.windows import Window

    from buildseg.data.service_area import ServiceOptions, prepare_area

    started = time.perf_counter()
    area = prepare_area(url, aoi, out, gsd=None, options=ServiceOptions(zoom=ZOOM, tile_cache=str(cache)))
    with rasterio.open(area.vrt) as src:
        for row in range(0, src.height, 2048):
            for col in range(0, src.width, 2048):
                src.read(window=Window(col, row, min(2048, src.width - col), min(2048, src.height - row)))
    return time.perf_counter() - started


def mask_of(out: Path) -> np.ndarray:
    import rasterio

    path = out / "aoi_mask.vrt" if (out / "aoi_mask.vrt").exists() else next(out.glob("*_mask.tif"))
    with rasterio.open(path) as src:
        return src.read(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared" / "data" / name)
                                                      for name in ("real_dev", "more_dev")])
    parser.add_argument("--tiles-side", type=int, default=6, help="the mosaic is this many 512 px crops a side")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="model:buildings")
    args = parser.parse_args()

    import geopandas as gpd
    from shapely.geometry import box

    from buildseg.inference.core.segmenter import Segmenter

    work = Path(tempfile.mkdtemp(prefix="tile_service_bench_"))
    mosaic = mosaic_from([Path(d) for d in args.data], args.tiles_side)
    write_tiles(mosaic, work / "tiles")
    write_geotiff(mosaic, work / "mosaic.tif")
    gpd.GeoDataFrame(geometry=[box(*bounds(mosaic))], crs="EPSG:3857").to_crs("EPSG:4326").to_file(work / "aoi.geojson")
    with socket.socket() as probe:  # a free port; the server's request log goes nowhere (a full pipe would stall it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(work / "tiles")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it listens
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png"
        segmenter = Segmenter.from_checkpoint(args.model)
        ground = 2 * WORLD / (256 * 2**ZOOM) * np.cos(np.radians(0.03))
        km2 = mosaic.shape[0] * mosaic.shape[1] * ground**2 / 1e6
        print(f"CPU flags: {cpu_flags()}; model {args.model} ({segmenter.engine}, {segmenter.precision}); mosaic "
              f"{mosaic.shape[1]} x {mosaic.shape[0]} px = {km2:.2f} km² at {ground:.2f} m; {args.repeats} rounds\n",
              flush=True)
        run_geotiff(segmenter, work / "mosaic.tif", work / "warmup")  # engine compiled, caches warm
        times: dict[str, list[float]] = {"geotiff": [], "service, cold cache": [], "service, warm cache": [],
                                         "fetch + decode only (cold)": []}
        masks = {}
        for k in range(args.repeats):
            times["geotiff"].append(run_geotiff(segmenter, work / "mosaic.tif", work / f"g{k}"))
            cache = work / f"cache{k}"
            times["service, cold cache"].append(run_service(segmenter, url, work / "aoi.geojson", work / f"c{k}", cache))
            times["service, warm cache"].append(run_service(segmenter, url, work / "aoi.geojson", work / f"w{k}", cache))
            times["fetch + decode only (cold)"].append(fetch_only(url, work / "aoi.geojson", work / f"f{k}",
                                                                  work / f"fcache{k}"))
            masks = {"geotiff": mask_of(work / f"g{k}"), "cold": mask_of(work / f"c{k}"), "warm": mask_of(work / f"w{k}")}
        cold = statistics.median(times["service, cold cache"])
        print("| run | seconds (median) | km² per hour | vs geotiff |")
        print("|---|---:|---:|---:|")
        base = statistics.median(times["geotiff"])
        for name, values in times.items():
            seconds = statistics.median(values)
            print(f"| {name} | {seconds:.2f} | {km2 / seconds * 3600:.0f} | {seconds / base:.2f}x |")
        fetch = statistics.median(times["fetch + decode only (cold)"])
        warm = statistics.median(times["service, warm cache"])
        print(f"\nshare of the cold service run: the service's cost over the GeoTIFF {(cold - base) / cold:.0%} "
              f"({cold - base:.2f} s); HTTP (cold - warm) {(cold - warm) / cold:.0%}; a bare block read of the AOI's "
              f"VRT (fetch + decode, no model) {fetch / cold:.0%}")
        same = {k: float((m == masks["geotiff"]).mean()) for k, m in masks.items()}
        print(f"masks equal to the GeoTIFF's: {json.dumps(same)}")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
