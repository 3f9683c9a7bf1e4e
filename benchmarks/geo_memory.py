"""Memory of geo training data against scene size: windowed reads keep it flat.

For each scene size, a fresh process prepares a synthetic GeoTIFF scene (3-band uint8,
tiled, deflate; UTM) with its footprints (GeoPackage in EPSG:4326, one polygon per building),
draws training windows of ``--crop`` px through :class:`GeoWindowDataset` (read + rasterise +
augment, as the DataLoader would) and reports the growth of its peak resident memory while
preparing (footprints read and reprojected, stretch and valid rows from decimated reads) and
then while drawing windows (raster reads: GDAL's block cache, bounded to 256 MB per process),
next to the memory a whole-scene read of the same raster would take. Same run, same machine:
compare the rows.

    .venv/bin/python benchmarks/geo_memory.py --sizes 2048 8192 16384 --windows 200
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_big_scene(folder: Path, size: int, tile: int = 1024) -> tuple[Path, Path, int]:
    """A size x size scene tiled from synthetic 1024 px scenes, and its footprints."""
    import geopandas as gpd
    import rasterio
    from rasterio.features import shapes
    from rasterio.transform import from_origin
    from rasterio.windows import Window
    from shapely.geometry import shape

    from buildseg.data.synth import make_scene

    raster, labels = folder / f"scene_{size}.tif", folder / f"labels_{size}.gpkg"
    transform = from_origin(500000.0, 4200000.0, 0.5, 0.5)
    rng = np.random.default_rng(0)
    pieces = [make_scene(rng, tile) for _ in range(4)]
    polygons = []
    with rasterio.open(raster, "w", driver="GTiff", height=size, width=size, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate") as dst:
        for k, y in enumerate(range(0, size, tile)):
            for j, x in enumerate(range(0, size, tile)):
                image, mask = pieces[(k + j) % 4]
                window = Window(x, y, min(tile, size - x), min(tile, size - y))
                dst.write(image[: window.height, : window.width].transpose(2, 0, 1), window=window)
                t = dst.window_transform(window)
                part = np.ascontiguousarray(mask[: window.height, : window.width])
                polygons += [shape(g) for g, _ in shapes(part, mask=part > 0, transform=t)]
    gpd.GeoDataFrame(geometry=polygons, crs="EPSG:32633").to_crs("EPSG:4326").to_file(labels, engine="pyogrio")
    return raster, labels, len(polygons)


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike ru_maxrss, which
    keeps the high-water mark of the parent that forked it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(raster: str, labels: str, windows: int, crop: int) -> dict:
    """Runs in its own process: prepare, draw windows, report peak RSS."""
    import torch  # noqa: F401  (the training process has it loaded)

    from buildseg.data.geo import GeoWindowDataset, prepare_geo_data

    base = peak_mb()
    start = time.perf_counter()
    geo = prepare_geo_data(raster, [labels], [1, 2, 3])
    prepared = time.perf_counter() - start
    after_prepare = peak_mb()
    dataset = GeoWindowDataset(geo.scenes, [1, 2, 3], crop_size=crop, samples_per_epoch=windows)
    start = time.perf_counter()
    for i in range(windows):
        dataset[(0, i)]
    rate = windows / (time.perf_counter() - start)
    peak = peak_mb()
    return {"base_mb": base, "prepare_mb": after_prepare, "peak_mb": peak, "prepare_s": prepared, "windows_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.windows, args.crop)))
        return
    print(f"{'scene px':>9} {'footprints':>10} {'whole read MB':>13} {'base MB':>8} {'+prepare':>9} "
          f"{'+windows':>9} {'peak MB':>8} {'prepare s':>9} {'windows/s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            raster, labels, n = write_big_scene(Path(tmp), size)
            out = subprocess.run([sys.executable, __file__, "--child", str(raster), str(labels), "--windows",
                                  str(args.windows), "--crop", str(args.crop)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{size:>9} {n:>10} {size * size * 3 / 2**20:>13.0f} {r['base_mb']:>8.0f} "
                  f"{r['prepare_mb'] - r['base_mb']:>9.0f} {r['peak_mb'] - r['prepare_mb']:>9.0f} {r['peak_mb']:>8.0f} "
                  f"{r['prepare_s']:>9.1f} {r['windows_per_s']:>9.1f}", flush=True)
            raster.unlink()


if __name__ == "__main__":
    main()
