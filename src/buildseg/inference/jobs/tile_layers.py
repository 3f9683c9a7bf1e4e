"""Building layers that `predict --format` writes for tiles, besides the submission CSV.

Each tile's buildings are the 8-connected components of its final mask (the rule of the
building F1 and of the GIS footprints), scored by their mean predicted probability. A layer
turns them into its own records as the tiles finish (in the post-processing thread, so
memory holds the records, not the probability maps) and writes one file at the end, atomically.

* ``coco``: COCO instance JSON (``footprints/coco.py``), uncompressed RLE per building.
* ``spacenet``: SpaceNet's proposal CSV (``formats/spacenet.py``), pixel WKT per building
  (pixel-edge polygons, x right and y down from the tile's corner), ``POLYGON EMPTY`` for a
  tile without buildings, so ``buildseg evaluate`` or SpaceNet's scorer read it as it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np

from buildseg.formats.tables import Record
from buildseg.settings.inference import TILE_FORMATS


class TileLayer(ABC):
    """Collects per-tile records by input index; ``write`` puts them in input order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.found: dict[int, object] = {}

    def add(self, index: int, mask: np.ndarray, prob: np.ndarray) -> None:
        self.found[index] = self.records(mask, prob)

    @abstractmethod
    def records(self, mask: np.ndarray, prob: np.ndarray) -> object:
        """What this layer keeps of one tile."""

    @abstractmethod
    def write(self, records: Sequence[Record]) -> Path:
        """The layer's file for ``records`` (the tiles in input order)."""


class CocoLayer(TileLayer):
    def records(self, mask: np.ndarray, prob: np.ndarray) -> tuple[tuple[int, int], list[dict]]:
        from buildseg.footprints import coco

        return mask.shape, coco.annotations(mask, prob, image_id=0, first_id=0)

    def write(self, records: Sequence[Record]) -> Path:
        from buildseg.footprints import coco

        images, notes = [], []
        for index, record in enumerate(records):
            entry = {"id": index + 1, "file_name": str(record.image_path), "img_id": record.img_id}
            if index in self.found:  # absent: skipped as unreadable (--skip-bad), listed without buildings
                shape, annotations = self.found[index]
                entry.update(height=int(shape[0]), width=int(shape[1]))
                for note in annotations:
                    notes.append({**note, "id": len(notes) + 1, "image_id": index + 1})
            images.append(entry)
        return coco.write_coco(self.path, coco.document(images, notes))


class SpaceNetLayer(TileLayer):
    def records(self, mask: np.ndarray, prob: np.ndarray) -> list[tuple[object, float]]:
        from buildseg.footprints.polygons import mask_parts

        return [(part.polygon, part.mean_prob) for part in mask_parts(mask, prob)]

    def write(self, records: Sequence[Record]) -> Path:
        from buildseg.formats import spacenet

        rows = []
        for index, record in enumerate(records):
            rows += spacenet.tile_rows(record.img_id, self.found.get(index, []))
        return spacenet.write_spacenet(self.path, rows)


TILE_LAYERS = {"coco": CocoLayer, "spacenet": SpaceNetLayer}
assert set(TILE_LAYERS) == set(TILE_FORMATS) - {"csv"}, "settings/inference.py TILE_FORMATS names the layers"
