"""Procedural overhead scenes for the demo and the tests, in the competition format.

A scene is textured ground (grass and soil), roads, parking lots (grey like some roofs but
shadowless), tree clusters, and buildings: rotated rectangles and L-shapes with varied roof
colours, a gable shading line and a cast shadow. The mask is the roofs. Buildings are
placed without overlap. Sizes are in pixels at a nominal 0.5 m/px, so 1024 training tiles
and 224 test tiles look alike, as in the competition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from buildseg.formats import rle
from buildseg.formats.images import write_png
from buildseg.formats.tables import write_atomic_csv
from buildseg.settings.data import SynthSettings

SYNTH = SynthSettings()  # the defaults of `buildseg synth` (and the demo's data)

ROOF_COLOURS = np.array(
    [[178, 70, 55], [150, 150, 155], [215, 210, 200], [95, 110, 150], [120, 85, 60], [190, 120, 70], [70, 70, 75]],
    dtype=np.float32,
)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = rng.random((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _rotated_rect(cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=np.float32) / 2
    rot = np.array([[c, -s], [s, c]], dtype=np.float32)
    return corners @ rot.T + np.array([cx, cy], dtype=np.float32)


def _ground(rng: np.random.Generator, size: int) -> np.ndarray:
    grass = np.array([85, 115, 60], dtype=np.float32) + rng.normal(0, 8, 3)
    soil = np.array([150, 135, 105], dtype=np.float32) + rng.normal(0, 8, 3)
    blend = np.clip(_smooth_noise(rng, size, max(2, size // 128)) * 1.4 - 0.2, 0, 1)[..., None]
    texture = (_smooth_noise(rng, size, max(4, size // 8)) - 0.5)[..., None] * 30
    return grass * (1 - blend) + soil * blend + texture


def _draw_roads(rng: np.random.Generator, image: np.ndarray, occupied: np.ndarray) -> None:
    size = image.shape[0]
    for _ in range(rng.integers(0, 3 + size // 400)):
        angle = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0, size, 2)
        d = 2 * size * np.array([np.cos(angle), np.sin(angle)])
        p0 = tuple(int(v) for v in (cx - d[0], cy - d[1]))
        p1 = tuple(int(v) for v in (cx + d[0], cy + d[1]))
        width = int(rng.integers(8, 22))
        grey = float(rng.uniform(95, 140))
        cv2.line(image, p0, p1, (grey, grey, grey), width, cv2.LINE_AA)
        cv2.line(occupied, p0, p1, 1, width + 6)
        if width > 14:
            cv2.line(image, p0, p1, (220, 220, 210), 1, cv2.LINE_AA)
    for _ in range(rng.integers(0, 2 + size // 300)):  # parking lots: roof-grey, no shadow
        w, h = rng.uniform(20, 70, 2)
        poly = _rotated_rect(*rng.uniform(0, size, 2), w, h, rng.uniform(0, np.pi)).astype(np.int32)
        grey = float(rng.uniform(120, 165))
        cv2.fillPoly(image, [poly], (grey, grey, grey), cv2.LINE_AA)
        cv2.fillPoly(occupied, [poly], 1)


def _draw_trees(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    size = image.shape[0]
    for _ in range(count):
        cx, cy = rng.uniform(0, size, 2)
        for _ in range(rng.integers(1, 7)):
            x, y = (cx, cy) + rng.normal(0, 10, 2)
            radius = int(rng.integers(4, 12))
            shade = np.array([40, 75, 35], dtype=np.float32) * rng.uniform(0.7, 1.2)
            cv2.circle(image, (int(x) + 3, int(y) + 3), radius, (25, 35, 25), -1, cv2.LINE_AA)
            cv2.circle(image, (int(x), int(y)), radius, tuple(float(v) for v in shade), -1, cv2.LINE_AA)


def _building_polygons(rng: np.random.Generator, size: int, angle: float) -> list[np.ndarray]:
    cx, cy = rng.uniform(0, size, 2)
    w, h = rng.uniform(12, 60), rng.uniform(12, 45)
    parts = [_rotated_rect(cx, cy, w, h, angle)]
    if rng.random() < 0.35:  # L-shape: a wing sticking out of one end
        c, s = np.cos(angle), np.sin(angle)
        off = np.array([w / 2 - w / 6, h / 2 + h / 4])
        wx, wy = cx + off[0] * c - off[1] * s, cy + off[0] * s + off[1] * c
        parts.append(_rotated_rect(wx, wy, w / 3, h / 2 + 2, angle))
    return parts


def _draw_buildings(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, occupied: np.ndarray, count: int
) -> None:
    size = image.shape[0]
    street_angle = rng.uniform(0, np.pi)
    sun = rng.uniform(0, 2 * np.pi)
    shadow_dir = np.array([np.cos(sun), np.sin(sun)], dtype=np.float32)
    placed = attempts = 0
    while placed < count and attempts < count * 20:
        attempts += 1
        angle = street_angle + (rng.normal(0, 0.15) if rng.random() < 0.8 else rng.uniform(0, np.pi))
        polys = _building_polygons(rng, size, angle)
        lift = rng.uniform(3, 9)
        shadow = [p + shadow_dir * lift for p in polys]
        # Work in the building's window only: full-image masks per building are slow.
        corners = np.concatenate(polys + shadow)
        x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int) - 4, 0)
        x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 5, size)
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        shift = np.array([x0, y0], dtype=np.float32)
        win = (slice(y0, y1), slice(x0, x1))
        footprint = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cv2.fillPoly(footprint, [(p - shift).astype(np.int32) for p in polys], 1)
        if footprint.sum() < 60 or (footprint & occupied[win]).any():
            continue
        placed += 1
        view = image[win]
        shadow_sel = np.zeros_like(footprint)
        cv2.fillPoly(shadow_sel, [(p - shift).astype(np.int32) for p in shadow], 1)
        view[shadow_sel.astype(bool)] *= 0.45
        colour = ROOF_COLOURS[rng.integers(len(ROOF_COLOURS))] + rng.normal(0, 10, 3)
        view[footprint.astype(bool)] = colour
        # gable: one half of the roof a shade darker, split along the long axis
        c, s = np.cos(angle), np.sin(angle)
        yy, xx = np.nonzero(footprint)
        side = (xx - xx.mean()) * -s + (yy - yy.mean()) * c > 0
        view[yy[side], xx[side]] *= 0.85
        mask[win] |= footprint
        occupied[win] |= cv2.dilate(footprint, np.ones((7, 7), np.uint8))


def make_scene(rng: np.random.Generator, size: int, empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One (uint8 RGB image, uint8 0/1 mask) scene of ``size`` x ``size`` pixels."""
    image = _ground(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    occupied = np.zeros((size, size), dtype=np.uint8)
    area = (size / 224.0) ** 2
    _draw_roads(rng, image, occupied)
    _draw_trees(rng, image, int(rng.integers(0, 4) * area) + 1)
    if not empty:
        density = rng.uniform(0.3, 1.0)
        _draw_buildings(rng, image, mask, occupied, max(1, int(round(8 * density * area))))
    image = cv2.GaussianBlur(image, (3, 3), 0.7)
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask


@dataclass
class SynthPaths:
    train_csv: Path
    test_csv: Path
    test_truth_csv: Path


def write_dataset(
    out: str | Path,
    n_train: int = SYNTH.n_train,
    train_size: int = SYNTH.train_size,
    n_test: int = SYNTH.n_test,
    test_size: int = SYNTH.test_size,
    empty_fraction: float = 0.15,
    seed: int = SYNTH.seed,
    progress: bool = True,
) -> SynthPaths:
    """Write a competition-format dataset: train.csv + train_img/, test.csv + test_img/, test_truth.csv.

    ``empty_fraction`` of the scenes have no building, so the demo also exercises the
    metric's rule for empty tiles.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    train_rows, test_rows, truth_rows = [], [], []
    jobs = [("train", i, train_size) for i in range(n_train)] + [("test", i, test_size) for i in range(n_test)]
    for split, i, size in tqdm(jobs, desc="synth", disable=not progress, unit="img"):
        image, mask = make_scene(rng, size, empty=rng.random() < empty_fraction)
        img_id = f"{split.upper()}_{i:05d}" if split == "test" else f"TRAIN_{i:04d}"
        rel = f"./{split}_img/{img_id}.png"
        write_png(out / rel, image)
        if split == "train":
            train_rows.append((img_id, rel, rle.encode(mask)))
        else:
            test_rows.append((img_id, rel))
            truth_rows.append((img_id, rel, rle.encode(mask)))
    paths = SynthPaths(out / "train.csv", out / "test.csv", out / "test_truth.csv")
    write_atomic_csv(paths.train_csv, ("img_id", "img_path", "mask_rle"), train_rows)
    write_atomic_csv(paths.test_csv, ("img_id", "img_path"), test_rows)
    write_atomic_csv(paths.test_truth_csv, ("img_id", "img_path", "mask_rle"), truth_rows)
    return paths
