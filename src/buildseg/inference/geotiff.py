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
    check_bands,
    metres_per_unit,
    open_raster,
    raster_stretch,
    read_window,
    require_rasterio,
    scene_grid,
)
from buildseg.inference.segmenter import Segmenter

log = logging.getLogger("buildseg")


@dataclass
class GeoResult:
    mask_path: Path
    footprints_path: Path | None
    n_polygons: int
    crs: str | None
    area_unit: str | None
    footprints: object | None = field(default=None, repr=False)  # the GeoDataFrame written

    @property
    def geojson_path(self) -> Path | None:  # the name before footprints had several formats
        return self.footprints_path


@dataclass(frozen=True)
class GeoTiffSettings:
    """Everything besides the checkpoint that changes a GeoTIFF scene's outputs: one object for
    the single-scene path, the many-scene path (``SceneSettings`` adds the layer format) and
    the CLI, so a setting is declared, defaulted and documented once."""

    block: int = 2048  # pixels per processing block
    simplify: float | None = None  # footprint tolerance in CRS units; None: one pixel; 0: exact outlines
    stretch: str = "percentile"  # non-8-bit input: per-band 2-98 percentile stretch, or "none" (clip)
    gsd: float | None = None  # metres per pixel to predict at; None: the raster's own
    bands: list[int] | None = None  # 1-based bands to read; None: 1..in_chans
    min_area_m2: float = 0.0  # footprints smaller than this ground area are dropped
    regularize: bool = False  # right-angle footprints (buildingregulariser)


def predict_geotiff(
    segmenter: Segmenter,
    src_path: str | Path,
    mask_path: str | Path,
    footprints_path: str | Path | None = None,
    settings: GeoTiffSettings | None = None,
    *,
    margin: int = 64,
    progress: bool = False,
    **overrides: Any,
) -> GeoResult:
    """Predict a raster block by block into a mask COG on the raster's own grid, and footprints.

    ``gsd`` (metres per pixel): each block is read resampled to it, predicted, and the
    probabilities are resampled back to the raster's pixels, so a model trained at 0.5 m
    applies to 0.3 m imagery. ``bands``: the 1-based bands to read (default 1..in_chans).
    ``simplify``: tolerance in CRS units (None: one pixel; 0: exact pixel outlines).
    """
    import cv2
    from rasterio.windows import Window
    from tqdm import tqdm

    settings = replace(settings or GeoTiffSettings(), **overrides)  # e.g. block=128 from a test or a script
    block, simplify, stretch, gsd = settings.block, settings.simplify, settings.stretch, settings.gsd
    bands, min_area_m2, regularize = settings.bands, settings.min_area_m2, settings.regularize
    src_path = src_path if is_remote(src_path) else Path(src_path)
    src_name = location_name(src_path)
    mask_path = Path(mask_path)
    if footprints_path is not None:
        footprints_path = check_footprint_path(footprints_path)
    bands = list(bands) if bands else list(range(1, segmenter.in_chans + 1))
    if len(bands) != segmenter.in_chans:
        raise BuildsegError(f"--bands {','.join(map(str, bands))} gives {len(bands)} channels but the model expects "
                            f"{segmenter.in_chans}")
    rasterio = require_rasterio()
    with open_raster(src_path) as src:
        check_bands(src, bands, src_path)
        if src.crs is None:
            warnings.warn(f"{src_path} has no CRS: the mask keeps its pixel grid and polygons are in pixel coordinates", stacklevel=2)
        grid = scene_grid(src, gsd, src_path)
        if grid.resampled:
            log.info("predicting %s at %g m per pixel (resampled x%.3g), written back on its own grid", src_path.name,
                     gsd, 1 / grid.step_x)
        profile = dict(driver="GTiff", height=src.height, width=src.width, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform, compress="deflate", tiled=True, blockxsize=256, blockysize=256)
        scaling = raster_stretch(src, bands, stretch)
        rules = segmenter.rules
        inner, border = [], []
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = mask_path.with_name(f".{mask_path.name}.tmp")
        blocks = [(y, x) for y in range(0, src.height, block) for x in range(0, src.width, block)]
        try:
            with rasterio.open(tmp, "w", **profile) as dst:
                for y, x in tqdm(blocks, desc=src_name, unit="block", disable=not progress or len(blocks) < 2):
                    h, w = min(block, src.height - y), min(block, src.width - x)
                    size = (h + 2 * margin, w + 2 * margin)
                    rows, cols = max(1, round(size[0] / grid.step_y)), max(1, round(size[1] / grid.step_x))
                    image, valid = read_window(src, bands, grid, (y - margin) / grid.step_y, (x - margin) / grid.step_x,
                                               rows, cols, scaling, fill_is_nodata=False)
                    maps = segmenter.probabilities(image).mean[0]  # (K, h, w): the footprint, then e.g. the contact zone
                    if grid.resampled:
                        maps = np.stack([cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for m in maps])
                        valid = cv2.resize(valid.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0
                    centre = (slice(margin, margin + h), slice(margin, margin + w))
                    maps = np.ascontiguousarray(maps[(slice(None), *centre)])
                    prob = maps[0]
                    mask = rules(maps)
                    mask[~valid[centre]] = 0
                    window = Window(x, y, w, h)
                    dst.write(mask[None], window=window)
                    if footprints_path is not None:
                        block_inner, block_border = block_parts(mask, prob, src.window_transform(window))
                        inner += block_inner
                        border += block_border
            to_cog(tmp, mask_path)
        finally:
            tmp.unlink(missing_ok=True)
        crs, unit = src.crs, metres_per_unit(src.crs)
        pixel = abs(src.transform.a)
    frame = None
    if footprints_path is not None:
        parts = inner + join_border_parts(border)
        options = FootprintOptions(min_area_m2, simplify, regularize)
        frame = clean_footprints(parts, crs, pixel, unit, options, src_name)
        write_footprints(frame, footprints_path)
    area_unit = "m^2" if unit else ("px^2" if crs is None else None)
    return GeoResult(mask_path, footprints_path, 0 if frame is None else len(frame),
                     crs.to_string() if crs else None, area_unit, frame)
