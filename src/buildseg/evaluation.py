"""Scoring a submission CSV against a truth CSV with the competition metric."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from buildseg.errors import BuildsegError, RleError
from buildseg.formats import rle
from buildseg.formats.images import image_size
from buildseg.formats.tables import load_records, read_csv_rows, read_rle_table
from buildseg.metrics import image_counts, summarize

log = logging.getLogger("buildseg")


def truth_masks(truth_csv: str | Path, shape: tuple[int, int] | None = None) -> dict[str, tuple[str, tuple[int, int]]]:
    """img_id -> (rle, (H, W)). A dataset CSV (with img_path) takes sizes from the images;
    a bare ``img_id,mask_rle`` CSV uses ``shape`` (default 224x224, the test tiles)."""
    truth_csv = Path(truth_csv)
    if not truth_csv.is_file():
        raise BuildsegError(f"truth CSV not found: {truth_csv} (give img_id,mask_rle or a dataset CSV with img_path)")
    columns, _ = read_csv_rows(truth_csv)
    if "img_path" in columns:
        records = load_records(truth_csv, require_masks=True)
        return {r.img_id: (r.rle or rle.EMPTY, shape or image_size(r.image_path)) for r in records}
    table = read_rle_table(truth_csv)
    size = shape or (224, 224)
    return {k: (v, size) for k, v in table.items()}


def evaluate_csv(pred_csv: str | Path, truth_csv: str | Path, shape: tuple[int, int] | None = None) -> dict:
    """Competition Dice and companions; every truth id must have a prediction."""
    truth = truth_masks(truth_csv, shape)
    pred = read_rle_table(pred_csv)
    missing = [k for k in truth if k not in pred]
    if missing:
        raise BuildsegError(f"{pred_csv} has no row for {len(missing)} of {len(truth)} truth images (e.g. {missing[0]})")
    extra = len(set(pred) - set(truth))
    if extra:
        log.warning("%s has %d ids that are not in the truth; ignored", pred_csv, extra)
    counts = np.zeros((len(truth), 3), dtype=np.int64)
    for i, (img_id, (truth_rle, size)) in enumerate(truth.items()):
        try:
            g = rle.decode(truth_rle, size, img_id=img_id)
        except RleError as exc:
            raise BuildsegError(f"{truth_csv}: {exc}") from None
        try:
            p = rle.decode(pred[img_id], size, img_id=img_id)
        except RleError as exc:
            raise BuildsegError(f"{pred_csv}: {exc}") from None
        counts[i] = image_counts(p, g)
    return summarize(counts)
