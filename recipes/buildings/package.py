"""Package a trained run as the packaged model ``buildings``: fp16 safetensors weights and the
model card (sources with their stated terms, recipe, schedule, code version, quality, sha256)
in ``src/buildseg/zoo/``. Usage::

    python recipes/buildings/package.py RUN --corpus CORPUS.csv --version 1.2 \\
        [--scale-head-corpus ALL.csv] [--keep [--reuse buildings@1.0]] [--quality figures.json] [--notes TEXT]

``--scale-head-corpus`` fits the pixel-size head on the run's frozen network (heads.py's fit)
before packaging. ``--keep`` keeps the version being replaced loadable as ``buildings@VERSION``;
with ``--reuse NAME@VERSION`` its file holds only the tensors it does not share with that
version (1.1 = 1.0's network + a head: a few kilobytes). The current file is replaced; git
keeps old versions.
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

from buildseg.runtime import packaged
from buildseg.runtime.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import place_of  # noqa: E402

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


PLACE_TERMS = {  # more_dev2's sources as its README states them, by place (corpus.place_of)
    "crowdai": "crowdAI Mapping Challenge terms; not stated in the source repo",
    "rio": "SpaceNet, CC BY-SA 4.0",
    "nacala": "imagery CC0 (repo); labels OpenStreetMap, ODbL",
    "inria": "Inria Aerial Image Labeling: public domain, cite Maggiori et al. 2017",
    "yangon_uav": "Hlaing Thar Yar UAV annotation: no terms stated",
    "whu_christchurch": "WHU Building Dataset: academic use with citation; imagery LINZ, CC BY 4.0",
}


def terms_of(source: str) -> str:
    return TERMS.get(source) or PLACE_TERMS.get(place_of(source), "not stated")


def sources(corpus: Path) -> list[dict]:
    csv.field_size_limit(2**31 - 1)
    with open(corpus, newline="", encoding="utf-8") as handle:
        counts = Counter(row["source"] for row in csv.DictReader(handle))
    return [{"name": name, "tiles": n, "terms": terms_of(name)} for name, n in sorted(counts.items())]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the training run folder (its best.pt)")
    parser.add_argument("--corpus", required=True, help="the corpus CSV the run trained on (recipes/buildings/corpus.py)")
    parser.add_argument("--quality", help="JSON of measured figures to put on the card (benchmarks)")
    parser.add_argument("--name", default="buildings")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--scale-head-corpus", help="fit the pixel-size head on these tiles (corpus.py, all sets)")
    parser.add_argument("--keep", action="store_true", help="keep the replaced version loadable as NAME@VERSION")
    parser.add_argument("--reuse", help="with --keep: store the kept version as a delta of this installed NAME@VERSION")
    parser.add_argument("--schedule", default="", help="the training schedule, for the card")
    parser.add_argument("--recipe", default="python recipes/buildings/corpus.py --out CORPUS.csv && buildseg train "
                        "--config recipes/buildings/train.yaml --data CORPUS.csv --out RUN && "
                        "python recipes/buildings/package.py RUN --corpus CORPUS.csv")
    parser.add_argument("--notes", default="Research use only: several sources are non-commercial (xBD) or state no "
                        "terms. No Google imagery.")
    args = parser.parse_args(argv)
    payload = load_checkpoint(Path(args.run) / "best.pt")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    quality = {"val_dice": payload.get("best_score"), "val_note": "10% of the corpus tiles held out (seen places)"}
    if args.quality:
        quality.update(json.loads(Path(args.quality).read_text()))
    card_sources = sources(Path(args.corpus))
    if args.scale_head_corpus:
        from heads import SCALE_FIGURES, scale_head_payload

        payload, head_sources = scale_head_payload(Path(args.run) / "best.pt", Path(args.scale_head_corpus),
                                                   known={s["name"] for s in card_sources})
        card_sources += head_sources
        quality.update(SCALE_FIGURES)
    if args.keep:
        kept = packaged.archive(args.name, reuse=args.reuse)
        print(f"kept {args.name} {kept.version} as {args.name}@{kept.version}" + (f" (a delta of {args.reuse})" if args.reuse else ""))
    weights = packaged.write_model(
        payload, name=args.name, version=args.version, sources=card_sources, quality=quality,
        recipe=args.recipe + (f"; schedule: {args.schedule}" if args.schedule else ""),
        code_version=f"git {commit}", notes=args.notes)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    size = weights.stat().st_size / 2**20
    print(f"wrote {weights} ({size:.1f} MB, sha256 {digest[:12]}...) and {args.name}.json")
    if size > 16:
        print("error: over the 16 MB limit of a packaged model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
