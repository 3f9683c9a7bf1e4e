"""Map an area straight from a tile service: ``predict --data https://host/{z}/{x}/{y}.png
--aoi area.gpkg --out DIR``.

The area of interest (any vector file, any CRS; one or many polygons) is read first; the zoom
is ``--zoom`` or the one whose ground pixel size at the AOI's latitude is closest to the
model's training GSD (printed). GDAL reads the tiles (``formats/tile_services.py``: its TMS
driver, its retries, its disk cache under ``--tile-cache``, buildseg's user agent, at most
``--max-connections`` at once) through ``DIR/aoi.vrt``, a window of the service over the AOI
snapped to whole tiles. The model sees the zoom's own pixels (within a factor of 1.41 of the
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

import json
import logging
import math
from pathlib import Path

from buildseg import __version__
from buildseg.data.scene_sources import SceneSource
from buildseg.errors import BuildsegError
from buildseg.formats import tile_services
from buildseg.formats.tile_services import public_url
from buildseg.runtime import user_cache_dir

log = logging.getLogger("buildseg")

AREA = "aoi"  # the area's group name: DIR/aoi.vrt, DIR/aoi_r<row>_c<col>_mask.tif, DIR/aoi_mask.vrt, DIR/aoi.json
DEFAULT_GSD = 0.5  # metres per pixel when the model does not say what it was trained at


def read_aoi(path: str | Path):
    """The AOI's polygons (a GeoSeries in their own CRS)."""
    import geopandas as gpd

    try:
        frame = gpd.read_file(path, engine="pyogrio")
    except Exception as exc:  # pyogrio's own errors
        raise BuildsegError(f"--aoi {path}: cannot read it as a vector layer ({str(exc).splitlines()[0][:200]})") from None
    if frame.crs is None:
        raise BuildsegError(f"--aoi {path} has no CRS: set one (e.g. ogr2ogr -a_srs EPSG:4326)")
    frame = frame[frame.geometry.notna() & frame.geom_type.isin(["Polygon", "MultiPolygon"])]
    if frame.empty:
        raise BuildsegError(f"--aoi {path} holds no polygon: draw the area to map as one or more polygons")
    return frame.geometry


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on a change: a piece's done-record holds the VRT's mtime, so an unchanged
    area resumes and a changed one is predicted again."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _service_raster(description: str):
    """(transform, CRS, width, height) of the service raster ``description`` (GDAL XML)."""
    with tile_services.open_description(description) as src:
        return src.transform, src.crs, src.width, src.height


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


def _description(settings, *, gsd: float, latitude: float) -> tuple[str, int]:
    """(GDAL's description of the service at the chosen zoom, the zoom)."""
    kind = tile_services.service_kind(settings.data)
    polite = dict(cache_dir=settings.tile_cache or user_cache_dir("tiles"), user_agent=f"buildseg/{__version__}",
                  max_connections=settings.max_connections)
    if kind == "wmts":
        crs, levels = tile_services.wmts_levels(tile_services.wmts_xml(settings.data, layer=settings.layer, zoom=None,
                                                                       **polite), settings.data)
        zoom = settings.zoom if settings.zoom is not None else min(
            range(len(levels)), key=lambda k: abs(math.log(tile_services.ground_size(levels[k], crs, latitude) / gsd)))
        tile_services.check_zoom(zoom, len(levels) - 1)
        return tile_services.wmts_xml(settings.data, layer=settings.layer, zoom=zoom, **polite), zoom
    zoom = settings.zoom if settings.zoom is not None else tile_services.zoom_for_gsd(gsd, latitude)
    if kind == "wms":
        zoom = min(zoom, tile_services.MAX_WMS_ZOOM) if settings.zoom is None else zoom
        tile_services.check_zoom(zoom, tile_services.MAX_WMS_ZOOM)
        return tile_services.wms_xml(settings.data, layer=settings.layer, zoom=zoom, **polite), zoom
    tile_services.check_zoom(zoom)
    return tile_services.service_xml(settings.data, zoom=zoom, tms=settings.tms, **polite), zoom


def plan_area(settings, *, trained_gsd: float | None) -> tuple[list[SceneSource], dict]:
    """(the AOI's pieces as scenes of a many-scene run, what ``aoi.json`` says); writes
    ``DIR/service.xml``, ``aoi.vrt``, ``aoi_area.geojson`` (the AOI in EPSG:4326) and
    ``aoi.json`` once everything checks out."""
    aoi = read_aoi(settings.aoi)
    latitude = float(aoi.to_crs("EPSG:4326").union_all().centroid.y)
    gsd = settings.gsd or trained_gsd or DEFAULT_GSD
    description, zoom = _description(settings, gsd=gsd, latitude=latitude)
    transform, crs, width, height = _service_raster(description)
    area = aoi.to_crs(crs).union_all()
    bounds = area.bounds
    # XYZ and WMS grids start at a tile corner: whole tiles; a WMTS raster starts at its layer's bounding box, not
    # at a tile corner: whole pixels (GDAL fetches the tiles the window touches)
    snap = 1 if tile_services.service_kind(settings.data) == "wmts" else tile_services.TILE
    window = None if not all(map(math.isfinite, bounds)) else tile_services.snap_window(
        bounds, transform, block=snap, width=width, height=height)
    if window is None:
        raise BuildsegError(f"--aoi {settings.aoi} lies outside the service's extent ({crs}): check the AOI's CRS "
                            "and coordinates")
    ground = tile_services.ground_size(abs(transform.a), crs, latitude)
    pieces = _pieces(window, transform @ _offset(window), area, block=settings.block,
                     piece_pixels=int(settings.piece_megapixels * 1e6))
    log.info("%s service at zoom %d: %.2f m per pixel at latitude %.2f (the model was trained at %g m); %d x %d px "
             "in %d piece(s)", tile_services.service_kind(settings.data), zoom, ground, latitude, gsd, window[2],
             window[3], len(pieces))
    out = Path(settings.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _write_if_changed(out / "service.xml", description)
    _write_if_changed(out / f"{AREA}.vrt", tile_services.window_vrt("service.xml", window, transform, crs.to_wkt()))
    _write_if_changed(out / f"{AREA}_area.geojson", aoi.to_crs("EPSG:4326").to_json(drop_id=True))
    about = {"service": public_url(settings.data), "kind": tile_services.service_kind(settings.data), "zoom": zoom,
             "gsd_m": round(ground, 3), "aoi": str(settings.aoi), "window_px": list(window)}
    _write_if_changed(out / f"{AREA}.json", json.dumps(about, indent=1))
    scenes = [SceneSource(str(out / f"{AREA}.vrt"), f"{AREA}_r{row}_c{col}", window=(row, col, h, w),
                          clip=str(out / f"{AREA}_area.geojson"), group=AREA) for row, col, h, w in pieces]
    return scenes, about


def _offset(window: tuple[int, int, int, int]):
    from affine import Affine

    return Affine.translation(window[0], window[1])
