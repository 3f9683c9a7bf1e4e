"""Large GeoTIFFs: block-by-block prediction into a georeferenced mask and building footprints.

The raster is processed in blocks of ``block`` pixels, each read with a context margin
(boundless read, so edges get zeros) and predicted with the Segmenter (which blends
overlapping windows itself when the block is larger than its window); only the block's
centre is written. Memory is bounded by one block plus its margin. The mask is a
Cloud-Optimised GeoTIFF on the raster's own grid.

Footprints (``footprints/``): each block's buildings are polygonised with their mean
probability; buildings cut by a block border are joined into one at the end; then the area
filter (``min_area_m2``), simplification (default one pixel), optional regularisation, and
the layer is written in the format its extension names (GeoPackage, GeoParquet, FlatGeobuf,
GeoJSON). Areas are in m^2 for CRSs in metres; for a raster without a CRS, coordinates and
areas are in pixels (with a warning).

Rasters that are not 8-bit (11/12/16-bit, float) are mapped to 0-255 with one per-band
2-98 percentile stretch for the whole raster (``stretch="none"``: clip to 0-255 instead).
``gsd``: blocks are read resampled to the model's ground sample distance and the
probabilities resampled back. Nodata pixels are never buildings.

Post-processing runs per block, so a component cut by a block border is judged by its
part in each block for ``min_area`` (pixels); ``min_area_m2`` judges whole footprints.
Needs the ``geo`` extra (rasterio, shapely, geopandas).

The steps are separate so that one scene can be shared out: :func:`plan_scene` fixes what
every block needs (grid, bands, stretch), :func:`predict_blocks` predicts any subset of the
blocks into any raster, and :func:`footprint_layer` joins the blocks' parts in block order.
:func:`predict_geotiff` runs them on all blocks in one process; the Ray runner cuts a large
scene into pieces of blocks on several workers (``scene_pieces.py``) with the same result.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from buildseg.errors import BuildsegError
from buildseg.footprints.clean import FootprintOptions, clean_footprints
from buildseg.footprints.polygons import block_parts, join_border_parts
from buildseg.footprints.writers import check_footprint_path, to_cog, write_footprints
from buildseg.formats.locations import is_remote, location_name
from buildseg.formats.rasters import (
    SceneGrid,
    check_bands,
    metres_per_unit,
    open_raster,
    raster_stretch,
    read_window,
    require_rasterio,
    scene_grid,
)
from buildseg.formats.stretch import Stretch
from buildseg.inference.core.checkpoint_info import CheckpointInfo
from buildseg.inference.core.segmenter import Segmenter
from buildseg.settings.inference import BLOCK

log = logging.getLogger("buildseg")


@dataclass
class GeoResult:
    mask_path: Path
    footprints_path: Path | None
    n_polygons: int
    crs: str | None
    area_unit: str | None
    footprints: object | None = field(default=None, repr=False)  # the GeoDataFrame written
    pixel_size: float | None = None  # the raster's pixel size in CRS units
    gaps: list = field(default_factory=list)  # [minx, miny, maxx, maxy] of windows that could not be read

    @property
    def geojson_path(self) -> Path | None:  # the name before footprints had several formats
        return self.footprints_path


@dataclass(frozen=True)
class GeoTiffSettings:
    """Everything besides the checkpoint that changes a GeoTIFF scene's outputs: one object for
    the single-scene path, the many-scene path (``SceneSettings`` adds the layer format) and
    the CLI, so a setting is declared, defaulted and documented once."""

    block: int = BLOCK  # pixels per processing block
    simplify: float | None = None  # footprint tolerance in CRS units; None: one pixel; 0: exact outlines
    stretch: str = "percentile"  # non-8-bit input: per-band 2-98 percentile stretch, or "none" (clip)
    gsd: float | None = None  # metres per pixel to predict at; None: the raster's own
    bands: list[int] | None = None  # 1-based bands to read; None: 1..in_chans
    min_area_m2: float = 0.0  # footprints smaller than this ground area are dropped
    regularize: bool = False  # right-angle footprints (buildingregulariser)
    allow_gaps: bool = False  # a tile that cannot be read is a recorded gap (never a building), not a stop


MARGIN = 64  # context pixels read around every block (the network sees past the block's edge)


@dataclass(frozen=True)
class ScenePlan:
    """What every process predicting blocks of one scene must share, fixed once from the
    raster's header: the grid, the bands, the stretch (a whole-raster percentile, so it cannot
    be computed per piece) and the block layout. Picklable: the Ray driver hands it to workers."""

    location: str | Path
    name: str  # the file name, the footprints' ``source``
    bands: tuple[int, ...]
    grid: SceneGrid
    scaling: Stretch | None
    height: int  # raster pixels
    width: int
    block: int
    margin: int
    crs: Any  # rasterio CRS or None
    transform: Any  # the raster's affine transform
    allow_gaps: bool = False  # GeoTiffSettings.allow_gaps

    def blocks(self) -> list[tuple[int, int]]:
        """(row, col) of every block's top-left pixel, row-major: the order parts are joined in."""
        return [(y, x) for y in range(0, self.height, self.block) for x in range(0, self.width, self.block)]

    def block_shape(self, y: int, x: int) -> tuple[int, int]:
        return min(self.block, self.height - y), min(self.block, self.width - x)

    def mask_profile(self, *, height: int, width: int, transform) -> dict:
        """The rasterio profile of a uint8 mask (the scene's, or one piece's)."""
        return dict(driver="GTiff", height=height, width=width, count=1, dtype="uint8", crs=self.crs,
                    transform=transform, compress="deflate", tiled=True, blockxsize=256, blockysize=256)


@dataclass
class BlockParts:
    """One block's footprint parts: whole buildings, and those cut by the block's edge."""

    y: int
    x: int
    inner: list
    border: list


def plan_scene(segmenter: Segmenter | CheckpointInfo, src_path: str | Path, settings: GeoTiffSettings, *,
               margin: int = MARGIN) -> ScenePlan:
    """Check the raster against the model and the settings and fix the scene's plan (only the
    model's channel count is read: a :class:`CheckpointInfo` will do)."""
    src_path = src_path if is_remote(src_path) else Path(src_path)
    bands = list(settings.bands) if settings.bands else list(range(1, segmenter.in_chans + 1))
    if len(bands) != segmenter.in_chans:
        raise BuildsegError(f"--bands {','.join(map(str, bands))} gives {len(bands)} channels but the model expects "
                            f"{segmenter.in_chans}")
    with open_raster(src_path) as src:
        check_bands(src, bands, src_path)
        if src.crs is None:
            warnings.warn(f"{src_path} has no CRS: the mask keeps its pixel grid and polygons are in pixel coordinates",
                          stacklevel=3)
        grid = scene_grid(src, settings.gsd, src_path)
        if grid.resampled:
            log.info("predicting %s at %g m per pixel (resampled x%.3g), written back on its own grid",
                     location_name(src_path), settings.gsd, 1 / grid.step_x)
        scaling = raster_stretch(src, bands, settings.stretch)
        return ScenePlan(src_path, location_name(src_path), tuple(bands), grid, scaling, src.height, src.width,
                         settings.block, margin, src.crs, src.transform, settings.allow_gaps)


def sample_windows(plan: ScenePlan, n: int, *, tile: int = 224, seed: int = 0, min_valid: float = 0.5) -> list[np.ndarray]:
    """Up to ``n`` random ``tile`` px windows of the scene on the model's grid, as the blocks
    are read (bands, stretch, resampling), as (1, C, tile, tile) float32 raw pixels; windows
    with less than ``min_valid`` valid pixels are passed over. For calibrating on the input."""
    rng = np.random.default_rng(seed)
    grid, images = plan.grid, []
    with open_raster(plan.location) as src:
        for _ in range(3 * n):
            if len(images) == n:
                break
            row, col = (float(rng.uniform(0, max(0, size - tile))) for size in (grid.height, grid.width))
            image, valid = read_window(src, list(plan.bands), grid, row, col, tile, tile, plan.scaling,
                                       fill_is_nodata=False)
            if valid.mean() >= min_valid:
                images.append(np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32))
    return images


def predict_blocks(segmenter: Segmenter, plan: ScenePlan, blocks: list[tuple[int, int]], dst, *,
                   origin: tuple[int, int] = (0, 0), footprints: bool = True, progress: bool = False,
                   gaps: list | None = None) -> list[BlockParts]:
    """Predict ``blocks`` of the scene and write their masks into ``dst`` (an open rasterio
    dataset whose pixel (0, 0) is the scene's pixel ``origin``); their footprint parts.
    With ``plan.allow_gaps``, the raster windows that could not be read go to ``gaps``.

    A block's result depends only on the plan and its own position (its window and margin are
    read from the raster), so any process predicting it writes the same pixels."""
    import cv2
    from rasterio.windows import Window
    from tqdm import tqdm

    grid, margin, rules = plan.grid, plan.margin, segmenter.rules
    parts = []
    gaps = (gaps if gaps is not None else []) if plan.allow_gaps else None  # None: a failed read stops the scene
    with open_raster(plan.location) as src:
        for y, x in tqdm(blocks, desc=plan.name, unit="block", disable=not progress or len(blocks) < 2):
            h, w = plan.block_shape(y, x)
            size = (h + 2 * margin, w + 2 * margin)
            rows, cols = max(1, round(size[0] / grid.step_y)), max(1, round(size[1] / grid.step_x))
            image, valid = read_window(src, list(plan.bands), grid, (y - margin) / grid.step_y,
                                       (x - margin) / grid.step_x, rows, cols, plan.scaling, fill_is_nodata=False,
                                       gaps=gaps)
            maps = segmenter.probabilities(image).mean[0]  # (K, h, w): the footprint, then e.g. the contact zone
            if grid.resampled:
                maps = np.stack([cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for m in maps])
                valid = cv2.resize(valid.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0
            centre = (slice(margin, margin + h), slice(margin, margin + w))
            maps = np.ascontiguousarray(maps[(slice(None), *centre)])
            mask = rules(maps)
            mask[~valid[centre]] = 0
            dst.write(mask[None], window=Window(x - origin[1], y - origin[0], w, h))
            if footprints:
                inner, border = block_parts(mask, maps[0], src.window_transform(Window(x, y, w, h)))
                parts.append(BlockParts(y, x, inner, border))
    return parts


def join_blocks(parts: list[BlockParts], *, crs, pixel_size: float, settings: GeoTiffSettings, source: str):
    """The footprints (a GeoDataFrame) of blocks' parts, in block order whoever predicted them:
    parts cut by block borders joined, then cleaned. ``pixel_size`` in CRS units."""
    parts = sorted(parts, key=lambda p: (p.y, p.x))
    joined = [q for p in parts for q in p.inner] + join_border_parts([q for p in parts for q in p.border])
    options = FootprintOptions(settings.min_area_m2, settings.simplify, settings.regularize)
    return clean_footprints(joined, crs, pixel_size, metres_per_unit(crs), options, source)


def footprint_layer(plan: ScenePlan, parts: list[BlockParts], settings: GeoTiffSettings, path: Path):
    """The scene's footprints from its blocks' parts (:func:`join_blocks`), written to ``path``."""
    frame = join_blocks(parts, crs=plan.crs, pixel_size=abs(plan.transform.a), settings=settings, source=plan.name)
    write_footprints(frame, path)
    return frame


def geo_result(plan: ScenePlan, mask_path: Path, footprints_path: Path | None, frame) -> GeoResult:
    unit = metres_per_unit(plan.crs)
    area_unit = "m^2" if unit else ("px^2" if plan.crs is None else None)
    return GeoResult(mask_path, footprints_path, 0 if frame is None else len(frame),
                     plan.crs.to_string() if plan.crs else None, area_unit, frame, abs(plan.transform.a))


def predict_geotiff(
    segmenter: Segmenter,
    src_path: str | Path,
    mask_path: str | Path,
    footprints_path: str | Path | None = None,
    settings: GeoTiffSettings | None = None,
    *,
    margin: int = MARGIN,
    progress: bool = False,
    **overrides: Any,
) -> GeoResult:
    """Predict a raster block by block into a mask COG on the raster's own grid, and footprints.

    ``gsd`` (metres per pixel): each block is read resampled to it, predicted, and the
    probabilities are resampled back to the raster's pixels, so a model trained at 0.5 m
    applies to 0.3 m imagery. ``bands``: the 1-based bands to read (default 1..in_chans).
    ``simplify``: tolerance in CRS units (None: one pixel; 0: exact pixel outlines).
    """
    settings = replace(settings or GeoTiffSettings(), **overrides)  # e.g. block=128 from a test or a script
    mask_path = Path(mask_path)
    if footprints_path is not None:
        footprints_path = check_footprint_path(footprints_path)
    rasterio = require_rasterio()
    plan = plan_scene(segmenter, src_path, settings, margin=margin)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = mask_path.with_name(f".{mask_path.name}.tmp")
    try:
        with rasterio.open(tmp, "w", **plan.mask_profile(height=plan.height, width=plan.width,
                                                          transform=plan.transform)) as dst:
            parts = predict_blocks(segmenter, plan, plan.blocks(), dst, footprints=footprints_path is not None,
                                   progress=progress)
        to_cog(tmp, mask_path)
    finally:
        tmp.unlink(missing_ok=True)
    frame = footprint_layer(plan, parts, settings, footprints_path) if footprints_path is not None else None
    return geo_result(plan, mask_path, footprints_path, frame)


def gap_bounds(plan: ScenePlan, gaps: list) -> list[list[float]]:
    """Raster windows (row, col, height, width) as [minx, miny, maxx, maxy] in the scene's CRS."""
    bounds = []
    for row, col, height, width in sorted(set(gaps)):
        (x0, y0), (x1, y1) = plan.transform @ (col, row), plan.transform @ (col + width, row + height)
        bounds.append([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)])
    return bounds
