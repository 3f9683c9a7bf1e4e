"""Map an area straight from a tile service: ``predict --data https://host/{z}/{x}/{y}.png
--aoi area.gpkg --out DIR``.

The area of interest (any vector file, any CRS) is read first; the zoom is ``--zoom`` or the one
whose ground pixel size at the AOI's latitude is closest to the model's training GSD (printed);
GDAL reads the tiles (formats/tile_services.py: its TMS driver, its retries, its disk cache under
``--tile-cache``, buildseg's user agent, at most ``--max-connections`` at once) through a VRT of
the AOI's tiles, which the GeoTIFF pipeline predicts block by block like any scene, at the
zoom's own pixels. ``DIR`` gets ``mask.tif`` (the COG on the tiles' Web Mercator grid),
``footprints.<format>`` (buildings whose centroid lies in the AOI: a building on the AOI's edge
is kept whole, not cut) and ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from buildseg import __version__
from buildseg.atomic import atomic_open
from buildseg.errors import BuildsegError
from buildseg.formats import tile_services
from buildseg.runtime import user_cache_dir

log = logging.getLogger("buildseg")


def read_aoi(path: str | Path):
    """(the AOI as one geometry in EPSG:3857, its centroid's latitude)."""
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
    area = frame.to_crs("EPSG:3857").geometry.union_all()
    latitude = frame.to_crs("EPSG:4326").geometry.union_all().centroid.y
    return area, float(latitude)


def public_url(template: str) -> str:
    """The template without credentials (user:password@, key=... query values) for logs and files."""
    url = re.sub(r"//[^/@]+@", "//", template)
    return re.sub(r"([?&](?:key|token|access_token|apikey|api_key)=)[^&]*", r"\1***", url, flags=re.I)


def predict_service(segmenter, settings, geo_settings) -> tuple[Any, dict[str, Any]]:
    """(the GeoTIFF job's result for the AOI, the run's summary)."""
    from buildseg.footprints.writers import write_footprints
    from buildseg.inference.jobs.conflate import read_layer
    from buildseg.inference.jobs.geotiff import predict_geotiff

    aoi, latitude = read_aoi(settings.aoi)
    gsd = float(segmenter.input.get("gsd") or 0.5)
    zoom = settings.zoom if settings.zoom is not None else tile_services.zoom_for_gsd(gsd, latitude)
    tile_services.check_zoom(zoom)
    ground = tile_services.EQUATOR_M_PER_PX_Z0 / 2**zoom * math.cos(math.radians(latitude))
    log.info("tile service at zoom %d: %.2f m per pixel at latitude %.2f (the model was trained at %g m)", zoom, ground,
             latitude, gsd)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    service = out / "service.xml"
    service.write_text(tile_services.service_xml(
        settings.data, zoom=zoom, tms=settings.tms, cache_dir=settings.tile_cache or user_cache_dir("tiles"),
        user_agent=f"buildseg/{__version__}", max_connections=settings.max_connections))
    vrt = out / "aoi.vrt"
    vrt.write_text(tile_services.aoi_vrt(service, aoi.bounds, zoom))
    layer = out / f"footprints.{settings.format or 'gpkg'}"
    result = predict_geotiff(segmenter, vrt, out / "mask.tif", layer, replace(geo_settings, gsd=None),
                             progress=settings.progress)
    frame = read_layer(layer)
    inside = frame[frame.geometry.centroid.within(aoi)] if len(frame) else frame
    write_footprints(inside, layer)
    result = replace(result, n_polygons=len(inside), footprints=inside)
    summary = {"zoom": zoom, "gsd_m": round(ground, 3), "service": public_url(settings.data), "aoi": str(settings.aoi),
               "n_footprints": len(inside), "mask": "mask.tif", "footprints": layer.name}
    with atomic_open(out / "manifest.json", "w") as handle:
        handle.write(json.dumps(summary, indent=1))
    return result, summary
