"""Predicting many scenes: one mask and one footprint layer per scene, a merged layer, a manifest,
and a re-run that does only what is left.

``buildseg predict --data SCENES --out OUT_DIR`` writes, per scene ``NAME``,
``OUT_DIR/NAME_mask.tif`` (COG) and ``OUT_DIR/NAME.<format>``; when a scene is finished its
record goes to ``OUT_DIR/.buildseg-done/NAME.json`` (atomically, after both outputs are in
place). A re-run skips a scene whose record matches the *run key* (a hash of the checkpoint
files' contents and every setting that changes the outputs), the scene's identity (size and
mtime of a local file, the URL of a remote one) and whose outputs still exist: a killed run
resumes, and a changed checkpoint or setting redoes everything. At the end the merged layer
``OUT_DIR/footprints.<format>`` (all scenes, in the first scene's CRS) and
``OUT_DIR/manifest.json`` are rebuilt from the done-records, in the scenes' order, so they
equal those of an uninterrupted run whichever process predicted which scene.

Pieces of one raster (scenes with a ``window`` and a ``group``: a tile service's area of
interest, ``jobs/tile_service.py``) write their mask COG and their raw footprint parts
(``NAME_parts.parquet``); the merge joins the parts of each group across the pieces' borders
and cleans them as one process would have, keeps the buildings whose centroid lies in the
group's clip area, and writes ``GROUP_mask.vrt``, a mosaic of the pieces' masks.

Who predicts what: under torchrun, scene ``i`` goes to rank ``i % world_size``; with
``shard=(I, N)`` (a batch scheduler's array job) the scenes ``I, I+N, ...``; with the Ray
runner (``runners/ray.py``) a pool of workers takes them largest first. Whoever finishes the
last scene merges; ``merge_outputs`` (``predict --merge OUT_DIR``) merges from the records
alone.
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
from buildseg.data.scene_sources import SceneSource
from buildseg.errors import BuildsegError
from buildseg.footprints.writers import write_footprints
from buildseg.inference.core.checkpoint_info import CheckpointInfo
from buildseg.inference.core.segmenter import Segmenter
from buildseg.inference.jobs.geotiff import GeoResult, GeoTiffSettings, predict_geotiff
from buildseg.settings.inference import LAYER_FORMATS

log = logging.getLogger("buildseg")

DONE = ".buildseg-done"
FORMATS = LAYER_FORMATS  # the layer format's file suffix, by --format name


@dataclass(frozen=True)
class SceneSettings(GeoTiffSettings):
    """The GeoTIFF settings of every scene, plus the footprint layers' format."""

    format: str = "gpkg"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_key(segmenter: Segmenter | CheckpointInfo, settings: SceneSettings) -> str:
    """A hash of the checkpoints' bytes, the post-processing and the scene settings (a
    :class:`CheckpointInfo` gives the same key as the Segmenter built from the same options)."""
    digest = hashlib.sha256()
    for path in segmenter.checkpoint_paths:
        digest.update(_file_digest(Path(path)).encode())
    post = {"post": asdict(segmenter.postprocess), "tta": segmenter.tta, "window": segmenter.window,
            "overlap": segmenter.overlap, "settings": asdict(settings)}
    digest.update(json.dumps(post, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _record_path(out_dir: Path, name: str) -> Path:
    return out_dir / DONE / f"{name}.json"


def _finished(out_dir: Path, scene: SceneSource, key: str) -> dict | None:
    """The scene's record when it is done with this key and its outputs are there."""
    try:
        record = json.loads(_record_path(out_dir, scene.name).read_text())
    except (OSError, ValueError):
        return None
    same = record.get("run_key") == key and all(record.get(k) == v for k, v in scene.identity().items())
    outputs = all((out_dir / record.get(k, "")).is_file() for k in ("mask", "footprints"))
    return record if same and outputs else None


def check_scenes(scenes: list[SceneSource], settings: SceneSettings) -> str:
    """Unique names and a known format; the footprint files' suffix."""
    names = [s.name for s in scenes]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise BuildsegError(f"scene names must be unique (outputs are named after them): {', '.join(duplicated[:5])}")
    if settings.format not in FORMATS:
        raise BuildsegError(f"--format {settings.format!r}: use one of {', '.join(FORMATS)}")
    return FORMATS[settings.format]


def scene_settings(settings: SceneSettings) -> GeoTiffSettings:
    """The GeoTIFF part of the scene settings (what ``predict_geotiff`` takes)."""
    return GeoTiffSettings(**{f.name: getattr(settings, f.name) for f in fields(GeoTiffSettings)})


def scene_outputs(out_dir: Path, scene: SceneSource, settings: SceneSettings) -> tuple[Path, Path]:
    """(mask COG, footprint layer) of a scene in OUT_DIR."""
    return out_dir / f"{scene.name}_mask.tif", out_dir / f"{scene.name}{FORMATS[settings.format]}"


def write_done_record(out_dir: Path, scene: SceneSource, index: int, key: str, result: GeoResult,
                      seconds: float, settings: SceneSettings | None = None) -> dict:
    """The scene's done-record, written atomically once both outputs are in place; the record."""
    record = {"scene": scene.location, "name": scene.name, "index": index, "run_key": key, **scene.identity(),
              "mask": result.mask_path.name, "footprints": result.footprints_path.name,
              "n_footprints": result.n_polygons, "crs": result.crs, "seconds": round(seconds, 2)}
    if result.gaps:
        record["gaps"] = result.gaps
    if scene.group is not None:  # what the merge needs to join and clean this group's parts
        settings = settings or SceneSettings()
        record.update(group=scene.group, pixel_size=result.pixel_size, layer_suffix=FORMATS[settings.format],
                      clip=Path(scene.clip).name if scene.clip else None, clean=asdict(scene_settings(settings)))
    path = _record_path(out_dir, scene.name)
    path.parent.mkdir(parents=True, exist_ok=True)  # made with the first record: a run that fails first leaves none
    with atomic_open(path, "w") as handle:
        handle.write(json.dumps(record))
    return record


def predict_scene(segmenter: Segmenter, scene: SceneSource, index: int, out_dir: Path, settings: SceneSettings,
                  key: str, *, progress: bool = False) -> dict:
    """Predict one scene into OUT_DIR and write its done-record; the record."""
    started = time.monotonic()
    mask_path, layer_path = scene_outputs(out_dir, scene, settings)
    if scene.window is not None:
        from buildseg.inference.jobs.scene_pieces import PARTS, predict_piece_scene

        result = predict_piece_scene(segmenter, scene, mask_path, out_dir / f"{scene.name}{PARTS}",
                                     scene_settings(settings), progress=progress)
    else:
        result = predict_geotiff(segmenter, scene.location, mask_path, layer_path, scene_settings(settings),
                                 progress=progress)
    return write_done_record(out_dir, scene, index, key, result, time.monotonic() - started, settings)


def pending_scenes(scenes: list[SceneSource], out_dir: Path, key: str) -> list[int]:
    """Indices (into ``scenes``) of the scenes without a valid done-record."""
    return [i for i, scene in enumerate(scenes) if _finished(out_dir, scene, key) is None]


def finish(out_dir: Path, scenes: list[SceneSource], key: str, suffix: str) -> dict[str, Any]:
    """Merge when every scene is done; else say how many remain (other shards at work)."""
    remaining = pending_scenes(scenes, out_dir, key)
    if remaining:
        return {"merged": None, "n_footprints": 0, "remaining": len(remaining)}
    return {**_merge(out_dir, [_finished(out_dir, s, key) for s in scenes], key, suffix), "remaining": 0}


def merge_outputs(out_dir: str | Path) -> dict[str, Any]:
    """The merged layer and manifest from OUT_DIR's done-records alone (``predict --merge``),
    for array jobs whose shards finished in any order."""
    out_dir = Path(out_dir)
    paths = sorted((out_dir / DONE).glob("*.json")) if (out_dir / DONE).is_dir() else []
    if not paths:
        raise BuildsegError(f"{out_dir} has no finished scene ({DONE}/ is empty or missing); predict the scenes first")
    records = []
    for path in paths:
        try:
            records.append(json.loads(path.read_text()))
        except ValueError:
            raise BuildsegError(f"{path} is not a done-record (not JSON); delete it and predict its scene again") from None
    keys = sorted({str(r.get("run_key")) for r in records})
    if len(keys) > 1:
        raise BuildsegError(f"{out_dir} holds scenes of {len(keys)} different runs (run keys {', '.join(keys)}); "
                            "predict them again with one checkpoint and one set of settings")
    lost = [r.get("name", "?") for r in records if not all((out_dir / r.get(k, "")).is_file() for k in ("mask", "footprints"))]
    if lost:
        raise BuildsegError(f"{len(lost)} finished scenes in {out_dir} lost their outputs (e.g. {lost[0]}); run predict again")
    records.sort(key=lambda r: (r.get("index", 0), r.get("name", "")))
    suffix = records[0].get("layer_suffix") or Path(records[0]["footprints"]).suffix  # a piece's file holds parts
    return {"scenes": len(records), **_merge(out_dir, records, keys[0], suffix)}


def _merge(out_dir: Path, records: list[dict], key: str, suffix: str) -> dict[str, Any]:
    """The merged layer (first scene's CRS) and manifest.json, from the per-scene files."""
    import geopandas as gpd
    import pandas as pd

    frames, crs, groups = [], None, {}
    for record in records:
        if record.get("group") is not None:
            if record["group"] in groups:
                continue
            groups[record["group"]] = [r for r in records if r.get("group") == record["group"]]
            frame = _join_group(out_dir, record["group"], groups[record["group"]])
        else:
            frame = gpd.read_file(out_dir / record["footprints"]) if suffix not in (".parquet",) else \
                gpd.read_parquet(out_dir / record["footprints"])
        crs = crs or frame.crs
        if len(frame):
            frames.append(frame.to_crs(crs) if frame.crs is not None and crs is not None and frame.crs != crs else frame)
    merged = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs) if frames else \
        gpd.GeoDataFrame({"mean_prob": [], "source": []}, geometry=[], crs=crs)
    merged_path = write_footprints(merged, out_dir / f"footprints{suffix}")
    manifest = {"run_key": key, "merged": merged_path.name, "n_footprints": len(merged), "scenes": records}
    if groups:
        manifest["areas"] = {name: _area_summary(out_dir, name, members) for name, members in groups.items()}
    with atomic_open(out_dir / "manifest.json", "w") as handle:
        handle.write(json.dumps(manifest, indent=1))
    gaps = sum(len(area["gaps"]) for area in manifest.get("areas", {}).values())
    return {"merged": str(merged_path), "n_footprints": len(merged), **({"gaps": gaps} if groups else {})}


def _join_group(out_dir: Path, group: str, records: list[dict]):
    """One raster's footprints from its pieces' parts: joined across the pieces' borders,
    cleaned, and kept where the centroid lies in the clip area."""
    import geopandas as gpd
    from rasterio.crs import CRS

    from buildseg.inference.jobs.geotiff import join_blocks
    from buildseg.inference.jobs.scene_pieces import read_parts

    parts = [block for record in records for block in read_parts(out_dir / record["footprints"])]
    first = records[0]
    clean = {k: v for k, v in first["clean"].items() if k in {f.name for f in fields(GeoTiffSettings)}}
    crs = CRS.from_user_input(first["crs"]) if first.get("crs") else None
    frame = join_blocks(parts, crs=crs, pixel_size=first["pixel_size"], settings=GeoTiffSettings(**clean),
                        source=group)
    if first.get("clip") and len(frame):
        area = gpd.read_file(out_dir / first["clip"]).to_crs(frame.crs).geometry.union_all()
        frame = frame[frame.geometry.centroid.within(area)].reset_index(drop=True)
    return frame


def _area_summary(out_dir: Path, group: str, records: list[dict]) -> dict:
    """A group's mask mosaic (``GROUP_mask.vrt`` over its pieces' COGs) and what its
    ``GROUP.json`` says about it (a tile service's zoom, pixel size, URL)."""
    from buildseg.formats.rasters import mosaic_vrt

    mosaic = out_dir / f"{group}_mask.vrt"
    with atomic_open(mosaic, "w") as handle:
        handle.write(mosaic_vrt([out_dir / r["mask"] for r in records]))
    about = out_dir / f"{group}.json"
    gaps = sorted({tuple(g) for r in records for g in r.get("gaps", [])})
    return {**(json.loads(about.read_text()) if about.is_file() else {}), "mask": mosaic.name, "pieces": len(records),
            "gaps": [list(g) for g in gaps]}
