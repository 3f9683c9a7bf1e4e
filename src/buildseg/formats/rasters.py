"""GeoTIFF scenes: opening with clear errors, the per-band stretch, and windows on a target grid.

Shared by training (``data/geo.py``) and prediction (``inference/jobs/geotiff.py``), so both read a
scene the same way: the same bands, the same 2-98 percentile stretch (:func:`raster_stretch`,
fitted once per scene from a decimated read), the same resampling to a ground sample distance.

A scene's *grid* is its pixel grid resampled to ``gsd`` metres per pixel (or its own pixels when
no GSD is asked for). Windows are given in grid pixels and read with rasterio's windowed,
resampled reads (bilinear for images, nearest for the validity mask), so a 0.25 m orthophoto is
seen at 0.5 m without ever being loaded or warped whole. GDAL's block cache is bounded to
256 MB per process, so memory stays flat with scene size (benchmarks/geo_memory.py). Needs the
``geo`` extra.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from buildseg.errors import BuildsegError
from buildseg.formats.locations import READ_ATTEMPTS, gdal_location, is_remote, prepare_remote_reads, uncache_remote
from buildseg.formats.stretch import Stretch, fit_stretch

log = logging.getLogger("buildseg")

STRETCHES = ("percentile", "none")
MAX_UPSAMPLING = 4.0  # a GSD finer than a quarter of the scene's pixel invents detail


GDAL_CACHE_MB = 256  # GDAL's default is 5% of RAM *per process*: 16 loader workers would hold 16 x 1.2 GB


def require_rasterio():
    """rasterio, with GDAL's block cache bounded (``GDAL_CACHEMAX`` in the environment overrides)."""
    os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))
    try:
        import rasterio
    except ImportError:
        raise BuildsegError("GeoTIFF input needs the geo extra: pip install 'buildseg[geo]'") from None
    return rasterio


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def open_raster(path: str | Path):
    """A rasterio dataset of a local file or a remote URL (``formats/locations.py``); a
    one-line error for a missing, unreachable or unreadable one."""
    rasterio = require_rasterio()
    if is_remote(path):
        prepare_remote_reads()
        try:
            return rasterio.open(gdal_location(path))
        except rasterio.errors.RasterioIOError as exc:
            raise BuildsegError(f"cannot open {path} as a raster: {_short(exc)} (check the URL, that it is a "
                                "GeoTIFF, and the credentials in GDAL's environment variables)") from None
    path = Path(path)
    if not path.is_file():
        raise BuildsegError(f"GeoTIFF not found: {path}")
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise BuildsegError(f"cannot open {path} as a raster: {_short(exc)}") from None


def check_bands(src, bands: list[int], path: str | Path) -> None:
    if max(bands) > src.count:
        raise BuildsegError(f"{path} has {src.count} band(s) but bands {','.join(map(str, bands))} were asked for; "
                            f"choose bands between 1 and {src.count} (--bands)")


def raster_stretch(src, bands: list[int], mode: str = "percentile", percentiles: tuple[float, float] = (2.0, 98.0),
                   sample: int = 1024) -> Stretch | None:
    """The 2-98 percentile stretch per band, from a decimated read of the whole raster.

    None for 8-bit rasters and for ``mode="none"`` (values are then clipped to 0-255).
    Nodata pixels (the raster's mask), non-finite values and pixels that are 0 in every
    band (fill) are left out of the percentiles. Deterministic: training and prediction
    that call it on the same scene get the same mapping.
    """
    if mode not in STRETCHES:
        raise BuildsegError(f"unknown stretch {mode!r}; use {' or '.join(STRETCHES)}")
    if mode == "none" or all(src.dtypes[b - 1] == "uint8" for b in bands):
        return None
    scale = max(1, -(-max(src.height, src.width) // sample))
    shape = (len(bands), -(-src.height // scale), -(-src.width // scale))
    try:
        data = src.read(bands, out_shape=shape, masked=True)
    except require_rasterio().errors.RasterioIOError as exc:
        raise BuildsegError(f"cannot read {src.name}: the file is damaged ({_short(exc)}); re-export it") from None
    fitted = fit_stretch(np.ma.getdata(data), np.ma.getmaskarray(data).any(axis=0), percentiles)
    if fitted is None:
        log.warning("%s has no valid pixels to stretch: values are clipped to 0-255", src.name)
        return None
    log.info("stretching %s band values %s..%s to 0..255", Path(src.name).name,
             np.round(fitted.low, 2).tolist(), np.round(fitted.high, 2).tolist())
    return fitted


def to_uint8(block: np.ndarray, stretch: Stretch | None) -> np.ndarray:
    """(bands, H, W) raster values -> uint8 through the stretch, or clipped when there is none."""
    if stretch is not None:
        return stretch.apply(block)
    if block.dtype == np.uint8:
        return block
    return np.clip(np.nan_to_num(block.astype(np.float32)), 0, 255).astype(np.uint8)


def metres_per_unit(crs) -> float | None:
    """Metres per CRS unit for a projected CRS (1 for metres, 0.3048 for feet); None otherwise."""
    if crs is None or not crs.is_projected:
        return None
    factor = crs.linear_units_factor[1] if hasattr(crs, "linear_units_factor") else None
    if factor:
        return float(factor)
    return 1.0 if (crs.linear_units or "").lower() in ("metre", "meter", "m") else None


MERCATOR_EPSG = (3857, 900913, 3395)  # Web Mercator (and World Mercator): a metre of the CRS is 1/cos(lat) on the ground
EARTH_RADIUS = 6378137.0  # the sphere of Web Mercator


def mercator_scale(crs, y: float | np.ndarray) -> float | np.ndarray:
    """Ground metres per CRS metre at northing ``y``: cos(latitude) in Web Mercator (tiles of
    zoom 19 are 0.30 CRS metres but 0.21 m on the ground at 45 degrees), 1 elsewhere."""
    if crs is None or crs.to_epsg() not in MERCATOR_EPSG:
        return 1.0
    return np.cos(np.arctan(np.sinh(np.asarray(y, dtype=np.float64) / EARTH_RADIUS)))


@dataclass(frozen=True)
class SceneGrid:
    """A scene's pixel grid resampled by ``step`` source pixels per grid pixel (per axis)."""

    height: int  # grid pixels
    width: int
    step_y: float  # source pixels per grid pixel
    step_x: float
    gsd: float | None  # metres per grid pixel, when known

    @property
    def resampled(self) -> bool:
        return abs(self.step_x - 1.0) > 1e-9 or abs(self.step_y - 1.0) > 1e-9

    def source_window(self, row: float, col: float, height: float, width: float):
        """The rasterio Window (source pixels) under grid pixels [row, row+height) x [col, col+width)."""
        from rasterio.windows import Window

        return Window(col * self.step_x, row * self.step_y, width * self.step_x, height * self.step_y)

    def transform(self, src_transform, row: float = 0.0, col: float = 0.0):
        """The affine transform of the grid, with its origin at grid pixel (row, col)."""
        from affine import Affine

        return src_transform @ Affine.translation(col * self.step_x, row * self.step_y) @ Affine.scale(self.step_x, self.step_y)


def scene_grid(src, gsd: float | None, path: str | Path) -> SceneGrid:
    """The grid of ``src`` at ``gsd`` metres per pixel (its own pixels when ``gsd`` is None).

    Pixel sizes are on the ground: a Web Mercator raster's are scaled by cos(latitude) at its
    centre. Errors name the scene: no CRS or a geographic CRS with a GSD (pixel sizes in degrees are
    not metres; reproject with ``gdalwarp -t_srs EPSG:<utm zone>``), and a GSD that would
    upsample more than 4x.
    """
    unit = metres_per_unit(src.crs)
    if unit is not None:  # on the ground at the scene's centre (Web Mercator's metres shrink away from the equator)
        unit *= float(mercator_scale(src.crs, src.transform.f + src.transform.e * src.height / 2))
    if gsd is None:
        native = abs(src.transform.a) * unit if unit else None
        return SceneGrid(src.height, src.width, 1.0, 1.0, native)
    if unit is None:
        what = "no CRS" if src.crs is None else f"a geographic CRS ({src.crs.to_string()})"
        raise BuildsegError(f"{path} has {what}, so its pixel size is not in metres and --gsd {gsd:g} cannot apply; "
                            "reproject it to a projected CRS (gdalwarp -t_srs EPSG:<UTM zone>) or drop --gsd")
    pixel_x, pixel_y = abs(src.transform.a) * unit, abs(src.transform.e) * unit
    finest = min(pixel_x, pixel_y)
    if finest / gsd > MAX_UPSAMPLING:
        raise BuildsegError(f"{path} has {finest:g} m pixels: --gsd {gsd:g} would upsample it {finest / gsd:.1f}x "
                            f"(at most {MAX_UPSAMPLING:g}x); use --gsd >= {finest / MAX_UPSAMPLING:g} or finer imagery")
    step_x, step_y = gsd / pixel_x, gsd / pixel_y
    return SceneGrid(max(1, int(round(src.height / step_y))), max(1, int(round(src.width / step_x))), step_y, step_x, gsd)


def _chain(exc: BaseException) -> str:
    """GDAL's messages behind a read error (rasterio chains them), in one string."""
    texts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(texts)


def _read_by_blocks(src, bands: list[int], window, shape: tuple[int, int, int],
                    gaps: list) -> tuple[np.ndarray, np.ndarray]:
    """(raw, masks) of ``window`` read one source block at a time (unresampled): a block that
    fails is left 0 and invalid and its (row, col, height, width) appended to ``gaps``."""
    from rasterio.windows import Window

    from buildseg.formats.tile_services import failed_tile

    raw = np.zeros(shape, dtype=src.dtypes[0])
    masks = np.zeros(shape, dtype=np.uint8)
    bh, bw = src.block_shapes[0]
    row0, col0 = int(round(window.row_off)), int(round(window.col_off))
    for by in range(max(0, row0 // bh * bh), min(src.height, row0 + shape[1]), bh):
        for bx in range(max(0, col0 // bw * bw), min(src.width, col0 + shape[2]), bw):
            top, left = max(by, row0), max(bx, col0)
            bottom, right = min(by + bh, row0 + shape[1], src.height), min(bx + bw, col0 + shape[2], src.width)
            part = Window(left, top, right - left, bottom - top)
            place = (slice(None), slice(top - row0, bottom - row0), slice(left - col0, right - col0))
            try:
                raw[place] = src.read(bands, window=part)
                masks[place] = src.read_masks(bands, window=part)
            except Exception as exc:  # GDAL's read errors come as several types
                gap = (by, bx, min(bh, src.height - by), min(bw, src.width - bx))
                if gap not in gaps:
                    gaps.append(gap)
                    log.warning("gap: %s", failed_tile(src.name, _chain(exc)) or f"{src.name} block row={by}, col={bx}")
    return raw, masks


def _read_error(name: str, exc: Exception, where: str, attempts: int | None) -> BuildsegError:
    """The one line for a read that failed: a service's tile and its URL, a remote file after
    ``attempts`` tries, or a damaged local file."""
    from buildseg.formats.tile_services import failed_tile, service_url_of

    tile = failed_tile(name, _chain(exc))
    if tile:
        return BuildsegError(f"{tile} failed after GDAL's retries; run again later (finished pieces are kept), or add "
                             "--allow-gaps to predict around it and record it")
    service = service_url_of(name)
    if service:
        return BuildsegError(f"the tile service {service} sent something that is not a readable image near grid pixels "
                             f"{where} of the area ({_short(exc)}); check the URL template, or add --allow-gaps to "
                             "predict around such tiles")
    if attempts is not None:
        return BuildsegError(f"cannot read {name} at grid pixels {where} after {attempts} tries: {_short(exc)}; check "
                             "the network and the URL, then run again")
    return BuildsegError(f"cannot read {name} at grid pixels {where}: the file is damaged there ({_short(exc)}); "
                         "re-export it")


def read_window(src, bands: list[int], grid: SceneGrid, row: float, col: float, height: int, width: int,
                stretch: Stretch | None, fill_is_nodata: bool = True,
                gaps: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, bands) uint8 image and (H, W) bool validity of a grid window.

    Outside the raster is invalid and 0. Invalid are also the raster's nodata pixels (its
    mask: nodata value, alpha band or internal mask), non-finite values and, with
    ``fill_is_nodata``, pixels that are 0 in every band (an undeclared fill border; training
    counts them as nodata, prediction does not, since a black roof can be 0 too). Invalid
    pixels are set to 0.

    ``gaps``: a read that fails is read again block by block; a block that still fails is
    invalid and listed in ``gaps`` instead of stopping the run (a tile service's missing tile).
    Without it, a failing tile of a service is one line naming the tile and its URL.
    """
    rasterio = require_rasterio()
    from rasterio._err import CPLE_BaseError
    from rasterio.enums import Resampling

    window = grid.source_window(row, col, height, width)
    shape = (len(bands), height, width)
    remote = is_remote(src.name)
    reader, fresh = src, None
    try:
        for attempt in range(1, (READ_ATTEMPTS if remote else 1) + 1):
            try:
                raw = reader.read(bands, window=window, out_shape=shape, boundless=True, fill_value=0,
                                  resampling=Resampling.bilinear if grid.resampled else Resampling.nearest)
                masks = reader.read_masks(bands, window=window, out_shape=shape, boundless=True,
                                          resampling=Resampling.nearest)
                break
            except (rasterio.errors.RasterioIOError, CPLE_BaseError) as exc:  # GDAL's read errors come as either
                if remote and attempt < READ_ATTEMPTS:
                    log.warning("reading %s failed (%s); retrying (%d of %d)", src.name, _short(exc), attempt + 1,
                                READ_ATTEMPTS)
                    time.sleep(0.5 * attempt)
                    if fresh is not None:
                        fresh.close()
                    # GDAL may have kept the cut-off bytes: stop caching this file, read it on a new handle
                    uncache_remote(src.name)
                    reader = fresh = rasterio.open(src.name)
                    continue
                if gaps is not None and not grid.resampled:
                    raw, masks = _read_by_blocks(reader, bands, window, shape, gaps)
                    break
                raise _read_error(src.name, exc, f"row={row}, col={col}", attempt if remote else None) from None
    finally:
        if fresh is not None:
            fresh.close()
    valid = (masks > 0).all(axis=0) & np.isfinite(raw).all(axis=0)
    if fill_is_nodata:
        valid &= (raw != 0).any(axis=0)
    image = to_uint8(raw, stretch)
    image[:, ~valid] = 0
    return np.ascontiguousarray(image.transpose(1, 2, 0)), valid


def mosaic_vrt(paths: list[Path]) -> str:
    """A GDAL VRT mosaic of single-band rasters on one grid (same CRS and pixel size, e.g. the
    mask COGs of an area's pieces), each placed by its own transform; paths relative to the
    VRT's folder (the first raster's)."""
    from xml.sax.saxutils import escape

    rasterio = require_rasterio()
    headers = []
    for path in paths:
        with rasterio.open(path) as src:
            headers.append((path, src.transform, src.width, src.height, src.crs, src.dtypes[0]))
    res_x, res_y = headers[0][1].a, headers[0][1].e
    left = min(t.c for _, t, *_ in headers)
    top = max(t.f for _, t, *_ in headers)
    place = [(p, round((t.c - left) / res_x), round((t.f - top) / res_y), w, h) for p, t, w, h, *_ in headers]
    width = max(x + w for _, x, _, w, _ in place)
    height = max(y + h for _, _, y, _, h in place)
    dtype = {"uint8": "Byte"}.get(headers[0][5], headers[0][5].capitalize())
    sources = "".join(
        f"<SimpleSource><SourceFilename relativeToVRT=\"1\">{escape(Path(p).name)}</SourceFilename><SourceBand>1"
        f"</SourceBand><SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{w}\" ySize=\"{h}\"/><DstRect xOff=\"{x}\" yOff=\"{y}\" "
        f"xSize=\"{w}\" ySize=\"{h}\"/></SimpleSource>" for p, x, y, w, h in place)
    crs = escape(headers[0][4].to_wkt()) if headers[0][4] else ""
    return (f"<VRTDataset rasterXSize=\"{width}\" rasterYSize=\"{height}\"><SRS>{crs}</SRS><GeoTransform>{left}, "
            f"{res_x}, 0, {top}, 0, {res_y}</GeoTransform><VRTRasterBand dataType=\"{dtype}\" band=\"1\">{sources}"
            f"</VRTRasterBand></VRTDataset>")
