"""Map an area straight from a tile service: ``predict --data https://host/{z}/{x}/{y}.png
--aoi area.gpkg --out DIR``.

The area of interest (any vector file, any CRS; one or many polygons) is read first; the zoom
is ``--zoom`` or the one whose ground pixel size at the AOI's latitude is closest to the
model's training GSD (printed). GDAL reads the tiles (``formats/tile_services.py``: its TMS
driver, its retries, its disk cache under ``--tile-cache``, buildseg's user agent, at most
``--max-connections`` at once) through ``DIR/aoi.vrt``, a window of the service over the AOI
snapped to whole tiles (``data/service_area.py``). The model sees the zoom's own pixels (within a factor of 1.41 of the
GSD it was trained at; ``--gsd`` chooses the zoom): resampling would make GDAL fetch tiles
beyond the AOI for its kernels.

The area is then a many-scene run (``jobs/scenes.py``): the VRT is cut into pieces of whole
blocks of about ``--piece-megapixels`` (those that touch the AOI), each a scene with a done-
record, so a killed run resumes, ``--shard I/N`` shares the pieces over array jobs,
``--runner ray`` over a pool and ``--merge DIR`` merges. Each piece is predicted with context
from its neighbours and its buildings are joined across piece borders at the merge, so the
layer is the same whichever runner and piece size made it, and the same as predicting the
mosaic as one GeoTIFF. ``DIR`` gets the pieces' mask COGs (zero outside the AOI) and their
mosaic ``aoi_mask.vrt``, ``footprints.<format>`` (buildings whose centroid lies in the AOI: a
building on the AOI's edge is kept whole, not cut) and ``manifest.json`` (with the zoom, the
pixel size and the service's URL without credentials under ``areas``).
"""

from __future__ import annotations

import math

from buildseg.data.scene_sources import SceneSource
from buildseg.data.service_area import AREA, ServiceOptions, prepare_area


def _pieces(window: tuple[int, int, int, int], transform, area, *, block: int, piece_pixels: int):
    """(row, col, height, width) of the VRT's pieces of whole blocks that touch the AOI
    (``area`` in the service's CRS), grown by one block so a building on a piece's edge
    is whole."""
    from shapely.geometry import box

    _, _, width, height = window
    side = block * max(1, math.isqrt(max(1, piece_pixels)) // block)
    grown = area.buffer(block * abs(transform.a))
    pieces = []
    for row in range(0, height, side):
        for col in range(0, width, side):
            h, w = min(side, height - row), min(side, width - col)
            (x0, y0), (x1, y1) = transform @ (col, row), transform @ (col + w, row + h)
            if grown.intersects(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))):
                pieces.append((row, col, h, w))
    return pieces


def plan_area(settings, *, trained_gsd: float | None) -> tuple[list[SceneSource], dict]:
    """(the AOI's pieces as scenes of a many-scene run, what ``aoi.json`` says); writes the
    area's files into ``--out`` once everything checks out (``data/service_area.py``)."""
    area = prepare_area(settings.data, settings.aoi, settings.out, gsd=settings.gsd or trained_gsd,
                        options=ServiceOptions.of(settings))
    pieces = _pieces(area.window, area.transform, area.area, block=settings.block,
                     piece_pixels=int(settings.piece_megapixels * 1e6))
    scenes = [SceneSource(str(area.vrt), f"{AREA}_r{row}_c{col}", window=(row, col, h, w), clip=str(area.clip),
                          group=AREA) for row, col, h, w in pieces]
    return scenes, area.about
