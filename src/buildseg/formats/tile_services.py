"""Imagery services as rasters GDAL reads: no hand-written tile client.

Three kinds (:func:`service_kind`):
* ``xyz``: a URL template (``https://host/{z}/{x}/{y}.png``; ``{-y}`` or ``tms=True`` for TMS
  row order), read by GDAL's WMS driver with its TMS mini-driver over the Web Mercator world
  at one zoom (:func:`service_xml`);
* ``wmts``: a WMTS GetCapabilities URL (any URL naming WMTS), read by GDAL's WMTS driver at
  one of the layer's tile matrices (:func:`wmts_xml`, :func:`wmts_levels`);
* ``wms``: a WMS endpoint (any other URL naming WMS), read by GDAL's WMS driver in EPSG:3857
  on the pixel grid of one Web Mercator zoom (:func:`wms_xml`), so a WMS and an XYZ layer of
  the same imagery give the same pixels.
Every description carries buildseg's user agent, a connection limit and GDAL's disk cache;
GDAL fetches, retries and caches. An area of interest then becomes a VRT window of the
service snapped to whole tiles (:func:`snap_window`, :func:`window_vrt`): a small raster that
the GeoTIFF pipeline reads block by block like any scene.
"""

from __future__ import annotations

import math
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from xml.sax.saxutils import escape, unescape

from buildseg.errors import BuildsegError

WORLD = 20037508.342789244  # half the Web Mercator world's side, metres
TILE = 256
MAX_ZOOM = 23
EQUATOR_M_PER_PX_Z0 = 2 * WORLD / TILE  # 156543.03 m per pixel at zoom 0 on the equator
HTTP_RETRIES = 3  # GDAL retries a failed tile request this many times (GDAL_HTTP_MAX_RETRY), 1 s apart and more
TIMEOUT_S = 30  # a tile request that has not answered by then fails (GDAL's own default is 300 s)


def user_agent() -> str:
    """``buildseg/<version>``: what every request to a service says it comes from."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"buildseg/{version('buildseg')}"
    except PackageNotFoundError:  # run from a source tree without installing
        return "buildseg/dev"


def prepare_service_reads() -> None:
    """GDAL's retries for tile requests in this process (the environment's settings win)."""
    import os

    os.environ.setdefault("GDAL_HTTP_MAX_RETRY", str(HTTP_RETRIES))
    os.environ.setdefault("GDAL_HTTP_RETRY_DELAY", "1")


SERVICE_KINDS = ("xyz", "wmts", "wms")
MAX_WMS_ZOOM = 22  # the WMS grid is the world at 256 x 2^zoom pixels: GDAL's sizes are 32-bit


def service_kind(text: str) -> str | None:
    """``xyz`` (a URL template with ``{...}``), ``wmts`` or ``wms`` (a URL naming it), else None."""
    text = str(text)
    if not re.match(r"^https?://", text) or re.search(r"\.(tiff?|vrt|jp2|json|csv)(\?|$)", text, flags=re.I):
        return None
    if "{" in text and "}" in text:
        return "xyz"
    low = text.lower()
    return "wmts" if "wmts" in low else "wms" if "wms" in low else None


def is_tile_template(text: str) -> bool:
    return service_kind(text) is not None


def check_template(text: str) -> None:
    missing = [k for k in ("{z}", "{x}") if k not in text] + ([] if ("{y}" in text or "{-y}" in text) else ["{y}"])
    if missing:
        raise BuildsegError(f"--data {text}: a tile URL template needs {{z}}, {{x}} and {{y}} (or {{-y}} for TMS row "
                            f"order); it lacks {', '.join(missing)}")


def check_zoom(zoom: int, most: int = MAX_ZOOM) -> None:
    if not 0 <= zoom <= most:
        raise BuildsegError(f"--zoom {zoom} is out of range: this service has zoom levels 0..{most}")


def _tail(cache_dir: str | Path | None, user_agent: str, max_connections: int, bands: int) -> str:
    """What every GDAL description here ends with: bands, politeness, cache, error handling."""
    cache = f"<Cache><Path>{escape(str(cache_dir))}</Path></Cache>" if cache_dir else "<Cache/>"
    return (f"<BandsCount>{bands}</BandsCount><MaxConnections>{max_connections}</MaxConnections><Timeout>{TIMEOUT_S}</Timeout>"
            f"<UserAgent>{escape(user_agent)}</UserAgent>{cache}<ZeroBlockHttpCodes>204</ZeroBlockHttpCodes>"
            f"<ZeroBlockOnServerException>false</ZeroBlockOnServerException>")


def wms_xml(url: str, *, layer: str, zoom: int, cache_dir: str | Path | None, user_agent: str, max_connections: int,
            bands: int = 3) -> str:
    """GDAL's description of a WMS layer in EPSG:3857 on the pixel grid of Web Mercator zoom
    ``zoom`` (the world at 256 x 2^zoom pixels, in 256 px requests)."""
    size = TILE * 2**zoom
    return (f"<GDAL_WMS><Service name=\"WMS\"><Version>1.1.1</Version><ServerUrl>{escape(url)}</ServerUrl>"
            f"<SRS>EPSG:3857</SRS><ImageFormat>image/png</ImageFormat><Layers>{escape(layer)}</Layers><Styles></Styles>"
            f"</Service><DataWindow><UpperLeftX>{-WORLD}</UpperLeftX><UpperLeftY>{WORLD}</UpperLeftY>"
            f"<LowerRightX>{WORLD}</LowerRightX><LowerRightY>{-WORLD}</LowerRightY><SizeX>{size}</SizeX>"
            f"<SizeY>{size}</SizeY></DataWindow><Projection>EPSG:3857</Projection><BlockSizeX>{TILE}</BlockSizeX>"
            f"<BlockSizeY>{TILE}</BlockSizeY>{_tail(cache_dir, user_agent, max_connections, bands)}</GDAL_WMS>")


def wmts_xml(url: str, *, layer: str | None, zoom: int | None, cache_dir: str | Path | None, user_agent: str,
             max_connections: int, bands: int = 3) -> str:
    """GDAL's description of a WMTS layer at its ``zoom``-th tile matrix (0: the coarsest;
    None: the finest, with the others as overviews)."""
    chosen = (f"<Layer>{escape(layer)}</Layer>" if layer else "") + (f"<ZoomLevel>{zoom}</ZoomLevel>" if zoom is not None
                                                                       else "")
    return (f"<GDAL_WMTS><GetCapabilitiesUrl>{escape(url)}</GetCapabilitiesUrl>{chosen}"
            f"{_tail(cache_dir, user_agent, max_connections, bands)}</GDAL_WMTS>")


@contextmanager
def open_description(description: str):
    """The rasterio dataset of a GDAL service description (read from a temporary file: GDAL
    fetches what it needs to open it, e.g. a WMTS's capabilities, and no more)."""
    import rasterio

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "service.xml"
        path.write_text(description)
        try:
            src = rasterio.open(path)
        except rasterio.errors.RasterioIOError as exc:
            url = re.search(r"<(?:ServerUrl|GetCapabilitiesUrl)>(.*?)</", description)
            raise BuildsegError(f"cannot open the service {public_url(unescape(url.group(1))) if url else ''}: "
                                f"{' '.join(str(exc).split())[:200]} (check the URL and --layer)") from None
        with src:
            yield src


def wmts_levels(description: str, url: str) -> tuple[object, list[float]]:
    """(the layer's CRS, the pixel size of each tile matrix in CRS units, coarsest first), from
    the capabilities as GDAL reads them (``description``: :func:`wmts_xml` without a zoom); a
    service with several layers needs one chosen."""
    with open_description(description) as src:
        if not src.count:
            names = [re.sub(r".*layer=([^,]+).*", r"\1", d) for d in src.subdatasets][:8]
            raise BuildsegError(f"--data {public_url(url)}: the WMTS has several layers or tile matrix sets; choose one "
                                f"with --layer (e.g. {', '.join(dict.fromkeys(names)) or 'see its capabilities'})")
        finest = abs(src.transform.a)
        return src.crs, [finest * f for f in reversed([1, *src.overviews(1)])]


def ground_size(size: float, crs, latitude: float) -> float:
    """Metres on the ground of ``size`` CRS units at ``latitude`` (Web Mercator shrinks with it)."""
    if crs is not None and crs.is_geographic:
        return size * 111_320 * math.cos(math.radians(latitude))
    if crs is not None and crs.to_epsg() == 3857:
        return size * math.cos(math.radians(latitude))
    return size * (crs.linear_units_factor[1] if crs is not None else 1.0)


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
    return (f"<GDAL_WMS><Service name=\"TMS\"><ServerUrl>{escape(url)}</ServerUrl></Service>"
            f"<DataWindow><UpperLeftX>{-WORLD}</UpperLeftX><UpperLeftY>{WORLD}</UpperLeftY>"
            f"<LowerRightX>{WORLD}</LowerRightX><LowerRightY>{-WORLD}</LowerRightY><TileLevel>{zoom}</TileLevel>"
            f"<TileCountX>1</TileCountX><TileCountY>1</TileCountY><YOrigin>{'bottom' if flip else 'top'}</YOrigin>"
            f"</DataWindow><Projection>EPSG:3857</Projection><BlockSizeX>{TILE}</BlockSizeX><BlockSizeY>{TILE}</BlockSizeY>"
            f"{_tail(cache_dir, user_agent, max_connections, bands)}</GDAL_WMS>")


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


def service_url_of(raster: str | Path) -> str | None:
    """The service (without credentials) behind an area's VRT (``service.xml`` beside it); None
    for any other raster."""
    service = Path(str(raster)).with_name("service.xml")
    if not service.is_file():
        return None
    url = re.search(r"<(?:ServerUrl|GetCapabilitiesUrl)>(.*?)</", service.read_text())
    return public_url(unescape(url.group(1))).replace("${", "{") if url else "the service"


IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"II*\x00", b"MM\x00*", b"RIFF")  # PNG, JPEG, GIF, TIFF, WebP
ABSENT_CODES = (204, 404)  # a tile the service does not have (GDAL: an empty block with 204, an error with 404)
PROBE_BYTES = 48  # what an error shows of a body that is not an image


def tile_url(template: str, *, zoom: int, x: int, y: int, tms: bool = False) -> str:
    """The URL of tile ``zoom/x/y`` (``y`` counted from the north) of an XYZ/TMS template."""
    row = 2**zoom - 1 - y if tms or "{-y}" in template else y
    return template.replace("{z}", str(zoom)).replace("{x}", str(x)).replace("{-y}", str(row)).replace("{y}", str(row))


def fetch_tile(url: str, *, timeout: float = TIMEOUT_S) -> tuple[int, str, bytes]:
    """(HTTP status, content type, the body's first bytes) of one tile request, with buildseg's
    user agent and the URL's own credentials; status 0 when the host did not answer."""
    import base64
    import urllib.error
    import urllib.request
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    headers = {"User-Agent": user_agent()}
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        url = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read(4096)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", "") if exc.headers else "", b""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return 0, "", str(getattr(exc, "reason", exc)).encode()


def probe_tiles(template: str, *, zoom: int, tiles: list[tuple[int, int]], tms: bool = False,
                allow_gaps: bool = False) -> None:
    """Fetch a few of the area's tiles before anything is written: a service that answers with
    something that is not an image (an HTML error page, a JSON message), answers none of them,
    or is not there at all is one line naming a tile's URL and what came back, instead of a
    read error deep in the run. With ``allow_gaps``, tiles the service lacks (404, 204) pass."""
    answers = []
    for x, y in tiles:
        url = tile_url(template, zoom=zoom, x=x, y=y, tms=tms)
        status, kind, body = fetch_tile(url)
        if status == 200 and body.startswith(IMAGE_MAGIC):
            return
        shown = public_url(url)
        if status == 200:
            first = body[:PROBE_BYTES].decode("utf-8", "replace").replace("\n", " ").strip()
            raise BuildsegError(f"tile {zoom}/{x}/{y} is not an image: {shown} answered {kind or 'no content type'} "
                                f"starting {first!r}; check the URL template (a tile URL must return PNG/JPEG "
                                "images) and the service's key")
        answers.append((status, shown, body))
    status, shown, body = answers[0]
    if status == 0:
        raise BuildsegError(f"the tile service did not answer: {shown} ({body.decode('utf-8', 'replace')[:120]}); "
                            "check the host and the network")
    if allow_gaps and all(code in ABSENT_CODES for code, _, _ in answers):
        return
    codes = ", ".join(sorted({str(code) for code, _, _ in answers}))
    raise BuildsegError(f"none of the {len(answers)} tiles tried over the AOI came back as an image (HTTP {codes}; "
                        f"e.g. {shown}): check the URL template, --zoom and that the service covers the AOI")


def failed_tile(raster: str | Path, detail: str) -> str | None:
    """``"tile z/x/y (HTTP 500): URL"`` when ``detail`` (GDAL's messages) says that a tile of
    the service behind ``raster`` (an area's VRT beside its ``service.xml``) failed to
    download (for WMS and WMTS: the block and the service's URL); None for any other read
    error. URLs come without credentials."""
    block = re.search(r"Unable to download block (\d+), (\d+)", detail)
    service = Path(str(raster)).with_name("service.xml")
    if not block or not service.is_file():
        return None
    text = service.read_text()
    x, y = int(block.group(1)), int(block.group(2))
    code = re.search(r"(?:Error code|HTTP (?:error|status) code)\s*:?\s*(\d{3})", detail)
    status = f" (HTTP {code.group(1)})" if code else ""
    level = re.search(r"<TileLevel>(\d+)</TileLevel>", text)
    url = re.search(r"<(?:ServerUrl|GetCapabilitiesUrl)>(.*?)</", text)
    address = public_url(unescape(url.group(1))) if url else "the service"
    if not level:
        return f"block {x}, {y} of {address}{status}"
    zoom = int(level.group(1))
    if "<YOrigin>bottom</YOrigin>" in text:
        y = 2**zoom - 1 - y
    address = address.replace("${z}", str(zoom)).replace("${x}", str(x)).replace("${y}", str(y))
    return f"tile {zoom}/{x}/{y}{status}: {address}"
