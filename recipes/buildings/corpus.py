"""The base model's training corpus: every tile of ``shared/data/real_dev``, ``more_dev`` and
``more_dev2`` (``--sets``; 1.0 saw the first two) except the Xiamen tiles (Google imagery, which a model the project ships may not learn from),
as one competition CSV with ``source`` and ``gsd`` columns (absolute image paths, so the CSV
can live anywhere). Usage::

    python recipes/buildings/corpus.py --shared ../shared/data --out /tmp/buildings_corpus.csv
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

SETS = ("real_dev", "more_dev", "more_dev2")  # 1.0 trained on the first two
EXCLUDED_SOURCES = ("xiamen_robosat_handdigitised",)  # Google imagery: not for a shipped model (more_dev/README.md)


def place_of(source: str) -> str:
    """A short place key for a ``source`` value; namesakes across the shared sets (Inria, crowdAI,
    WHU Christchurch) are one place, so a fold that holds a place out holds all of it out."""
    low = source.lower()
    for key, place in (("inria", "inria"), ("crowdai", "crowdai"), ("christchurch", "whu_christchurch"),
                       ("whu building dataset, aerial", "whu_christchurch"), ("rio", "rio"), ("nacala", "nacala"),
                       ("hlaing", "yangon_uav")):
        if key in low:
            return place
    return re.sub(r"[^a-z0-9]+", "_", low).strip("_")


def corpus_rows(shared: Path, sets: tuple[str, ...] = SETS, hold_out: tuple[str, ...] = ()) -> list[dict[str, str]]:
    rows = []
    csv.field_size_limit(2**31 - 1)
    for name in sets:
        folder = shared / name
        with open(folder / "manifest.csv", newline="", encoding="utf-8") as handle:
            manifest = {row["img_id"]: row for row in csv.DictReader(handle)}
        with open(folder / "train.csv", newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                meta = manifest[row["img_id"]]
                if meta["source_dataset"] in EXCLUDED_SOURCES or place_of(meta["source_dataset"]) in hold_out:
                    continue
                rows.append({"img_id": row["img_id"], "img_path": str((folder / row["img_path"]).resolve()),
                             "mask_rle": row["mask_rle"], "source": meta["source_dataset"], "gsd": meta["gsd_m"]})
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared/data", help="folder holding real_dev/ and more_dev/")
    parser.add_argument("--out", required=True, help="the corpus CSV to write")
    parser.add_argument("--sets", nargs="+", default=list(SETS), help="folders of --shared to take")
    parser.add_argument("--hold-out", nargs="*", default=[], metavar="PLACE",
                        help="places (place_of keys, e.g. rio nacala yangon_uav) left out, to measure on them")
    args = parser.parse_args(argv)
    rows = corpus_rows(Path(args.shared), tuple(args.sets), tuple(args.hold_out))
    with open(args.out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["img_id", "img_path", "mask_rle", "source", "gsd"])
        writer.writeheader()
        writer.writerows(rows)
    sources = sorted({r["source"] for r in rows})
    print(f"wrote {args.out}: {len(rows)} tiles from {len(sources)} sources ({', '.join(sources)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
