"""The scenes a many-scene prediction reads, wherever they live.

``--data`` for many scenes is one of:
* a folder of rasters (``.tif``, ``.tiff``, ``.vrt``, ``.jp2``, ``.img``);
* a CSV with a ``path`` column: local paths (relative to the CSV), ``https://``/``s3://``/
  ``gs://``/``az://`` URLs or GDAL ``/vsi...`` paths, mixed as needed;
* a STAC ItemCollection, Catalog, Collection or Item JSON (read with pystac, local or at a
  URL): each item is a scene, its raster the asset ``--stac-asset NAME`` (default: the
  item's only GeoTIFF asset, else ``visual``), named after the item id.

A scene's *identity* decides whether a done-record still holds: size and modification time
for a local file, the location itself for a remote one (a remote file replaced in place at
the same URL is not noticed; use versioned URLs or a new OUT_DIR).

A scene may also be a *piece* of a larger raster: ``window`` (whole blocks of it) and
``clip`` (an area outside which nothing is kept). A tile service's area of interest becomes
such pieces (``inference/jobs/tile_service.py``), so the many-scene machinery (done-records,
resume, shards, Ray, merge) shares out one area; the merge joins the pieces' buildings across
their borders (``jobs/scenes.py``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from buildseg.errors import BuildsegError
from buildseg.formats.locations import RASTER_SUFFIXES, is_remote, location_stem, location_suffix, resolve

GEOTIFF_TYPES = ("image/tiff", "image/tiff; application=geotiff", "image/tiff; application=geotiff; profile=cloud-optimized")
DEFAULT_ASSET = "visual"  # STAC's common name for an RGB image asset


@dataclass(frozen=True)
class SceneSource:
    """One scene: where its raster is (path or URL) and the name its outputs carry."""

    location: str
    name: str
    window: tuple[int, int, int, int] | None = None  # (row, col, height, width): whole blocks of the raster
    clip: str | None = None  # a vector file (the raster's CRS): the area kept, buildings by their centroid
    group: str | None = None  # the pieces of one raster share a group: the merge joins them into one layer

    @classmethod
    def of(cls, location: str | Path) -> "SceneSource":
        return cls(str(location), location_stem(location))

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    def identity(self) -> dict:
        if self.remote:
            ident = {"location": self.location}
        else:
            stat = Path(self.location).stat()
            ident = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if self.window is not None:
            ident["window"] = list(self.window)
        if self.clip is not None:
            ident["clip_sha256"] = hashlib.sha256(Path(self.clip).read_bytes()).hexdigest()[:16]
        return ident

    def check(self) -> None:
        """A local file must exist; a remote one must answer with a raster header (one small
        read), so an unreachable URL stops the run before a model loads or a file is written."""
        if not self.remote:
            if not Path(self.location).is_file():
                raise BuildsegError(f"scene not found: {self.location}")
            return
        from buildseg.formats.rasters import open_raster

        with open_raster(self.location):
            pass


def check_sources(scenes: list[SceneSource], threads: int = 16) -> None:
    """Every scene's :meth:`SceneSource.check`, remote headers read in parallel; the first
    failure (in the scenes' order) is raised."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(scenes)))) as pool:
        for future in [pool.submit(scene.check) for scene in scenes]:
            future.result()


def is_stac(data: str | Path) -> bool:
    """A JSON file or URL whose document is a STAC object (Item, Catalog, Collection or ItemCollection)."""
    text = str(data)
    if location_suffix(text) != ".json":
        return False
    if is_remote(text):
        return True  # read and checked by pystac
    try:
        doc = json.loads(Path(text).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and ("stac_version" in doc or
                                      (doc.get("type") == "FeatureCollection" and
                                       any("assets" in f for f in doc.get("features", []) if isinstance(f, dict))))


def is_scene_collection(data: str | Path) -> bool:
    """A folder of rasters (not a competition folder with images/), a CSV with a ``path``
    column (no ``img_id``) whose first entry is a raster, or a STAC document."""
    if is_stac(data):
        return True
    path = Path(data)
    if path.is_dir():
        return not (path / "images").is_dir() and any(p.suffix.lower() in RASTER_SUFFIXES for p in path.iterdir())
    if path.suffix.lower() == ".csv" and path.is_file():
        with path.open(encoding="utf-8", errors="replace", newline="") as handle:
            reader = csv.DictReader(handle)
            first = next(reader, None)
            columns = reader.fieldnames or []
        return ("path" in columns and "img_id" not in columns and first is not None
                and location_suffix((first.get("path") or "").strip()) in RASTER_SUFFIXES)
    return False


def list_scene_sources(data: str | Path, stac_asset: str | None = None) -> list[SceneSource]:
    """The scenes of ``data`` (see the module docstring), in a stable order."""
    if is_stac(data):
        return stac_scenes(str(data), stac_asset)
    if stac_asset is not None:
        raise BuildsegError(f"--stac-asset applies to a STAC catalogue or item collection; --data {data} is not one")
    path = Path(data)
    if path.is_dir():
        return [SceneSource.of(p) for p in sorted(path.iterdir()) if p.suffix.lower() in RASTER_SUFFIXES]
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    scenes = []
    for line, row in enumerate(rows, start=2):
        location = (row.get("path") or "").strip()
        if not location:
            raise BuildsegError(f"{path} line {line}: the path is empty; give a file, a URL or a /vsi path")
        scenes.append(SceneSource.of(resolve(location, path.parent)))
    return scenes


def _asset_href(item, asset: str | None) -> str:
    assets = item.assets
    if asset is not None:
        if asset not in assets:
            raise BuildsegError(f"STAC item {item.id!r} has no asset {asset!r} (it has: {', '.join(assets) or 'none'}); "
                                "choose one with --stac-asset")
        return assets[asset].get_absolute_href() or assets[asset].href
    tiffs = [k for k, a in assets.items() if (a.media_type or "").lower() in GEOTIFF_TYPES
             or location_suffix(a.href) in (".tif", ".tiff")]
    if len(tiffs) == 1:
        return assets[tiffs[0]].get_absolute_href() or assets[tiffs[0]].href
    if DEFAULT_ASSET in assets:
        return assets[DEFAULT_ASSET].get_absolute_href() or assets[DEFAULT_ASSET].href
    raise BuildsegError(f"STAC item {item.id!r} has {len(tiffs)} GeoTIFF assets ({', '.join(tiffs) or 'none'}) and no "
                        f"'{DEFAULT_ASSET}' one; choose the image with --stac-asset NAME")


def stac_scenes(document: str, asset: str | None) -> list[SceneSource]:
    """One scene per STAC item, its raster the chosen asset, its name the item id."""
    try:
        import pystac
    except ImportError:
        raise BuildsegError("STAC input needs pystac: pip install 'buildseg[geo]'") from None
    try:
        obj = pystac.read_file(document) if not _is_item_collection(document) else \
            pystac.ItemCollection.from_file(document)
    except (pystac.STACError, OSError, ValueError, KeyError) as exc:
        raise BuildsegError(f"cannot read {document} as STAC: {str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if isinstance(obj, pystac.ItemCollection):
        items = list(obj.items)
    elif isinstance(obj, pystac.Item):
        items = [obj]
    else:
        items = list(obj.get_items(recursive=True))
    if not items:
        raise BuildsegError(f"{document} holds no STAC item: nothing to predict")
    base = document.rsplit("/", 1)[0] if is_remote(document) else str(Path(document).parent)
    scenes = [SceneSource(resolve(_asset_href(item, asset), base), item.id) for item in items]
    names = [s.name for s in scenes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BuildsegError(f"{document}: item ids repeat ({', '.join(repeated[:5])}); outputs are named after them")
    return scenes


def _is_item_collection(document: str) -> bool:
    if is_remote(document):
        return False
    try:
        doc = json.loads(Path(document).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("type") == "FeatureCollection"
