"""What a building is in a binary mask: an 8-connected component. One definition for the
metrics, the footprints, the training targets and COCO, so a mask and its polygons score alike."""

from __future__ import annotations

import numpy as np


def label_buildings(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count): 8-connected components of a binary mask, labelled 1..count."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3), dtype=bool))
    return labels, int(count)
