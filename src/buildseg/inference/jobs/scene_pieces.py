"""One large scene shared out over several workers: pieces of whole blocks, then one assembly.

A 50,000 x 50,000 px scene is 600 blocks of 2048 px; on one worker it stalls the job while
the rest idle. The Ray runner cuts a scene above a size threshold into :class:`Piece`\\ s:
rectangles of whole blocks of the scene's own block grid. Each piece is predicted by
whichever worker is free (``geotiff.predict_blocks``, the same function the one-process path
runs), its mask written to a piece GeoTIFF under ``OUT_DIR/.buildseg-pieces/`` and its blocks'
footprint parts returned. When every piece is in, :func:`assemble_scene` copies the pieces
into the scene's mask COG and joins the parts in block order, as the one-process path does,
so the outputs are the same whichever worker predicted which piece (tests/test_ray_runner.py).

Pieces follow block borders because a block's pixels depend only on its own window and
margin: a piece boundary is a block boundary that the join already handles, and nothing is
predicted twice.

A piece can also be a scene of its own (a :class:`SceneSource` with a ``window``: how a tile
service's area of interest is shared out): :func:`predict_piece_scene` writes its mask COG,
clipped to the scene's area, and its blocks' raw parts to ``NAME_parts.parquet``
(:func:`write_parts`); the many-scene merge joins the parts of all the pieces of one raster
(:func:`read_parts`, ``geotiff.join_blocks``) exactly as one process would have.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from buildseg.atomic import atomic_path
from buildseg.data.scene_sources import SceneSource
from buildseg.footprints.polygons import Part
from buildseg.footprints.writers import to_cog
from buildseg.formats.rasters import require_rasterio
from buildseg.formats.tile_services import prepare_service_reads
from buildseg.inference.core.segmenter import Segmenter
from buildseg.inference.jobs.geotiff import (
    BlockParts,
    GeoResult,
    GeoTiffSettings,
    ScenePlan,
    footprint_layer,
    gap_bounds,
    geo_result,
    plan_scene,
    predict_blocks,
)

PARTS = "_parts.parquet"  # a piece scene's raw footprint parts: NAME_parts.parquet

PIECES = ".buildseg-pieces"  # OUT_DIR/.buildseg-pieces/<scene name>/<k>.tif while a split scene is in flight


@dataclass(frozen=True)
class Piece:
    """A rectangle of whole blocks of one scene, in scene pixels."""

    k: int  # its number within the scene
    row: int
    col: int
    height: int
    width: int
    blocks: tuple[tuple[int, int], ...]  # (row, col) of its blocks, row-major


def piece_side(plan: ScenePlan, piece_pixels: int) -> int:
    """A piece's side in pixels: the whole blocks that fit in ``piece_pixels`` (at least one)."""
    return plan.block * max(1, int(math.isqrt(max(1, piece_pixels)) // plan.block))


def split_scene(plan: ScenePlan, piece_pixels: int) -> list[Piece]:
    """The scene cut into pieces of about ``piece_pixels`` pixels (whole blocks), row-major."""
    side = piece_side(plan, piece_pixels)
    pieces = []
    for row in range(0, plan.height, side):
        for col in range(0, plan.width, side):
            height, width = min(side, plan.height - row), min(side, plan.width - col)
            blocks = tuple((y, x) for y, x in plan.blocks() if row <= y < row + height and col <= x < col + width)
            pieces.append(Piece(len(pieces), row, col, height, width, blocks))
    return pieces


def pieces_folder(out_dir: Path, plan: ScenePlan) -> Path:
    return out_dir / PIECES / Path(plan.name).stem


@dataclass
class PieceResult:
    piece: Piece
    path: Path  # the piece's mask GeoTIFF
    parts: list[BlockParts]
    seconds: float


def predict_piece(segmenter: Segmenter, plan: ScenePlan, piece: Piece, out_dir: Path, *,
                  footprints: bool = True) -> PieceResult:
    """Predict one piece into its own GeoTIFF (written atomically: a worker killed mid-piece
    leaves nothing that the retry could mistake for a result)."""
    from rasterio.windows import Window

    started = time.monotonic()
    rasterio = require_rasterio()
    path = pieces_folder(out_dir, plan) / f"{piece.k}.tif"
    transform = rasterio.windows.transform(Window(piece.col, piece.row, piece.width, piece.height), plan.transform)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **plan.mask_profile(height=piece.height, width=piece.width,
                                                          transform=transform)) as dst:
            parts = predict_blocks(segmenter, plan, list(piece.blocks), dst, origin=(piece.row, piece.col),
                                   footprints=footprints)
    return PieceResult(piece, path, parts, time.monotonic() - started)


def assemble_scene(plan: ScenePlan, results: list[PieceResult], mask_path: Path, footprints_path: Path | None,
                   settings: GeoTiffSettings) -> GeoResult:
    """The scene's mask COG and footprint layer from all its pieces; the piece files removed."""
    from rasterio.windows import Window

    rasterio = require_rasterio()
    expected = {b for r in results for b in r.piece.blocks}
    if expected != set(plan.blocks()):
        raise ValueError(f"{plan.name}: {len(set(plan.blocks()) - expected)} blocks have no piece")
    tmp = mask_path.with_name(f".{mask_path.name}.tmp")
    try:
        with rasterio.open(tmp, "w", **plan.mask_profile(height=plan.height, width=plan.width,
                                                          transform=plan.transform)) as dst:
            for result in results:
                piece = result.piece
                with rasterio.open(result.path) as part:
                    for y, x in piece.blocks:  # block by block: memory stays at one block
                        h, w = plan.block_shape(y, x)
                        block = part.read(1, window=Window(x - piece.col, y - piece.row, w, h))
                        dst.write(block[None], window=Window(x, y, w, h))
        to_cog(tmp, mask_path)
    finally:
        tmp.unlink(missing_ok=True)
    frame = None
    if footprints_path is not None:
        frame = footprint_layer(plan, [p for r in results for p in r.parts], settings, footprints_path)
    if results:
        shutil.rmtree(results[0].path.parent, ignore_errors=True)
    return geo_result(plan, mask_path, footprints_path, frame)


def write_parts(parts: list[BlockParts], crs, path: Path) -> None:
    """Blocks' raw parts as GeoParquet (block, inner or border, order within the block, the
    probability sum and pixel count the join needs), written atomically."""
    import geopandas as gpd

    rows = [(p.y, p.x, border, seq, q.prob_sum, q.pixels, q.polygon)
            for p in parts for border, items in ((False, p.inner), (True, p.border)) for seq, q in enumerate(items)]
    columns = ["y", "x", "border", "seq", "prob_sum", "pixels", "geometry"]
    frame = gpd.GeoDataFrame(dict(zip(columns, zip(*rows))) if rows else {c: [] for c in columns}, crs=crs)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp)


def read_parts(path: Path) -> list[BlockParts]:
    """:func:`write_parts`' blocks back, in block order."""
    import geopandas as gpd

    frame = gpd.read_parquet(path).sort_values(["y", "x", "border", "seq"], kind="stable")
    blocks: dict[tuple[int, int], BlockParts] = {}
    for y, x, border, polygon, prob_sum, pixels in zip(frame["y"], frame["x"], frame["border"], frame.geometry,
                                                       frame["prob_sum"], frame["pixels"]):
        block = blocks.setdefault((int(y), int(x)), BlockParts(int(y), int(x), [], []))
        (block.border if border else block.inner).append(Part(polygon, float(prob_sum), int(pixels)))
    return list(blocks.values())


def clip_mask(path: Path, clip: str | Path) -> None:
    """Zero the mask outside the area of ``clip`` (a vector file; pixel centres decide)."""
    import geopandas as gpd
    from rasterio.features import geometry_mask

    rasterio = require_rasterio()
    with rasterio.open(path, "r+") as dst:
        area = gpd.read_file(clip).to_crs(dst.crs).geometry
        outside = geometry_mask(list(area), out_shape=(dst.height, dst.width), transform=dst.transform)
        mask = dst.read(1)
        mask[outside] = 0
        dst.write(mask[None])


def predict_piece_scene(segmenter: Segmenter, scene: SceneSource, mask_path: Path, parts_path: Path,
                        settings: GeoTiffSettings, *, progress: bool = False) -> GeoResult:
    """A piece scene: its window's blocks (with context from the whole raster) into a mask COG
    clipped to ``scene.clip``, and their raw parts into ``parts_path`` for the merge's join."""
    from rasterio.windows import Window

    rasterio = require_rasterio()
    plan = plan_scene(segmenter, scene.location, settings)
    row, col, height, width = scene.window
    if row % plan.block or col % plan.block or row + height > plan.height or col + width > plan.width:
        raise ValueError(f"{scene.name}: the window {scene.window} is not whole blocks of {plan.name}")
    blocks = [(y, x) for y, x in plan.blocks() if row <= y < row + height and col <= x < col + width]
    transform = rasterio.windows.transform(Window(col, row, width, height), plan.transform)
    tmp, gaps = mask_path.with_name(f".{mask_path.name}.tmp"), []
    prepare_service_reads()
    try:
        with rasterio.open(tmp, "w", **plan.mask_profile(height=height, width=width, transform=transform)) as dst:
            parts = predict_blocks(segmenter, plan, blocks, dst, origin=(row, col), progress=progress, gaps=gaps)
        if scene.clip:
            clip_mask(tmp, scene.clip)
        to_cog(tmp, mask_path)
    finally:
        tmp.unlink(missing_ok=True)
    write_parts(parts, plan.crs, parts_path)
    result = geo_result(plan, mask_path, parts_path, None)
    result.n_polygons = sum(len(p.inner) + len(p.border) for p in parts)
    result.gaps = gap_bounds(plan, gaps)
    return result
