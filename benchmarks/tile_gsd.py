"""``predict --gsd`` on tiles of known pixel size far from the model's 0.5 m: does telling the
model the scale help, per source, on sources the packaged model never saw?

The tiles of ``../shared/data/more_dev2`` (not in ``buildings`` 1.0's corpus) are grouped by
source; each source whose manifest GSD differs from 0.5 m by more than 1.4x is predicted with
``buildseg predict --model buildings`` twice in one run: as the tiles are (no GSD: today's
default for a CSV), and with ``--gsd`` set to the manifest's GSD (resampled to 0.5 m and back).
Each tile's competition Dice counts (tiles empty in truth and both predictions are left out; a
building-free tile left empty by one run and not by the other scores 1 against 0, so the pair
is compared); the paired difference per tile gives mean, spread and how many went up.

    python benchmarks/tile_gsd.py [--data ../shared/data/more_dev2]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loader_throughput import cpu_flags  # noqa: E402

BUILDSEG = str(Path(sys.executable).with_name("buildseg"))
FAR = 1.4  # a source whose GSD differs from the model's by more than this factor


def tile_dice(pred: str, truth: str, shape: tuple[int, int]) -> float:
    from buildseg.formats import rle

    p, t = rle.decode(pred, shape).astype(bool), rle.decode(truth, shape).astype(bool)
    total = p.sum() + t.sum()
    return float("nan") if total == 0 else 2.0 * (p & t).sum() / total


def main() -> None:
    from PIL import Image

    from buildseg.formats.tables import read_rle_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data" / "more_dev2")
    args = parser.parse_args()
    manifest = {r["img_id"]: r for r in csv.DictReader(open(args.data / "manifest.csv"))}
    rows = {r["img_id"]: r for r in csv.DictReader(open(args.data / "train.csv"))}
    groups: dict[tuple[str, float], list[str]] = defaultdict(list)
    for img_id, record in manifest.items():
        try:
            gsd = float(record["gsd_m"].split()[0].lstrip("~<"))
        except ValueError:
            continue
        if img_id in rows and abs(math.log(gsd / 0.5)) > math.log(FAR):
            groups[(record["source_dataset"].split(" (")[0], gsd)].append(img_id)
    env = {**os.environ, "BUILDSEG_PRECISION_AUTO": "rule"}  # one precision for both runs: only the scale differs
    print(f"CPU: {cpu_flags()}; {time.strftime('%Y-%m-%d')}; {args.data}")
    print("| source | GSD m | tiles scored | Dice as is | Dice with --gsd | paired change | tiles up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for (source, gsd), ids in sorted(groups.items(), key=lambda kv: kv[0][1]):
            table = Path(tmp) / "tiles.csv"
            with open(table, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["img_id", "img_path"])
                writer.writerows([i, str((args.data / rows[i]["img_path"]).resolve())] for i in ids)
            scores = {}
            for name, extra in (("as is", []), ("gsd", ["--gsd", str(gsd)])):
                out = Path(tmp) / f"{name}.csv"
                subprocess.run([BUILDSEG, "predict", "--model", "buildings", "--data", str(table), "--out", str(out),
                                "--engine", "torch", "--no-progress", *extra], check=True, env=env,
                               capture_output=True)
                pred = read_rle_table(out)
                scores[name] = []
                for i in ids:
                    with Image.open(args.data / rows[i]["img_path"]) as image:
                        shape = (image.height, image.width)
                    scores[name].append(tile_dice(pred[i], rows[i]["mask_rle"], shape))
            a, b = np.array(scores["as is"]), np.array(scores["gsd"])
            a_filled, b_filled = np.where(np.isnan(a) & ~np.isnan(b), 1.0, a), np.where(np.isnan(b) & ~np.isnan(a), 1.0, b)
            both = ~(np.isnan(a_filled) | np.isnan(b_filled))
            change = b_filled[both] - a_filled[both]
            print(f"| {source} | {gsd:g} | {both.sum()} | {np.nanmean(a_filled[both]):.3f} | "
                  f"{np.nanmean(b_filled[both]):.3f} | {change.mean():+.3f} +- {change.std():.3f} | "
                  f"{(change > 0).sum()} of {both.sum()} |")


if __name__ == "__main__":
    main()
