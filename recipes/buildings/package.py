"""Package a trained run as the packaged model ``buildings``: fp16 safetensors weights and the
model card (sources with their stated terms, recipe, code version, quality, sha256) in
``src/buildseg/zoo/``. Usage::

    python recipes/buildings/package.py runs/buildings --corpus /tmp/buildings_corpus.csv \\
        [--quality benchmarks/results/buildings_lopo.json] [--version 1.0]

The weight file is replaced (the repository keeps one file per model); git keeps old versions.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from buildseg.runtime.checkpoint import load_checkpoint
from buildseg.runtime.packaged import write_model

# What each source's own repository or dataset page states (shared/data/README.md, more_dev/README.md).
TERMS = {
    "dacon2023_satellite_building": "competition data distributed by Dacon; no licence stated in the source repo",
    "inria_aerial_image_labeling": "Inria Aerial Image Labeling dataset terms (project.inria.fr/aerialimagelabeling); "
                                   "research use",
    "spacenet_v2_buildings": "SpaceNet, CC BY-SA 4.0",
    "spacenet_v2_buildings_vegas": "SpaceNet, CC BY-SA 4.0",
    "crowdai_mapping_challenge": "crowdAI Mapping Challenge terms; not stated in the source repo",
    "whu_satellite_I_global_cities": "WHU Building Dataset terms (research use); not stated in the source repo",
    "whu_satellite_II_east_asia": "WHU Building Dataset terms (research use); not stated in the source repo",
    "whu_aerial_christchurch": "WHU Building Dataset terms (research use); imagery LINZ, CC BY 4.0",
    "massachusetts_buildings": "Massachusetts Buildings Dataset (Mnih 2013), research use; labels from OpenStreetMap (ODbL)",
    "isprs_potsdam_2d_semantic": "ISPRS benchmark data, research use",
    "open_cities_ai_tier1_acc": "Open Cities AI Challenge, CC BY 4.0",
    "xbd_mexico_earthquake_pre": "xBD, CC BY-NC-SA 4.0 (non-commercial)",
    "xbd_guatemala_volcano_pre": "xBD, CC BY-NC-SA 4.0 (non-commercial)",
    "xbd_hurricane_florence_pre": "xBD, CC BY-NC-SA 4.0 (non-commercial)",
}


def sources(corpus: Path) -> list[dict]:
    csv.field_size_limit(2**31 - 1)
    with open(corpus, newline="", encoding="utf-8") as handle:
        counts = Counter(row["source"] for row in csv.DictReader(handle))
    return [{"name": name, "tiles": n, "terms": TERMS.get(name, "not stated")} for name, n in sorted(counts.items())]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the training run folder (its best.pt)")
    parser.add_argument("--corpus", required=True, help="the corpus CSV the run trained on (recipes/buildings/corpus.py)")
    parser.add_argument("--quality", help="JSON of measured figures to put on the card (benchmarks)")
    parser.add_argument("--name", default="buildings")
    parser.add_argument("--version", default="1.0")
    args = parser.parse_args(argv)
    payload = load_checkpoint(Path(args.run) / "best.pt")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    quality = {"val_dice": payload.get("best_score"), "val_note": "10% of the corpus tiles held out (seen places)"}
    if args.quality:
        quality.update(json.loads(Path(args.quality).read_text()))
    weights = write_model(
        payload, name=args.name, version=args.version, sources=sources(Path(args.corpus)), quality=quality,
        recipe="python recipes/buildings/corpus.py --out CORPUS.csv && buildseg train --config "
               "recipes/buildings/train.yaml --data CORPUS.csv --out RUN && python recipes/buildings/package.py RUN",
        code_version=f"git {commit}",
        notes="Research use only: several sources are non-commercial (xBD) or state no terms. Trained on 14 public "
              "sources (no Google imagery).")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    size = weights.stat().st_size / 2**20
    print(f"wrote {weights} ({size:.1f} MB, sha256 {digest[:12]}...) and {args.name}.json")
    if size > 16:
        print("error: over the 16 MB limit of a packaged model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
