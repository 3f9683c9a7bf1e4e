"""Where a raster lives: a local path, or a URL that GDAL reads with HTTP range requests.

``https://`` and ``http://`` URLs are read through ``/vsicurl/``, ``s3://`` through
``/vsis3/``, ``gs://`` through ``/vsigs/``, ``az://`` through ``/vsiaz/``; any GDAL ``/vsi...``
path is passed on as it is. A Cloud-Optimised GeoTIFF is then read window by window, only
the bytes each block needs. Credentials come from GDAL's own environment variables
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` or ``AWS_PROFILE``,
``AWS_REGION``, ``AWS_S3_ENDPOINT`` for S3-compatible stores, ``AWS_NO_SIGN_REQUEST=YES`` for
public buckets; ``GOOGLE_APPLICATION_CREDENTIALS``; ``AZURE_STORAGE_ACCOUNT`` and
``AZURE_STORAGE_ACCESS_KEY``; ``GDAL_HTTP_HEADERS`` for a bearer token).

Remote reads get GDAL's retry on transient HTTP errors (``GDAL_HTTP_MAX_RETRY``, default here
3, ``GDAL_HTTP_RETRY_DELAY`` 0.5 s; a value you set wins) and buildseg retries a failed
window read itself (:data:`READ_ATTEMPTS`), so a dropped connection costs a re-read, not
the job.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")  # what a folder or list of scenes may hold
SCHEMES = {"http": "/vsicurl/", "https": "/vsicurl/", "s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/"}
READ_ATTEMPTS = 3  # tries of one window read from a remote raster
GDAL_REMOTE_DEFAULTS = {"GDAL_HTTP_MAX_RETRY": "3", "GDAL_HTTP_RETRY_DELAY": "0.5",
                        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


def is_remote(location: str | os.PathLike) -> bool:
    text = str(location)
    return text.startswith("/vsi") or urlparse(text).scheme in SCHEMES


def gdal_location(location: str | os.PathLike) -> str:
    """What GDAL opens for ``location``: a ``/vsi`` path for URLs, the path itself otherwise."""
    text = str(location)
    scheme = urlparse(text).scheme
    if scheme in ("http", "https"):
        return SCHEMES[scheme] + text
    if scheme in SCHEMES:
        return SCHEMES[scheme] + text.split("://", 1)[1]
    return text


def location_name(location: str | os.PathLike) -> str:
    """The file name of a path or URL (query string and /vsi prefixes left out)."""
    text = str(location)
    if urlparse(text).scheme in SCHEMES:
        return PurePosixPath(urlparse(text).path).name
    return PurePosixPath(text.split("?", 1)[0]).name


def location_stem(location: str | os.PathLike) -> str:
    return PurePosixPath(location_name(location)).stem


def location_suffix(location: str | os.PathLike) -> str:
    return PurePosixPath(location_name(location)).suffix.lower()


def resolve(location: str, base: Path | str) -> str:
    """``location`` as written in a list or catalogue at ``base`` (a folder or a URL prefix):
    remote and absolute locations unchanged, relative ones joined to ``base``."""
    if is_remote(location) or Path(location).is_absolute():
        return location
    base_text = str(base)
    if is_remote(base_text):
        return base_text.rstrip("/") + "/" + location
    return str(Path(base_text) / location)


def prepare_remote_reads() -> None:
    """GDAL's retry and listing settings for remote rasters, unless the user set them."""
    for key, value in GDAL_REMOTE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def uncache_remote(gdal_path: str) -> None:
    """Stop GDAL caching ``gdal_path`` (a ``/vsicurl/...`` path) for the rest of the process,
    which also drops what it cached of it: after a connection cut off mid-response, the cache
    can hold the truncated bytes, and every retry would read them again. GDAL splits this
    option at ``:``, so in effect every URL of that scheme goes uncached from then on: slower
    after a failure, never wrong."""
    prefixes = [p for p in os.environ.get("CPL_VSIL_CURL_NON_CACHED", "").split(":") if p]
    if gdal_path not in prefixes:
        os.environ["CPL_VSIL_CURL_NON_CACHED"] = ":".join([*prefixes, gdal_path])
