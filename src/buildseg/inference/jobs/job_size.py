"""A prediction job's size in 224 px model tiles, before it runs: what an optimisation could save
is measured against it (``inference/core/payoff.py``).

Estimates, read cheaply: the headers of up to :data:`SAMPLED` images of a CSV or folder (the
mean times their number), the model-GSD grid of a GeoTIFF, the first scene of a folder or list
times their number; a scene's pixels count as often as blocks, margins and windows read them (remote scenes are not all opened for this), an imagery service's pieces
exactly (their windows are planned already).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

TILE_PIXELS = 224 * 224  # the competition's test tile, the unit the precision timings use
SAMPLED = 32  # images whose size is read to estimate a CSV's or folder's


def tiles_of_pixels(pixels: float) -> float:
    return max(1.0, pixels / TILE_PIXELS)


def scene_overhead(*, block: int, margin: int, window: int, overlap: float) -> float:
    """Model pixels per scene pixel: each block is read with its margins and cut into
    overlapping windows (2.25 with the defaults: 2048 px blocks, 64 px margins, 1024 px windows
    at 0.25 overlap)."""
    read = block + 2 * margin
    if read <= window:
        return (read / block) ** 2
    stride = max(1, int(window * (1 - overlap)))
    count = math.ceil((read - window) / stride) + 1
    return (count * window / block) ** 2


def records_tiles(records: Sequence) -> float:
    """Tiles of a CSV's or folder's images: each image is at least one tile."""
    from PIL import Image

    if not records:
        return 0.0
    step = max(1, len(records) // SAMPLED)
    sizes = []
    for record in list(records)[::step][:SAMPLED]:
        try:
            with Image.open(record.image_path) as image:  # the header only
                sizes.append(tiles_of_pixels(image.width * image.height))
        except Exception:  # noqa: BLE001 - a bad image is reported by prediction itself; here it counts as one tile
            sizes.append(1.0)
    return len(records) * sum(sizes) / len(sizes)


def scenes_tiles(scenes: Sequence, grid_of: Callable[[object], object], *, overhead: float = 1.0) -> float:
    """Tiles of many scenes: planned windows exactly (an imagery service's pieces), else the
    first scene's grid (``grid_of(scene)``: its model-GSD grid) times the number of scenes."""
    if not scenes:
        return 0.0
    if all(getattr(scene, "window", None) for scene in scenes):
        return sum(tiles_of_pixels(overhead * scene.window[2] * scene.window[3]) for scene in scenes)
    grid = grid_of(scenes[0])
    return len(scenes) * tiles_of_pixels(overhead * grid.height * grid.width)
