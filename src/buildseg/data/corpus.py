"""Many sources as one training corpus: which place or sensor each tile comes from, its ground
sample distance, and how often each source is drawn.

A source's share of the training crops is ``n ** alpha / sum(n_s ** alpha)`` over the sources'
tile counts ``n`` (``--source-balance``): ``none`` (alpha 1) draws every tile equally often, so a
source's share is its size; ``sqrt`` (alpha 1/2) lets 354 tiles of one city count 9.4 times as
much as 4 tiles of another instead of 88 times; ``equal`` (alpha 0) gives every source the same
share. Within a source every tile is equally likely. Tiles without a source form one source
named ``""``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from buildseg.errors import BuildsegError
from buildseg.formats.tables import Record, parse_gsd, read_csv_rows
from buildseg.settings.train import SOURCE_BALANCES

ALPHA = {"none": 1.0, "sqrt": 0.5, "equal": 0.0}
assert set(ALPHA) == set(SOURCE_BALANCES)
SOURCE_COLUMNS = ("source", "source_dataset")  # the first present is used
GSD_COLUMNS = ("gsd", "gsd_m")


def _first_column(columns: Sequence[str], names: Sequence[str]) -> str | None:
    return next((n for n in names if n in columns), None)


def with_manifest(records: Sequence[Record], manifest: str | Path, *, require_all: bool = True) -> list[Record]:
    """``records`` with ``tile_source`` and ``gsd`` taken from ``manifest`` (a CSV keyed by
    ``img_id`` with ``source``/``source_dataset`` and ``gsd``/``gsd_m`` columns). Every training
    record must be in it (a tile left out would silently lose its source); a separate validation
    set (``require_all=False``) keeps its own columns for tiles the manifest lacks."""
    path = Path(manifest)
    if not path.is_file():
        raise BuildsegError(f"manifest not found: {path} (a CSV with img_id and source / gsd columns)")
    columns, rows = read_csv_rows(path)
    source_col, gsd_col = _first_column(columns, SOURCE_COLUMNS), _first_column(columns, GSD_COLUMNS)
    if "img_id" not in columns or (source_col is None and gsd_col is None):
        raise BuildsegError(f"{path} needs an img_id column and a source (or source_dataset) and/or gsd (or gsd_m) "
                            f"column; it has {', '.join(columns) or 'none'}")
    by_id = {row["img_id"].strip(): (line, row) for line, row in enumerate(rows, start=2)}
    missing = [r.img_id for r in records if r.img_id not in by_id]
    if missing and require_all:
        raise BuildsegError(f"{len(missing)} training images are not in {path} (e.g. {missing[0]}): add them or drop --manifest")
    out = []
    for r in records:
        if r.img_id not in by_id:
            out.append(r)
            continue
        line, row = by_id[r.img_id]
        source = (row.get(source_col) or "").strip() if source_col else r.tile_source
        gsd = parse_gsd(row.get(gsd_col), where=f"{path} line {line}") if gsd_col else r.gsd
        out.append(replace(r, tile_source=source, gsd=gsd))
    return out


def source_shares(records: Sequence[Record], balance: str) -> dict[str, float]:
    """Each source's share of the crops under ``balance`` (the module's formula)."""
    counts = Counter(r.tile_source for r in records)
    alpha = ALPHA[balance]
    total = sum(n**alpha for n in counts.values())
    return {source: n**alpha / total for source, n in sorted(counts.items())}


def record_weights(records: Sequence[Record], balance: str) -> np.ndarray | None:
    """Per-record draw probabilities, or None when every record is equally likely anyway (one
    source, or ``none``): then the dataset keeps its plain order and its old sample stream."""
    counts = Counter(r.tile_source for r in records)
    if balance == "none" or len(counts) < 2:
        return None
    shares = source_shares(records, balance)
    weights = np.array([shares[r.tile_source] / counts[r.tile_source] for r in records], dtype=np.float64)
    return weights / weights.sum()


def describe_sources(records: Sequence[Record], balance: str) -> list[str]:
    """One line per source: tiles, known GSD, and its share of the crops."""
    shares = source_shares(records, balance)
    lines = []
    for source, share in shares.items():
        members = [r for r in records if r.tile_source == source]
        gsds = sorted({r.gsd for r in members if r.gsd is not None})
        gsd = "unknown" if not gsds else (f"{gsds[0]:g} m" if len(gsds) == 1 else f"{gsds[0]:g}-{gsds[-1]:g} m")
        lines.append(f"{source or '(no source)'}: {len(members)} tiles, GSD {gsd}, {share:.1%} of crops")
    return lines
