"""Training targets beyond the footprint: the contact zone between buildings.

Touching or nearly touching buildings merge into one blob in a footprint mask, and one blob
is one building to the building F1. Following solaris' and RAMP's multi-channel masks, a
second channel marks the *contact zone*: pixels within ``radius`` px of two different
buildings (both the facing edges and the gap between them). At prediction a watershed cuts
the footprint along it (``inference/core/split.py``).

Buildings are the instances when they are known (vector footprints: one id per polygon), else
the 8-connected components of the mask (competition RLE masks: buildings that touch there are
already one component, so the contact zone is only learnt between separate ones).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CONTACT_RADIUS = 2  # px: a gap of up to 2 * radius px between two buildings is contact


def contact_zone(instances: np.ndarray, radius: int = CONTACT_RADIUS) -> np.ndarray:
    """(H, W) uint8: 1 where a (2r+1)^2 window holds two different building ids."""
    from scipy import ndimage

    size = 2 * radius + 1
    labels = instances.astype(np.int32, copy=False)
    if labels.max() <= 0:
        return np.zeros(labels.shape, dtype=np.uint8)
    high = ndimage.maximum_filter(labels, size=size, mode="constant", cval=0)
    big = np.iinfo(np.int32).max
    low = ndimage.minimum_filter(np.where(labels > 0, labels, big), size=size, mode="constant", cval=big)
    return ((high > 0) & (low < big) & (high != low)).astype(np.uint8)


def instances_of(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a binary mask as instance ids (the building F1's rule)."""
    from buildseg.formats.components import label_buildings

    return label_buildings(mask)[0]


def target_stack(mask: np.ndarray, targets: Sequence[str], instances: np.ndarray | None = None) -> np.ndarray:
    """(C, H, W) uint8: one channel per target name, the footprint first."""
    channels = []
    for name in targets:
        if name == "footprint":
            channels.append((mask > 0).astype(np.uint8))
        elif name == "contact":
            channels.append(contact_zone(instances if instances is not None else instances_of(mask)))
        else:
            raise ValueError(f"unknown target {name!r}")
    return np.stack(channels)
