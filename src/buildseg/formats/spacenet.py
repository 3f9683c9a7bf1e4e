"""SpaceNet's building CSVs: ``ImageId,BuildingId,PolygonWKT_Pix[,PolygonWKT_Geo][,Confidence]``.

One row per building; an image without buildings has one row whose WKT is ``POLYGON EMPTY``
(and ``BuildingId`` -1), so it is listed although it holds nothing. Coordinates may carry a
third value (``POLYGON Z``, as SpaceNet's truth files do): it is dropped. Pixel WKT has x to
the right and y down from the image's top-left pixel corner; geographic WKT is in the
image's CRS (lon/lat in SpaceNet 2).

Polygons that are not valid (self-touching rings) are repaired with ``buffer(0)``, as
SpaceNet's scorer does before it intersects them. Proposals without a ``Confidence`` column
all get 1.0 and keep their file order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from buildseg.errors import BuildsegError
from buildseg.formats.tables import read_csv_rows, write_atomic_csv

IMAGE_ID = "ImageId"
PIXEL_WKT = "PolygonWKT_Pix"
GEO_WKT = "PolygonWKT_Geo"
CONFIDENCE = "Confidence"
HEADER = (IMAGE_ID, "BuildingId", PIXEL_WKT, CONFIDENCE)  # what `predict --format spacenet` writes
EMPTY_WKT = "POLYGON EMPTY"


@dataclass
class SpaceNetImage:
    """The buildings of one image: shapely polygons, their confidences and CSV lines."""

    polygons: list = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)


def spacenet_columns(path: str | Path) -> list[str] | None:
    """The header of ``path`` when it is a SpaceNet building CSV (ImageId and a WKT column), else None."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8-sig") as handle:
            header = handle.readline()
    except (OSError, UnicodeDecodeError):
        return None
    columns = [c.strip().strip('"') for c in header.strip().split(",")]
    return columns if IMAGE_ID in columns and (PIXEL_WKT in columns or GEO_WKT in columns) else None


def aoi_of(image_id: str) -> str:
    """SpaceNet's area of interest of an image id: everything before the last ``_`` part
    (``AOI_2_Vegas_img3457`` -> ``AOI_2_Vegas``); an id without ``_`` is its own group."""
    head, sep, _ = image_id.rpartition("_")
    return head if sep else image_id


def read_spacenet(path: str | Path, geometry: str) -> dict[str, SpaceNetImage]:
    """ImageId -> its buildings, from the ``geometry`` WKT column, in file order.

    Every listed image is present, with no polygon when its only row is ``POLYGON EMPTY``.
    A row that cannot be read stops with the file, line and ImageId.
    """
    import shapely
    from shapely import wkt as shapely_wkt
    from shapely.errors import ShapelyError

    path = Path(path)
    columns, rows = read_csv_rows(path)
    if geometry not in columns:
        raise BuildsegError(f"{path} has no '{geometry}' column (columns: {', '.join(columns)}); SpaceNet CSVs need "
                            f"{IMAGE_ID} and {PIXEL_WKT} (or {GEO_WKT}) on both sides")
    has_confidence = CONFIDENCE in columns
    images: dict[str, SpaceNetImage] = {}
    for line, row in enumerate(rows, start=2):
        image_id = (row.get(IMAGE_ID) or "").strip()
        where = f"{path} line {line} ({IMAGE_ID} {image_id or '(empty)'})"
        if not image_id:
            raise BuildsegError(f"{where}: {IMAGE_ID} is empty; every row names its image")
        text = (row.get(geometry) or "").strip()
        try:
            polygon = shapely_wkt.loads(text)
        except (ShapelyError, ValueError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BuildsegError(f"{where}: malformed {geometry} {text[:60]!r} ({reason}); write POLYGON ((x y, ...)) "
                                f"or {EMPTY_WKT}") from None
        image = images.setdefault(image_id, SpaceNetImage())
        if polygon.is_empty:
            continue
        if polygon.geom_type not in ("Polygon", "MultiPolygon"):
            raise BuildsegError(f"{where}: {geometry} is a {polygon.geom_type}; buildings are POLYGON or MULTIPOLYGON")
        polygon = shapely.force_2d(polygon)
        if not polygon.is_valid:
            polygon = polygon.buffer(0)
        confidence = 1.0
        if has_confidence:
            try:
                confidence = float(row.get(CONFIDENCE) or "")
            except ValueError:
                raise BuildsegError(f"{where}: {CONFIDENCE} {row.get(CONFIDENCE)!r} is not a number") from None
        image.polygons.append(polygon)
        image.confidence.append(confidence)
        image.lines.append(line)
    if not images:
        raise BuildsegError(f"{path} has a header but no rows; list every image, with {EMPTY_WKT} where it has no building")
    return images


def shared_geometry(pred: str | Path, truth: str | Path, pred_columns: Sequence[str], truth_columns: Sequence[str]) -> str:
    """The WKT column both files have: pixel WKT when both do, else geographic WKT."""
    for column in (PIXEL_WKT, GEO_WKT):
        if column in pred_columns and column in truth_columns:
            return column
    raise BuildsegError(f"--pred {pred} and --truth {truth} share no WKT column: give both {PIXEL_WKT} "
                        f"(or both {GEO_WKT})")


def tile_rows(image_id: str, buildings: Iterable[tuple[object, float]]) -> list[tuple]:
    """SpaceNet rows of one image's (polygon, confidence) buildings; one ``POLYGON EMPTY`` row
    (BuildingId -1, Confidence 1) when it has none, so the image is still listed."""
    rows = [(image_id, k, polygon.wkt, round(float(confidence), 6)) for k, (polygon, confidence) in enumerate(buildings)]
    return rows or [(image_id, -1, EMPTY_WKT, 1)]


def write_spacenet(path: str | Path, rows: Iterable[Sequence[object]]) -> Path:
    return write_atomic_csv(path, HEADER, rows)
