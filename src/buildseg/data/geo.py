"""Training data from GeoTIFF scenes and vector footprints.

``buildseg train --data SCENES --labels FOOTPRINTS``: SCENES is a GeoTIFF, a folder of them or
a CSV listing them (column ``path``, optional ``split`` = train/val); FOOTPRINTS one or more
vector files. What happens, once per run, in the main process (:func:`prepare_geo_data`):

* footprints are read, repaired (``make_valid``), reprojected to each scene's CRS and kept
  only where they meet the scene; a scene and labels that do not overlap is an error that
  names both bounding boxes in the scene's CRS (the silent all-empty-masks failure);
* each scene's grid at ``--gsd`` and its band stretch are fixed (the same functions as
  GeoTIFF prediction, so training and prediction map values alike);
* the held-out part is chosen: scenes marked ``split=val``, else ``--val-data`` scenes, else
  ``--val-region`` (a bbox or a vector file), else ``val_fraction`` of the scenes, else, for a
  single scene, its bottom ``val_fraction`` strip. Training windows never touch it.

Then, in every DataLoader worker, scenes are opened lazily (each worker its own handles, at
most :data:`OPEN_SCENES` at a time) and read window by window: memory does not grow with
scene size. Footprints are rasterised per window from a shapely STRtree, so a window only
touches the polygons inside it.

Training windows (:class:`GeoWindowDataset`) are drawn from each sample's seed like the PNG
crops: a share ``positive_fraction`` is placed over a random footprint, the rest is drawn
among windows that contain no footprint (uniform when none is found in a few tries); windows
with more than ``max_nodata`` nodata (mask, nodata value, alpha, all-zero fill, outside the
raster) are redrawn. Validation (:class:`GeoGridDataset`) is a fixed grid of the held-out
part, scored like the competition's tiles.
"""

from __future__ import annotations

import csv
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from buildseg.data.augment import train_transform
from buildseg.data.datasets import grid_offsets, to_tensors
from buildseg.data.targets import target_stack
from buildseg.errors import BuildsegError
from buildseg.formats.locations import RASTER_SUFFIXES
from buildseg.formats.rasters import SceneGrid, check_bands, open_raster, raster_stretch, read_window, scene_grid
from buildseg.formats.stretch import Stretch
from buildseg.formats.vectors import Footprints, read_footprints

log = logging.getLogger("buildseg")

OPEN_SCENES = 8  # raster handles kept open per process (LRU)
DRAWS = 40  # window draws before giving up on a scene


@dataclass
class SceneSpec:
    path: Path
    split: str | None = None  # "train", "val" or None (decided by the run)


def list_scenes(spec: str | Path) -> list[SceneSpec]:
    """Scenes from a raster file, a folder of rasters, or a CSV (``path``[, ``split``])."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in RASTER_SUFFIXES)
        if not found:
            raise BuildsegError(f"no rasters ({', '.join(RASTER_SUFFIXES)}) in {path}")
        return [SceneSpec(p) for p in found]
    if not path.is_file():
        raise BuildsegError(f"scenes not found: {path} (give a GeoTIFF, a folder of them or a CSV listing them)")
    if path.suffix.lower() == ".csv":
        return _scenes_from_csv(path)
    return [SceneSpec(path)]


def _scenes_from_csv(path: Path) -> list[SceneSpec]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError:
        raise BuildsegError(f"{path} is not UTF-8 text; save the scene list as UTF-8") from None
    if not rows or "path" not in rows[0]:
        raise BuildsegError(f"{path}: a scene list needs a 'path' column (and optionally 'split' = train/val)")
    scenes = []
    for line, row in enumerate(rows, start=2):
        split = (row.get("split") or "").strip().lower() or None
        if split not in (None, "train", "val"):
            raise BuildsegError(f"{path} line {line}: split {row['split']!r} must be train or val")
        scene = Path(row["path"].strip())
        scenes.append(SceneSpec(scene if scene.is_absolute() else path.parent / scene, split))
    return scenes


@dataclass
class Scene:
    """One prepared scene: picklable (no open handles), everything a worker needs to read it."""

    path: Path
    crs: object | None
    transform: object  # affine.Affine of the source raster
    grid: SceneGrid
    stretch: Stretch | None
    polygons: np.ndarray  # footprints in the scene's CRS that meet the scene
    valid_rows: tuple[int, int] = (0, 0)  # grid rows [first, last) that hold valid pixels
    held_out: object | None = None  # shapely geometry (scene CRS) that training windows avoid
    val_region: object | None = None  # shapely geometry (scene CRS) to validate on; None: not a validation scene
    train: bool = True
    _tree: object | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tree"] = None
        return state

    def grid_transform(self, row: float = 0.0, col: float = 0.0):
        return self.grid.transform(self.transform, row, col)

    def window_box(self, row: float, col: float, height: float, width: float):
        """The window's footprint (a shapely polygon in the scene's CRS)."""
        from shapely.geometry import Polygon

        t = self.grid_transform(row, col)
        return Polygon([t @ (0, 0), t @ (width, 0), t @ (width, height), t @ (0, height)])

    def footprints_in(self, box) -> np.ndarray:
        """The polygons that meet ``box``, from the STRtree (built once per process)."""
        if len(self.polygons) == 0:
            return self.polygons
        if self._tree is None:
            from shapely import STRtree

            self._tree = STRtree(self.polygons)
        return self.polygons[self._tree.query(box, predicate="intersects")]

    def rasterize(self, row: int, col: int, height: int, width: int, all_touched: bool,
                  instances: bool = False) -> np.ndarray:
        """(H, W) footprint mask of a grid window: uint8 0/1, or int32 building ids (1..n,
        one per polygon) with ``instances``."""
        from rasterio.features import rasterize

        shapes = self.footprints_in(self.window_box(row, col, height, width))
        dtype = "int32" if instances else "uint8"
        if len(shapes) == 0:
            return np.zeros((height, width), dtype=dtype)
        values = range(1, len(shapes) + 1) if instances else [1] * len(shapes)
        return rasterize(zip(shapes, values), out_shape=(height, width), transform=self.grid_transform(row, col),
                         fill=0, dtype=dtype, all_touched=all_touched)

    def describe(self) -> dict:
        return {
            "path": str(self.path), "crs": self.crs.to_string() if self.crs else None,
            "grid": [self.grid.height, self.grid.width], "gsd": self.grid.gsd, "footprints": len(self.polygons),
            "stretch": None if self.stretch is None else {"low": self.stretch.low.tolist(), "high": self.stretch.high.tolist()},
            "train": self.train, "validation": self.val_region is not None,
        }


class SceneReader:
    """Raster handles opened lazily in the process that reads (each DataLoader worker its own)."""

    def __init__(self, scenes: Sequence[Scene], bands: list[int]) -> None:
        self.scenes = list(scenes)
        self.bands = list(bands)
        self._handles: OrderedDict[int, object] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state

    def source(self, s: int):
        handle = self._handles.pop(s, None)
        if handle is None:
            handle = open_raster(self.scenes[s].path)
            if len(self._handles) >= OPEN_SCENES:
                self._handles.popitem(last=False)[1].close()
        self._handles[s] = handle
        return handle

    def read(self, s: int, row: int, col: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        scene = self.scenes[s]
        return read_window(self.source(s), self.bands, scene.grid, row, col, size, size, scene.stretch)


@dataclass(frozen=True)
class Window:
    scene: int
    row: int
    col: int
    size: int


class GeoWindowDataset(Dataset):
    """Random training windows of ``crop_size`` grid pixels; same sample protocol as TrainCropDataset."""

    def __init__(self, scenes: Sequence[Scene], bands: list[int], *, crop_size: int = 224, samples_per_epoch: int = 0,
                 augment: bool = True, seed: int = 0, positive_fraction: float = 0.5, max_nodata: float = 0.2,
                 all_touched: bool = False, targets: Sequence[str] = ("footprint",),
                 augmentations: Sequence[str] = ("d4", "colour")) -> None:
        self.targets = list(targets)
        self.scenes = [s for s in scenes if s.train]
        if not self.scenes:
            raise BuildsegError("no scene is left for training: every scene is held out for validation")
        self.reader = SceneReader(self.scenes, bands)
        self.crop_size = crop_size
        areas = np.array([s.grid.height * s.grid.width for s in self.scenes], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.length = samples_per_epoch or max(1, int(round(areas.sum() / crop_size**2)))
        self.seed = seed
        self.positive_fraction = positive_fraction
        self.max_nodata = max_nodata
        self.all_touched = all_touched
        # "scale" does not apply: scenes are read at one ground sample distance (--gsd)
        self.transform = train_transform(augment, colour=len(bands) == 3, names=augmentations)

    def __len__(self) -> int:
        return self.length

    def _draw(self, rng: np.random.Generator, scene: Scene, positive: bool) -> tuple[int, int]:
        """A window over a random footprint (positive), else a uniformly random one."""
        c, grid = self.crop_size, scene.grid
        high_r, high_c = max(0, grid.height - c), max(0, grid.width - c)
        if positive and len(scene.polygons):
            polygon = scene.polygons[rng.integers(len(scene.polygons))]
            minx, miny, maxx, maxy = polygon.bounds
            col, row = ~scene.grid_transform() @ (rng.uniform(minx, maxx), rng.uniform(miny, maxy))
            r, k = int(row) - int(rng.integers(c)), int(col) - int(rng.integers(c))
            return min(max(r, 0), high_r), min(max(k, 0), high_c)
        return int(rng.integers(high_r + 1)), int(rng.integers(high_c + 1))

    def window(self, key: tuple[int, int] | int) -> tuple[Window, np.ndarray, np.ndarray, int]:
        """The sample's window, its image and validity, and the sample's seed.

        Candidates are redrawn while they touch the held-out area or hold too much nodata;
        a negative sample also redraws (for half of its draws) while its window holds a
        footprint, and falls back to the first acceptable window otherwise.
        """
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index, 7]).generate_state(1)[0])
        rng = np.random.default_rng(sample_seed)
        s = int(rng.choice(len(self.scenes), p=self.weights))
        scene, c = self.scenes[s], self.crop_size
        positive = bool(rng.random() < self.positive_fraction)
        fallback = None
        for attempt in range(DRAWS):
            row, col = self._draw(rng, scene, positive and attempt < DRAWS // 2)
            box = scene.window_box(row, col, c, c)
            if scene.held_out is not None and scene.held_out.intersection(box).area > 0:
                continue
            if not positive and attempt < DRAWS // 2 and len(scene.footprints_in(box)):
                fallback = fallback or (row, col)
                continue
            image, valid = self.reader.read(s, row, col, c)
            if 1.0 - valid.mean() <= self.max_nodata:
                return Window(s, row, col, c), image, valid, sample_seed
        if fallback is not None:
            image, valid = self.reader.read(s, *fallback, c)
            if 1.0 - valid.mean() <= self.max_nodata:
                return Window(s, *fallback, c), image, valid, sample_seed
        raise BuildsegError(f"{scene.path}: no {c}x{c} window with at most {self.max_nodata:.0%} nodata outside the "
                            f"validation area in {DRAWS} draws; lower --crop-size or raise --max-nodata")

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        win, image, valid, sample_seed = self.window(key)
        contact = "contact" in self.targets
        mask = self.scenes[win.scene].rasterize(win.row, win.col, win.size, win.size, self.all_touched, instances=contact)
        mask[~valid] = 0
        self.transform.set_random_seed(sample_seed)
        out = self.transform(image=image, mask=mask)
        if not contact:
            return to_tensors(out["image"], out["mask"])
        image_t, _ = to_tensors(out["image"], None)
        return image_t, torch.from_numpy(target_stack(out["mask"], self.targets, instances=out["mask"]))


class GeoGridDataset(Dataset):
    """Non-overlapping ``tile`` windows over the validation part of the scenes (mostly-nodata tiles left out).

    Items are ``(image, mask, valid)`` like :class:`GridTileDataset`'s, so validation scores both alike.
    """

    def __init__(self, scenes: Sequence[Scene], bands: list[int], *, tile: int = 224, max_nodata: float = 0.2,
                 all_touched: bool = False) -> None:
        self.scenes = list(scenes)
        self.reader = SceneReader(self.scenes, bands)
        self.tile = tile
        self.all_touched = all_touched
        self.tiles: list[Window] = []
        for s, scene in enumerate(self.scenes):
            if scene.val_region is None:
                continue
            for y, _h in grid_offsets(scene.grid.height, tile):
                for x, _w in grid_offsets(scene.grid.width, tile):
                    centre = scene.window_box(y + tile / 2 - 0.5, x + tile / 2 - 0.5, 1, 1).centroid
                    if scene.val_region.contains(centre) and self._mostly_valid(s, y, x, max_nodata):
                        self.tiles.append(Window(s, y, x, tile))
        self.reader = SceneReader(self.scenes, bands)  # no handles opened at construction travel to workers

    def _mostly_valid(self, s: int, row: int, col: int, max_nodata: float) -> bool:
        _, valid = self.reader.read(s, row, col, self.tile)
        return 1.0 - valid.mean() <= max_nodata

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        win = self.tiles[index]
        image, valid = self.reader.read(win.scene, win.row, win.col, win.size)
        mask = self.scenes[win.scene].rasterize(win.row, win.col, win.size, win.size, self.all_touched)
        mask[~valid] = 0
        image_t, mask_t = to_tensors(image, mask)
        return image_t, mask_t, torch.tensor([win.size, win.size])


# -- preparation ---------------------------------------------------------------------------
def _bbox_text(bounds) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in bounds) + ")"


def _region_geometries(spec: str, crs) -> object:
    """``--val-region``: "minx,miny,maxx,maxy" in the scene's CRS, or a vector file (reprojected)."""
    import shapely
    from shapely.geometry import box

    parts = spec.replace(",", " ").split()
    if len(parts) == 4:
        try:
            minx, miny, maxx, maxy = (float(p) for p in parts)
        except ValueError:
            pass
        else:
            if minx >= maxx or miny >= maxy:
                raise BuildsegError(f"--val-region {spec!r}: expected minx,miny,maxx,maxy with minx < maxx and miny < maxy")
            return box(minx, miny, maxx, maxy)
    if not Path(spec).exists():
        raise BuildsegError(f"--val-region {spec!r} is neither minx,miny,maxx,maxy nor an existing vector file")
    return shapely.union_all(read_footprints([spec]).to_crs(crs))


def _prepare_scene(spec: SceneSpec, footprints: Footprints, bands: list[int], gsd: float | None) -> Scene:
    from shapely import STRtree
    from shapely.geometry import box

    with open_raster(spec.path) as src:
        check_bands(src, bands, spec.path)
        if src.crs is None and footprints.crs is not None:
            raise BuildsegError(f"{spec.path} has no CRS but the labels are in {footprints.crs.to_string()}: "
                                "assign the scene its CRS (gdal_edit.py -a_srs EPSG:XXXX) so the footprints can be placed")
        if src.crs is not None and footprints.crs is None:
            log.warning("the labels have no CRS: assuming they are in %s's CRS (%s)", spec.path.name, src.crs.to_string())
        grid = scene_grid(src, gsd, spec.path)
        stretch = raster_stretch(src, bands)
        polygons = footprints.to_crs(src.crs)
        bounds = box(*src.bounds)
        if len(polygons):
            tree = STRtree(polygons)
            labels_box = box(*tree.total_bounds) if hasattr(tree, "total_bounds") else box(*_total_bounds(polygons))
            if not labels_box.intersects(bounds):
                crs_text = src.crs.to_string() if src.crs else "pixel coordinates"
                raise BuildsegError(f"labels {', '.join(footprints.sources)} do not overlap scene {spec.path}: labels bbox "
                                    f"{_bbox_text(labels_box.bounds)} vs scene bbox {_bbox_text(src.bounds)} (both in "
                                    f"{crs_text}); check that the labels' CRS is declared correctly")
            polygons = polygons[tree.query(bounds, predicate="intersects")]
        return Scene(spec.path, src.crs, src.transform, grid, stretch, polygons, _valid_rows(src, grid))


def _valid_rows(src, grid: SceneGrid, sample: int = 512) -> tuple[int, int]:
    """Grid rows [first, last) holding valid pixels, from a decimated read of the raster's mask."""
    height = min(src.height, sample)
    rows = src.dataset_mask(out_shape=(height, min(src.width, sample))).any(axis=1).nonzero()[0]
    if len(rows) == 0:
        raise BuildsegError(f"{src.name} holds no valid pixels (all nodata); leave it out of the scenes")
    scale = grid.height / height
    return int(rows[0] * scale), min(grid.height, int(np.ceil((rows[-1] + 1) * scale)))


def _total_bounds(polygons: np.ndarray) -> tuple[float, float, float, float]:
    import shapely

    b = shapely.bounds(polygons)
    return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())


def _whole(scene: Scene):
    return scene.window_box(0, 0, scene.grid.height, scene.grid.width)


def _assign_validation(scenes: list[Scene], specs: list[SceneSpec], val_scenes: list[Scene], val_region: str | None,
                       val_fraction: float, val_tile: int, seed: int) -> None:
    """Mark what is held out (see the module docstring for the order of the rules)."""
    marked = [s for s, spec in zip(scenes, specs) if spec.split == "val"]
    if marked or val_scenes:
        for scene in marked + val_scenes:
            scene.train, scene.val_region = False, _whole(scene)
        return
    if val_region:
        touched = 0
        for scene in scenes:
            region = _region_geometries(val_region, scene.crs)
            if region.intersects(_whole(scene)):
                scene.held_out = scene.val_region = region
                touched += 1
        if not touched:
            raise BuildsegError(f"--val-region {val_region!r} does not overlap any scene; give it in the scenes' CRS")
        return
    if len(scenes) >= 2:
        count = max(1, int(round(val_fraction * len(scenes))))
        for scene in random.Random(seed).sample(scenes, count):
            scene.train, scene.val_region = False, _whole(scene)
        return
    scene = scenes[0]  # one scene: hold out the bottom strip of its valid rows
    first, last = scene.valid_rows
    strip = min((last - first) // 2, max(2 * val_tile, int(round(val_fraction * (last - first)))))
    top = last - strip
    scene.held_out = scene.val_region = scene.window_box(top, 0, scene.grid.height - top, scene.grid.width)
    log.info("one scene: validating on its bottom %d valid rows (grid rows %d..%d); --val-region chooses another "
             "area", strip, top, last)


@dataclass
class GeoData:
    scenes: list[Scene]
    bands: list[int]

    def describe(self) -> list[dict]:
        return [s.describe() for s in self.scenes]


def prepare_geo_data(scenes_spec: str, labels: Sequence[str], bands: list[int], gsd: float | None = None,
                     layer: str | None = None, val_spec: str | None = None, val_region: str | None = None,
                     val_fraction: float = 0.1, val_tile: int = 224, seed: int = 0) -> GeoData:
    """Read the footprints once and prepare every scene (training and validation)."""
    footprints = read_footprints(labels, layer)
    specs = list_scenes(scenes_spec)
    scenes = [_prepare_scene(spec, footprints, bands, gsd) for spec in specs]
    val_scenes = [_prepare_scene(spec, footprints, bands, gsd) for spec in list_scenes(val_spec)] if val_spec else []
    _assign_validation(scenes, specs, val_scenes, val_region, val_fraction, val_tile, seed)
    every = scenes + val_scenes
    log.info("geo data: %d scene(s), %d footprints inside them, grid %s", len(every),
             sum(len(s.polygons) for s in every), "at " + f"{gsd:g} m" if gsd else "of each scene's own pixels")
    return GeoData(every, bands)
