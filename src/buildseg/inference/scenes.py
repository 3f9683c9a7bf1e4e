"""Predicting many scenes: one mask and one footprint layer per scene, a merged layer, a manifest,
and a re-run that does only what is left.

``buildseg predict --data SCENES_DIR_OR_LIST --out OUT_DIR`` writes, per scene ``NAME.tif``,
``OUT_DIR/NAME_mask.tif`` (COG) and ``OUT_DIR/NAME.<format>``; when a scene is finished its
record goes to ``OUT_DIR/.buildseg-done/NAME.json`` (atomically, after both outputs are in
place). A re-run skips a scene whose record matches the *run key* (a hash of the checkpoint
files' contents and every setting that changes the outputs), the scene's size and mtime, and
whose outputs still exist: a killed run resumes, and a changed checkpoint or setting redoes
everything. At the end the merged layer ``OUT_DIR/footprints.<format>`` (all scenes, in the
first scene's CRS) and ``OUT_DIR/manifest.json`` are rebuilt from the per-scene files, so they
equal those of an uninterrupted run.

Under torchrun, scene ``i`` goes to rank ``i % world_size`` (one node or many: every rank
needs the same OUT_DIR, e.g. on a shared file system); rank 0 merges after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from buildseg.atomic import atomic_open
from buildseg.distributed import SINGLE_PROCESS, DistInfo, barrier
from buildseg.errors import BuildsegError
from buildseg.footprints.writers import write_footprints
from buildseg.inference.geotiff import GeoTiffSettings, predict_geotiff
from buildseg.inference.segmenter import Segmenter

log = logging.getLogger("buildseg")

DONE = ".buildseg-done"
FORMATS = {"gpkg": ".gpkg", "parquet": ".parquet", "fgb": ".fgb", "geojson": ".geojson"}


@dataclass(frozen=True)
class SceneSettings(GeoTiffSettings):
    """The GeoTIFF settings of every scene, plus the footprint layers' format."""

    format: str = "gpkg"


def is_scene_collection(data: str | Path) -> bool:
    """A folder of rasters (not a competition folder with images/), or a CSV with a ``path``
    column (no ``img_id``) whose first entry is a raster file name."""
    import csv

    from buildseg.data.geo import RASTER_SUFFIXES

    path = Path(data)
    if path.is_dir():
        return not (path / "images").is_dir() and any(p.suffix.lower() in RASTER_SUFFIXES for p in path.iterdir())
    if path.suffix.lower() == ".csv" and path.is_file():
        with path.open(encoding="utf-8", errors="replace", newline="") as handle:
            reader = csv.DictReader(handle)
            first = next(reader, None)
            columns = reader.fieldnames or []
        return ("path" in columns and "img_id" not in columns and first is not None
                and Path(first.get("path") or "").suffix.lower() in RASTER_SUFFIXES)
    return False


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_key(segmenter: Segmenter, settings: SceneSettings) -> str:
    """A hash of the checkpoints' bytes, the post-processing and the scene settings."""
    digest = hashlib.sha256()
    for path in segmenter.checkpoint_paths:
        digest.update(_file_digest(Path(path)).encode())
    post = {"post": asdict(segmenter.postprocess), "tta": segmenter.tta, "window": segmenter.window,
            "overlap": segmenter.overlap, "settings": asdict(settings)}
    digest.update(json.dumps(post, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _record_path(out_dir: Path, scene: Path) -> Path:
    return out_dir / DONE / f"{scene.stem}.json"


def _finished(out_dir: Path, scene: Path, key: str) -> dict | None:
    """The scene's record when it is done with this key and its outputs are there."""
    path = _record_path(out_dir, scene)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    stat = scene.stat()
    same = (record.get("run_key") == key and record.get("size") == stat.st_size
            and record.get("mtime_ns") == stat.st_mtime_ns)
    outputs = all((out_dir / record.get(k, "")).is_file() for k in ("mask", "footprints"))
    return record if same and outputs else None


def predict_scenes(segmenter: Segmenter, scenes: list[Path], out_dir: str | Path, settings: SceneSettings,
                   dist: DistInfo = SINGLE_PROCESS, progress: bool = True) -> dict[str, Any]:
    """Predict every scene not yet done (this rank's share); rank 0 writes the merged layer and manifest."""
    out_dir = Path(out_dir)
    stems = [s.stem for s in scenes]
    duplicated = sorted({s for s in stems if stems.count(s) > 1})
    if duplicated:
        raise BuildsegError(f"scene names must be unique (outputs are named after them): {', '.join(duplicated[:5])}")
    if settings.format not in FORMATS:
        raise BuildsegError(f"--format {settings.format!r}: use one of {', '.join(FORMATS)}")
    suffix = FORMATS[settings.format]
    (out_dir / DONE).mkdir(parents=True, exist_ok=True)
    key = run_key(segmenter, settings)
    mine = scenes[dist.rank :: dist.world_size]
    done = skipped = 0
    for k, scene in enumerate(mine, start=1):
        if _finished(out_dir, scene, key):
            skipped += 1
            continue
        started = time.monotonic()
        mask_name, layer_name = f"{scene.stem}_mask.tif", f"{scene.stem}{suffix}"
        result = predict_geotiff(segmenter, scene, out_dir / mask_name, out_dir / layer_name,
                                 GeoTiffSettings(**{f.name: getattr(settings, f.name) for f in fields(GeoTiffSettings)}),
                                 progress=progress)
        stat = scene.stat()
        record = {"scene": str(scene), "run_key": key, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "mask": mask_name, "footprints": layer_name, "n_footprints": result.n_polygons,
                  "crs": result.crs, "seconds": round(time.monotonic() - started, 2)}
        with atomic_open(_record_path(out_dir, scene), "w") as handle:
            handle.write(json.dumps(record))
        done += 1
        if progress:
            log.info("[%d/%d] %s: %d footprints in %.1f s", k, len(mine), scene.name, result.n_polygons, record["seconds"])
    barrier(dist)
    summary = {"predicted": done, "skipped": skipped, "scenes": len(scenes)}
    if dist.is_main:
        summary.update(_merge(out_dir, scenes, key, suffix))
    return summary


def _merge(out_dir: Path, scenes: list[Path], key: str, suffix: str) -> dict[str, Any]:
    """The merged layer (first scene's CRS) and manifest.json, from the per-scene files."""
    import geopandas as gpd
    import pandas as pd

    records = []
    for scene in scenes:
        record = _finished(out_dir, scene, key)
        if record is None:
            raise BuildsegError(f"{scene} has no finished prediction in {out_dir}; run the command again to finish it")
        records.append(record)
    frames, crs = [], None
    for record in records:
        frame = gpd.read_file(out_dir / record["footprints"]) if suffix not in (".parquet",) else \
            gpd.read_parquet(out_dir / record["footprints"])
        crs = crs or frame.crs
        if len(frame):
            frames.append(frame.to_crs(crs) if frame.crs is not None and crs is not None and frame.crs != crs else frame)
    merged = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs) if frames else \
        gpd.GeoDataFrame({"mean_prob": [], "source": []}, geometry=[], crs=crs)
    merged_path = write_footprints(merged, out_dir / f"footprints{suffix}")
    manifest = {"run_key": key, "merged": merged_path.name, "n_footprints": len(merged), "scenes": records}
    with atomic_open(out_dir / "manifest.json", "w") as handle:
        handle.write(json.dumps(manifest, indent=1))
    return {"merged": str(merged_path), "n_footprints": len(merged)}

