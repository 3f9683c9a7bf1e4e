"""Ship a new version of the packaged ``buildings`` model with a fitted scale head on the same
network (models/image_heads.py), keeping the current version loadable by name
(``--model buildings@1.0``). Usage::

    python recipes/buildings/corpus.py --out /tmp/corpus.csv          # real_dev, more_dev, more_dev2
    python recipes/buildings/heads.py --corpus /tmp/corpus.csv --version 1.1

The network's pixels do not change, so its place-held-out figures carry over; the head's own
figures (each place held out of its fit) come from ``benchmarks/image_heads.py``. The tile head
is not fitted: on the same folds it told tiles with buildings from empty ones no better than the
max probability (benchmarks/README.md, "Per-image heads").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from buildseg.formats.tables import load_records
from buildseg.runtime import packaged
from buildseg.runtime.checkpoint import load_model
from buildseg.training.image_heads import draw_crops, fit_heads, heads_payload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import place_of  # noqa: E402

SCALE_FIGURES = {  # benchmarks/README.md, "Per-image heads" (benchmarks/image_heads.py --min-zoom 0.125)
    "scale_head": "log2 pixel-size estimate, each of 17 places held out of its fit: median error 0.60 (x1.5); "
                  "predict --gsd-estimate on places 2x or more from 0.5 m: Dice +0.266 +- 0.177 (5 of 5 up; the "
                  "known GSD: +0.277); on places near 0.5 m: -0.034 +- 0.088 (7 of 12 down): opt-in",
}


def scale_head_payload(checkpoint: str | Path, corpus: Path, *, known: set[str], per_tile: int = 16) -> tuple[dict, list[dict]]:
    """The checkpoint's payload with a scale head fitted on its frozen network over ``corpus``'s
    tiles (every place weighted the same), and the card rows of the places only the head saw
    (sources not in ``known``, by place)."""
    from package import terms_of

    model, payload = load_model(checkpoint)
    records = load_records(corpus)
    places = [place_of(r.tile_source) for r in records]
    crops = draw_crops(records, model_gsd=float(payload["input"]["gsd"]), per_tile=per_tile, seed=0, groups=places)
    fitted = fit_heads(model, crops, ["scale"])
    known_places = {place_of(name) for name in known}
    head_only = [r for r, place in zip(records, places) if place not in known_places]
    rows = [{"name": f"{place} (scale head only)", "tiles": sum(place_of(r.tile_source) == place for r in head_only),
             "terms": terms_of(next(r.tile_source for r in head_only if place_of(r.tile_source) == place))}
            for place in sorted({place_of(r.tile_source) for r in head_only})]
    return heads_payload(fitted, payload), rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="corpus CSV with source and gsd columns (corpus.py)")
    parser.add_argument("--name", default="buildings")
    parser.add_argument("--version", required=True, help="the new version, e.g. 1.1")
    parser.add_argument("--per-tile", type=int, default=16)
    args = parser.parse_args(argv)
    current = packaged.archive(args.name)  # stays loadable as NAME@VERSION
    payload, head_sources = scale_head_payload(f"{packaged.PACKAGED_PREFIX}{args.name}@{current.version}", Path(args.corpus), known={s["name"] for s in current.sources},
                                               per_tile=args.per_tile)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    weights = packaged.write_model(
        payload, name=args.name, version=args.version, sources=list(current.sources) + head_sources,
        quality={**current.quality, **SCALE_FIGURES},
        recipe=f"{current.recipe} && python recipes/buildings/heads.py --corpus CORPUS.csv --version {args.version}",
        code_version=f"git {commit}",
        notes=(f"{current.notes} Changes from {current.version}: the same network (pixels identical), plus a scale "
               f"head (its own figures in quality.scale_head); `predict` prints its estimate for tiles without a GSD "
               f"and resamples by it with --gsd-estimate. {args.name}@{current.version} stays installed."))
    size = weights.stat().st_size / 2**20
    print(f"wrote {weights} ({size:.1f} MB) as {args.name} {args.version}; kept {args.name}@{current.version}")
    return 0 if size <= 16 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
