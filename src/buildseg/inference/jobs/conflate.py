"""``predict --existing``: the finished footprint layer conflated with mapped buildings
(footprints/conflation.py has the rule): the layer gains ``status``, ``best_iou`` and
``covered`` (or holds only the new footprints with ``--only-new``), and two files are written
beside it: ``<layer>_unconfirmed<ext>`` (existing buildings nothing predicted supports) and
``<layer>_new.geojson`` (the new footprints in EPSG:4326 with ``building=yes`` and
``confidence``, for JOSM, iD and QGIS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from buildseg.footprints.conflation import ConflationRule, conflate, editor_frame
from buildseg.footprints.writers import PARQUET, write_footprints


def read_layer(path: Path):
    import geopandas as gpd

    return gpd.read_parquet(path) if path.suffix.lower() in PARQUET else gpd.read_file(path, engine="pyogrio")


def masks_extent(masks: list[Path], crs):
    """The union of the mask rasters' footprints in ``crs``: where the prediction looked. Mapped
    buildings outside it are neither confirmed nor unconfirmed."""
    import rasterio
    import shapely
    from rasterio.warp import transform_bounds
    from shapely.geometry import box

    boxes = []
    for path in masks:
        with rasterio.open(path) as src:
            bounds = src.bounds if crs is None or src.crs is None or src.crs == crs else \
                transform_bounds(src.crs, crs, *src.bounds)
        boxes.append(box(*bounds))
    return shapely.union_all(boxes) if boxes else None


def conflate_layer(layer: Path, existing, *, rule: ConflationRule, only_new: bool, masks: list[Path],
                   frames_out: dict | None = None) -> dict[str, Any]:
    """Conflate the layer at ``layer`` with the ``existing`` buildings (a GeoDataFrame) inside
    the masks' extent, in place. ``frames_out`` receives the footprints by status (new,
    mapped, unconfirmed), whatever ``only_new`` kept in the layer."""
    predicted = read_layer(layer)
    extent = masks_extent(masks, predicted.crs)
    if extent is not None:
        local = existing.to_crs(predicted.crs) if existing.crs and predicted.crs and existing.crs != predicted.crs else existing
        existing = local[local.intersects(extent)]
    result = conflate(predicted, existing, rule)
    predicted = result.predicted
    new = predicted[predicted["status"] == "new"] if len(predicted) else predicted
    if frames_out is not None:
        mapped = predicted[predicted["status"] == "mapped"] if len(predicted) else predicted
        frames_out.update(new=new, mapped=mapped, unconfirmed=result.unconfirmed)
    write_footprints(new if only_new else predicted, layer)
    unconfirmed_path = write_footprints(result.unconfirmed, layer.with_name(f"{layer.stem}_unconfirmed{layer.suffix}"))
    editor_path = write_footprints(editor_frame(new), layer.with_name(f"{layer.stem}_new.geojson"))
    return {**result.counts(), "layer": str(layer), "unconfirmed_layer": str(unconfirmed_path), "editor": str(editor_path)}
