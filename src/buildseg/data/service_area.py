"""An area of interest of an imagery service as a raster on disk: what ``predict`` maps and
``train`` learns from when ``--data`` is an XYZ/TMS template, a WMTS or a WMS.

:func:`prepare_area` reads the AOI (any vector file, any CRS; one or many polygons), picks the
zoom (``zoom``, else the one whose ground pixel size at the AOI's latitude is closest to
``gsd``), writes GDAL's description of the service (``formats/tile_services.py``: GDAL
fetches, retries and caches, with buildseg's user agent and a connection limit) and a VRT of
the AOI's window of it into a folder. The VRT is then an ordinary scene: the GeoTIFF
pipeline predicts it, the GeoTIFF training reads windows of it. Every check (the AOI, the
template, the zoom, the service's extent, a WMTS's layers) comes before anything is written.

Files, in ``folder``: ``service.xml``, ``aoi.vrt``, ``aoi_area.geojson`` (the AOI in
EPSG:4326) and ``aoi.json`` (the service without credentials, its kind, the zoom, the pixel
size on the ground, the window). Each is rewritten only when it changes: a done-record holds
the VRT's mtime, so an unchanged area resumes and a changed one is redone.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from buildseg.atomic import atomic_open
from buildseg.errors import BuildsegError
from buildseg.formats import tile_services
from buildseg.formats.tile_services import public_url
from buildseg.runtime import user_cache_dir
from buildseg.settings.predict import MAX_CONNECTIONS, MAX_TILES

log = logging.getLogger("buildseg")

AREA = "aoi"  # the files' stem: aoi.vrt, aoi_area.geojson, aoi.json
DEFAULT_GSD = 0.5  # metres per pixel when neither the user nor the model says


@dataclass(frozen=True)
class ServiceOptions:
    """How to read a service: the flags ``predict`` and ``train`` share (their defaults are
    the settings' own)."""

    zoom: int | None = None
    layer: str | None = None
    tms: bool = False
    tile_cache: str | None = None
    max_connections: int = MAX_CONNECTIONS
    max_tiles: int = MAX_TILES
    allow_gaps: bool = False  # predict's --allow-gaps: tiles the service lacks are gaps, also when probed

    @classmethod
    def of(cls, settings) -> "ServiceOptions":
        """From any settings object with these names (predict's and adapt's flags, train's data section)."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__ if hasattr(settings, name)})


@dataclass(frozen=True)
class ServiceArea:
    vrt: Path  # the AOI's window of the service, at the zoom's pixels
    window: tuple[int, int, int, int]  # (col, row, width, height) of the service raster
    transform: object  # the VRT's affine transform
    crs: object
    area: object  # the AOI (shapely, in the VRT's CRS)
    clip: Path  # aoi_area.geojson
    about: dict  # what aoi.json says


def read_aoi(path: str | Path):
    """The AOI's polygons (a GeoSeries in their own CRS)."""
    from buildseg.formats.vectors import read_area

    return read_area(path, flag="--aoi", what="the area to map").geometry


def _write_if_changed(path: Path, text: str) -> None:
    """Atomically: under torchrun every rank prepares the same area, and one may read while
    another writes."""
    if not path.is_file() or path.read_text() != text:
        with atomic_open(path, "w") as handle:
            handle.write(text)


def _description(data: str, options: ServiceOptions, *, gsd: float, latitude: float) -> tuple[str, int]:
    """(GDAL's description of the service at the chosen zoom, the zoom)."""
    kind = tile_services.service_kind(data)
    polite = dict(cache_dir=options.tile_cache or user_cache_dir("tiles"), user_agent=tile_services.user_agent(),
                  max_connections=options.max_connections)
    if kind == "wmts":
        crs, levels = tile_services.wmts_levels(tile_services.wmts_xml(data, layer=options.layer, zoom=None, **polite),
                                                data)
        zoom = options.zoom if options.zoom is not None else min(
            range(len(levels)), key=lambda k: abs(math.log(tile_services.ground_size(levels[k], crs, latitude) / gsd)))
        tile_services.check_zoom(zoom, len(levels) - 1)
        return tile_services.wmts_xml(data, layer=options.layer, zoom=zoom, **polite), zoom
    zoom = options.zoom if options.zoom is not None else tile_services.zoom_for_gsd(gsd, latitude)
    if kind == "wms":
        zoom = min(zoom, tile_services.MAX_WMS_ZOOM) if options.zoom is None else zoom
        tile_services.check_zoom(zoom, tile_services.MAX_WMS_ZOOM)
        return tile_services.wms_xml(data, layer=options.layer or "", zoom=zoom, **polite), zoom
    tile_services.check_template(data)
    tile_services.check_zoom(zoom)
    return tile_services.service_xml(data, zoom=zoom, tms=options.tms, **polite), zoom


def check_size(window: tuple[int, int, int, int], *, aoi_path, zoom: int, ground: float, most: int) -> None:
    """An AOI whose window covers more than ``most`` 256 px tiles is one line with what would
    fit (a smaller area, a coarser zoom, or ``--max-tiles``), before any file or request."""
    tile = tile_services.TILE
    tiles = math.ceil(window[2] / tile) * math.ceil(window[3] / tile)
    if tiles <= most:
        return
    coarser = zoom - math.ceil(math.log(tiles / most, 4))
    fits_km2 = most * (tile * ground) ** 2 / 1e6
    raise BuildsegError(f"--aoi {aoi_path} covers {tiles:,} tiles ({window[2] * window[3] / 1e9:,.1f} Gpx) at zoom {zoom} "
                        f"({ground:.2f} m per pixel), more than --max-tiles {most:,}: map a smaller area (about "
                        f"{fits_km2:,.0f} km2 fit at this zoom), choose --zoom {max(0, coarser)} "
                        f"({ground * 2 ** (zoom - max(0, coarser)):.1f} m per pixel), or raise --max-tiles")


def probe_points(area, window: tuple[int, int, int, int], transform, most: int = 5) -> list[tuple[int, int]]:
    """Up to ``most`` XYZ tiles (x, y from the north) over the AOI to probe: a point inside it,
    then the centres of the window's quarters that the AOI touches."""
    from shapely.geometry import Point

    col, row, width, height = window
    inverse = ~transform
    points = [area.representative_point()]
    for fy in (0.25, 0.75):
        for fx in (0.25, 0.75):
            points.append(Point(*(transform @ (col + fx * width, row + fy * height))))
    tiles = []
    for point in points:
        if point is not points[0] and not area.buffer(tile_services.TILE * abs(transform.a)).contains(point):
            continue
        c, r = inverse @ (point.x, point.y)
        key = (int(c) // tile_services.TILE, int(r) // tile_services.TILE)
        if key not in tiles:
            tiles.append(key)
    return tiles[:most]


def prepare_area(data: str, aoi_path: str | Path, folder: str | Path, *, gsd: float | None,
                 options: ServiceOptions = ServiceOptions()) -> ServiceArea:
    """Check the service and the AOI, then write the area's files into ``folder``."""
    from affine import Affine

    if options.tile_cache and Path(options.tile_cache).exists() and not Path(options.tile_cache).is_dir():
        raise BuildsegError(f"--tile-cache {options.tile_cache} is a file; GDAL's tile cache is a folder: name a folder "
                            "(it is created when missing)")
    aoi = read_aoi(aoi_path)
    latitude = float(aoi.to_crs("EPSG:4326").union_all().centroid.y)
    gsd = gsd or DEFAULT_GSD
    description, zoom = _description(data, options, gsd=gsd, latitude=latitude)
    with tile_services.open_description(description) as src:
        transform, crs, width, height = src.transform, src.crs, src.width, src.height
    area = aoi.to_crs(crs).union_all()
    # XYZ and WMS grids start at a tile corner: whole tiles; a WMTS raster starts at its layer's bounding box, not
    # at a tile corner: whole pixels (GDAL fetches the tiles the window touches)
    snap = 1 if tile_services.service_kind(data) == "wmts" else tile_services.TILE
    window = None if not all(map(math.isfinite, area.bounds)) else tile_services.snap_window(
        area.bounds, transform, block=snap, width=width, height=height)
    if window is None:
        raise BuildsegError(f"--aoi {aoi_path} lies outside the service's extent ({crs}): check the AOI's CRS and "
                            "coordinates")
    ground = tile_services.ground_size(abs(transform.a), crs, latitude)
    check_size(window, aoi_path=aoi_path, zoom=zoom, ground=ground, most=options.max_tiles)
    log.info("%s service at zoom %d: %.2f m per pixel at latitude %.2f (for %g m); %d x %d px",
             tile_services.service_kind(data), zoom, ground, latitude, gsd, window[2], window[3])
    if tile_services.service_kind(data) == "xyz":
        tile_services.probe_tiles(data, zoom=zoom, tiles=probe_points(area, window, transform), tms=options.tms,
                                  allow_gaps=options.allow_gaps)
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _write_if_changed(folder / "service.xml", description)
    _write_if_changed(folder / f"{AREA}.vrt", tile_services.window_vrt("service.xml", window, transform, crs.to_wkt()))
    _write_if_changed(folder / f"{AREA}_area.geojson", aoi.to_crs("EPSG:4326").to_json(drop_id=True))
    about = {"service": public_url(data), "kind": tile_services.service_kind(data), "zoom": zoom,
             "gsd_m": round(ground, 3), "aoi": str(aoi_path), "window_px": list(window)}
    _write_if_changed(folder / f"{AREA}.json", json.dumps(about, indent=1))
    vrt_transform = transform @ Affine.translation(window[0], window[1])
    return ServiceArea(folder / f"{AREA}.vrt", window, vrt_transform, crs, area, folder / f"{AREA}_area.geojson", about)
