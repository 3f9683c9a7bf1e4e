"""COCO instance JSON from building masks: what pycocotools, detectron-style evaluation and
labelling tools read.

One annotation per building: an 8-connected component of the mask, the rule the building F1
and the GIS footprints use too. The segmentation is COCO's uncompressed RLE (column-major run
lengths, starting with a background run), which is exact for any shape, holes included,
where COCO polygons cannot hold a courtyard. ``score`` is the component's mean predicted
probability, so AP ranks buildings by the model's confidence. No pycocotools import: writing
needs NumPy only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from buildseg.atomic import atomic_open
from buildseg.formats.components import label_buildings

CATEGORY = {"id": 1, "name": "building", "supercategory": "structure"}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a 0/1 HxW mask: runs over the column-major pixels, first a
    run of 0s (possibly empty), then alternating."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def annotations(mask: np.ndarray, prob: np.ndarray | None, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """One COCO annotation per building of ``mask``, ids from ``first_id``."""
    labels, count = label_buildings(mask)
    out = []
    for k in range(1, count + 1):
        component = labels == k
        ys, xs = np.nonzero(component)
        x0, y0 = int(xs.min()), int(ys.min())
        out.append({
            "id": first_id + len(out), "image_id": image_id, "category_id": CATEGORY["id"], "iscrowd": 0,
            "segmentation": uncompressed_rle(component), "area": int(component.sum()),
            "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
            "score": float(prob[component].mean()) if prob is not None else 1.0,
        })
    return out


def document(images: Sequence[dict[str, Any]], annotations_: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"info": {"description": "buildseg building predictions"}, "images": list(images),
            "annotations": list(annotations_), "categories": [CATEGORY]}


def write_coco(path: str | Path, doc: dict[str, Any]) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(doc, handle)
    return Path(path)
