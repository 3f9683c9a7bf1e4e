"""XYZ/TMS tile services as rasters GDAL reads: no hand-written tile client.

A URL template (``https://host/{z}/{x}/{y}.png``; ``{-y}`` or ``tms=True`` for TMS row order)
becomes a GDAL WMS service description (the TMS mini-driver: GDAL fetches, retries and caches
the tiles, with buildseg's user agent and a connection limit), and an area of interest becomes
a VRT window of it at one zoom level: a small raster on the Web Mercator grid that the GeoTIFF
pipeline reads block by block like any scene.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from xml.sax.saxutils import escape, unescape

from buildseg.errors import BuildsegError

WORLD = 20037508.342789244  # half the Web Mercator world's side, metres
TILE = 256
MAX_ZOOM = 23
EQUATOR_M_PER_PX_Z0 = 2 * WORLD / TILE  # 156543.03 m per pixel at zoom 0 on the equator
HTTP_RETRIES = 3  # GDAL retries a failed tile request this many times (GDAL_HTTP_MAX_RETRY), 1 s apart and more


def prepare_service_reads() -> None:
    """GDAL's retries for tile requests in this process (the environment's settings win)."""
    import os

    os.environ.setdefault("GDAL_HTTP_MAX_RETRY", str(HTTP_RETRIES))
    os.environ.setdefault("GDAL_HTTP_RETRY_DELAY", "1")


def is_tile_template(text: str) -> bool:
    return bool(re.match(r"^https?://", str(text))) and "{" in str(text) and "}" in str(text)


def check_template(text: str) -> None:
    missing = [k for k in ("{z}", "{x}") if k not in text] + ([] if ("{y}" in text or "{-y}" in text) else ["{y}"])
    if missing:
        raise BuildsegError(f"--data {text}: a tile URL template needs {{z}}, {{x}} and {{y}} (or {{-y}} for TMS row "
                            f"order); it lacks {', '.join(missing)}")


def check_zoom(zoom: int) -> None:
    if not 0 <= zoom <= MAX_ZOOM:
        raise BuildsegError(f"--zoom {zoom} is out of range: tile services have zoom levels 0..{MAX_ZOOM}")


def zoom_for_gsd(gsd: float, latitude: float) -> int:
    """The zoom whose ground pixel size at ``latitude`` is closest to ``gsd`` metres (in log)."""
    ground_z0 = EQUATOR_M_PER_PX_Z0 * math.cos(math.radians(latitude))
    return max(0, min(MAX_ZOOM, round(math.log2(ground_z0 / gsd))))


def service_xml(template: str, *, zoom: int, tms: bool, cache_dir: str | Path | None, user_agent: str,
                max_connections: int, bands: int = 3) -> str:
    """GDAL's WMS description of the service over the whole Web Mercator world at ``zoom``
    (its full resolution: reads at that zoom fetch that zoom's tiles, no overview involved)."""
    flip = tms or "{-y}" in template
    url = template.replace("{z}", "${z}").replace("{x}", "${x}").replace("{-y}", "${y}").replace("{y}", "${y}")
    cache = f"<Cache><Path>{escape(str(cache_dir))}</Path></Cache>" if cache_dir else "<Cache/>"
    return (f"<GDAL_WMS><Service name=\"TMS\"><ServerUrl>{escape(url)}</ServerUrl></Service>"
            f"<DataWindow><UpperLeftX>{-WORLD}</UpperLeftX><UpperLeftY>{WORLD}</UpperLeftY>"
            f"<LowerRightX>{WORLD}</LowerRightX><LowerRightY>{-WORLD}</LowerRightY><TileLevel>{zoom}</TileLevel>"
            f"<TileCountX>1</TileCountX><TileCountY>1</TileCountY><YOrigin>{'bottom' if flip else 'top'}</YOrigin>"
            f"</DataWindow><Projection>EPSG:3857</Projection><BlockSizeX>{TILE}</BlockSizeX><BlockSizeY>{TILE}</BlockSizeY>"
            f"<BandsCount>{bands}</BandsCount><MaxConnections>{max_connections}</MaxConnections>"
            f"<UserAgent>{escape(user_agent)}</UserAgent>{cache}<ZeroBlockHttpCodes>204</ZeroBlockHttpCodes>"
            f"<ZeroBlockOnServerException>false</ZeroBlockOnServerException></GDAL_WMS>")


def snap_window(bounds: tuple[float, float, float, float], transform, *, block: int, width: int,
                height: int) -> tuple[int, int, int, int] | None:
    """(col, row, width, height) of the service raster's pixels covering ``bounds`` (in its
    CRS), snapped outwards to whole ``block`` s (tile requests and blocks line up) and cut to
    the raster; None when they miss it."""
    minx, miny, maxx, maxy = bounds
    inverse = ~transform
    cols, rows = zip(*(inverse @ (x, y) for x in (minx, maxx) for y in (miny, maxy)))
    eps = 1e-6  # an AOI drawn on tile edges must not reach into the next tile by a rounding error
    col0 = max(0, math.floor(min(cols) / block + eps) * block)
    row0 = max(0, math.floor(min(rows) / block + eps) * block)
    col1 = min(width, math.ceil(max(cols) / block - eps) * block)
    row1 = min(height, math.ceil(max(rows) / block - eps) * block)
    if col1 <= col0 or row1 <= row0:
        return None
    return col0, row0, col1 - col0, row1 - row0


def window_vrt(source_name: str, window: tuple[int, int, int, int], transform, crs_wkt: str, bands: int = 3) -> str:
    """A VRT of one window of the service raster described by the file ``source_name`` (beside
    the VRT), at the service's own pixels: a small raster that the GeoTIFF pipeline reads
    block by block like any scene."""
    col, row, width, height = window
    left, top = transform @ (col, row)
    geo = f"{left}, {transform.a}, {transform.b}, {top}, {transform.d}, {transform.e}"
    sources = "".join(
        f"<VRTRasterBand dataType=\"Byte\" band=\"{b}\" blockXSize=\"{TILE}\" blockYSize=\"{TILE}\"><SimpleSource>"
        f"<SourceFilename relativeToVRT=\"1\">{escape(source_name)}</SourceFilename><SourceBand>{b}</SourceBand>"
        f"<SrcRect xOff=\"{col}\" yOff=\"{row}\" xSize=\"{width}\" ySize=\"{height}\"/>"
        f"<DstRect xOff=\"0\" yOff=\"0\" xSize=\"{width}\" ySize=\"{height}\"/></SimpleSource></VRTRasterBand>"
        for b in range(1, bands + 1))
    return (f"<VRTDataset rasterXSize=\"{width}\" rasterYSize=\"{height}\"><SRS>{escape(crs_wkt)}</SRS>"
            f"<GeoTransform>{geo}</GeoTransform>{sources}</VRTDataset>")


def public_url(template: str) -> str:
    """A URL without credentials (user:password@, key=... query values) for logs and files."""
    url = re.sub(r"//[^/@]+@", "//", template)
    return re.sub(r"([?&](?:key|token|access_token|apikey|api_key)=)[^&]*", r"\1***", url, flags=re.I)


def failed_tile(raster: str | Path, detail: str) -> str | None:
    """``"tile z/x/y (HTTP 500): URL"`` when ``detail`` (GDAL's messages) says that a tile of
    the service behind ``raster`` (an area's VRT beside its ``service.xml``) failed to
    download; None for any other read error. The URL comes without credentials."""
    block = re.search(r"Unable to download block (\d+), (\d+)", detail)
    service = Path(str(raster)).with_name("service.xml")
    if not block or not service.is_file():
        return None
    text = service.read_text()
    level = re.search(r"<TileLevel>(\d+)</TileLevel>", text)
    url = re.search(r"<ServerUrl>(.*?)</ServerUrl>", text)
    if not level or not url:
        return None
    zoom, x, y = int(level.group(1)), int(block.group(1)), int(block.group(2))
    if "<YOrigin>bottom</YOrigin>" in text:
        y = 2**zoom - 1 - y
    code = re.search(r"(?:Error code|HTTP (?:error|status) code)\s*:?\s*(\d{3})", detail)
    address = unescape(url.group(1)).replace("${z}", str(zoom)).replace("${x}", str(x)).replace("${y}", str(y))
    return f"tile {zoom}/{x}/{y}{f' (HTTP {code.group(1)})' if code else ''}: {public_url(address)}"
