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
from buildseg.settings.predict import MAX_CONNECTIONS

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

    @classmethod
    def of(cls, settings) -> "ServiceOptions":
        """From any settings object with these names (predict's and adapt's flags, train's data section)."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


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


def prepare_area(data: str, aoi_path: str | Path, folder: str | Path, *, gsd: float | None,
                 options: ServiceOptions = ServiceOptions()) -> ServiceArea:
    """Check the service and the AOI, then write the area's files into ``folder``."""
    from affine import Affine

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
    log.info("%s service at zoom %d: %.2f m per pixel at latitude %.2f (for %g m); %d x %d px",
             tile_services.service_kind(data), zoom, ground, latitude, gsd, window[2], window[3])
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
