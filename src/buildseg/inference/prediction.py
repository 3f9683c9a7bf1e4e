"""``buildseg predict`` as one library call: what ``--data`` is, which job and which runner.

:func:`run_prediction` takes a :class:`PredictSettings` and routes it: tiles (a CSV or an images
folder) to ``jobs/tiles.py``, one GeoTIFF to ``jobs/geotiff.py``, many scenes to the local
runner (one process, torchrun's ranks, or an array job's shard) or to Ray; ``--merge`` needs
no model at all. Every input is checked before a model loads or a file is written. Returns a
:class:`PredictOutcome` that the CLI prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildseg.errors import BuildsegError
from buildseg.outputs import FILE, FOLDER, check_outputs
from buildseg.settings.inference import LAYER_FORMATS
from buildseg.settings.predict import GEOTIFF, SCENES, SERVICE, TILES, PredictSettings

if TYPE_CHECKING:
    from buildseg.inference.core.segmenter import Segmenter


@dataclass
class PredictOutcome:
    kind: str  # TILES, GEOTIFF, SCENES or "merge"
    is_main: bool = True  # the process that reports (rank 0 under torchrun)
    summary: dict[str, Any] = field(default_factory=dict)  # many scenes and merge
    geo: Any = None  # GeoResult of one GeoTIFF
    stats: Any = None  # PredictStats of tiles
    engine: str = ""  # tiles: what predicted, for --profile
    precision: str = ""
    device_type: str = "cpu"
    conflation: dict[str, Any] | None = None  # --existing: counts and the files written
    overview: Path | None = None  # the picture of what was found (jobs/overview.py)


def input_kind(data: str) -> str:
    """TILES, GEOTIFF (one raster: a path or URL ending .tif/.tiff) or SCENES (a folder or
    list of GeoTIFFs, or STAC)."""
    from buildseg.data.scene_sources import is_scene_collection
    from buildseg.formats.locations import is_remote, location_suffix
    from buildseg.formats.tile_services import is_tile_template

    if is_tile_template(data):
        return SERVICE
    if location_suffix(data) in (".tif", ".tiff") and (is_remote(data) or Path(data).is_file()):
        return GEOTIFF
    return SCENES if is_scene_collection(data) else TILES


def geotiff_settings(settings: PredictSettings, trained: dict, *, scenes: bool = False):
    """The GeoTIFF job's settings; GSD and bands default to what the checkpoint was trained
    on (``trained``: its ``input`` record)."""
    from buildseg.inference.jobs.geotiff import GeoTiffSettings
    from buildseg.inference.jobs.scenes import SceneSettings

    gsd = None if settings.native_resolution else settings.gsd or trained.get("gsd")
    values = dict(block=settings.block, simplify=settings.simplify, stretch=settings.stretch, gsd=gsd,
                  bands=settings.bands or trained.get("bands"), min_area_m2=settings.min_area_m2,
                  regularize=settings.regularize, allow_gaps=settings.allow_gaps)
    if scenes:
        return SceneSettings(**values, format=settings.format or next(iter(LAYER_FORMATS)))
    return GeoTiffSettings(**values)


def run_prediction(settings: PredictSettings) -> PredictOutcome:
    """Check everything ``settings`` names, then predict (or merge); then ``--existing``."""
    existing = None
    if settings.existing:
        from buildseg.footprints.conflation import read_existing

        existing = read_existing(settings.existing, settings.existing_layer)  # a bad file fails before any work
    outcome = _predict(settings)
    layer = (outcome.geo.footprints_path if outcome.geo is not None else None) or outcome.summary.get("merged")
    if not (outcome.is_main and layer and not outcome.summary.get("remaining")):
        return outcome
    frames: dict = {}
    if existing is not None:
        from buildseg.footprints.conflation import ConflationRule
        from buildseg.inference.jobs.conflate import conflate_layer

        rule = ConflationRule(match_iou=settings.match_iou, match_overlap=settings.match_overlap)
        outcome.conflation = conflate_layer(Path(layer), existing, rule=rule, only_new=settings.only_new,
                                            masks=_mask_paths(outcome, Path(layer).parent), frames_out=frames)
    if outcome.kind != "merge":
        outcome.overview = _overview(settings, outcome, Path(layer), frames)
    return outcome


def _overview(settings: PredictSettings, outcome: PredictOutcome, layer: Path, frames: dict) -> Path | None:
    """``overview.png`` of the run (``jobs/overview.py``): the imagery that was read, with the
    footprints by status. A picture that cannot be drawn is a warning, never a failed run."""
    import logging

    from buildseg.inference.jobs.conflate import read_layer
    from buildseg.inference.jobs.overview import FOUND, write_overview

    if outcome.geo is not None:
        rasters, out = [settings.data], Path(outcome.geo.mask_path).with_name(f"{Path(outcome.geo.mask_path).stem}_overview.png")
    elif "area" in outcome.summary:
        rasters, out = [str(layer.parent / "aoi.vrt")], layer.parent / "overview.png"
    else:
        manifest = json.loads((layer.parent / "manifest.json").read_text())
        rasters, out = [r["scene"] for r in manifest.get("scenes", []) if r.get("scene")], layer.parent / "overview.png"
    try:
        return write_overview(rasters, frames or {FOUND: read_layer(layer)}, out)
    except Exception as exc:  # noqa: BLE001 - the run's outputs are written; the picture is a convenience
        logging.getLogger("buildseg").warning("overview picture not written (%s: %s)", type(exc).__name__,
                                              (str(exc).strip().splitlines() or [""])[0][:200])
        return None


def _mask_paths(outcome: PredictOutcome, folder: Path) -> list[Path]:
    """The mask rasters the footprints came from: one GeoTIFF's, or a scene folder's manifest's."""
    if outcome.geo is not None:
        return [Path(outcome.geo.mask_path)]
    manifest = json.loads((folder / "manifest.json").read_text())
    return [folder / record["mask"] for record in manifest.get("scenes", []) if record.get("mask")]


def _predict(settings: PredictSettings) -> PredictOutcome:
    if settings.merge:
        from buildseg.inference.jobs.scenes import merge_outputs

        return PredictOutcome("merge", summary=merge_outputs(settings.merge))
    kind = input_kind(settings.data)
    settings.check_input(kind)
    check_outputs((settings.out, "--out", FOLDER if kind in (SCENES, SERVICE) else FILE),
                  (settings.masks_dir, "--masks-dir", FOLDER), (settings.overlays_dir, "--overlays-dir", FOLDER),
                  (settings.footprints, "--footprints", FILE), (settings.geojson, "--geojson", FILE))
    if kind == SCENES:
        from buildseg.data.scene_sources import check_sources, list_scene_sources

        scenes = list_scene_sources(settings.data, settings.stac_asset)
        check_sources(scenes)  # unreachable or missing scenes stop here: no model loaded, nothing written
        if settings.runner == "ray":
            return _scenes_on_ray(settings, scenes)
        return _with_model(settings, kind, scenes=scenes)
    if kind == SERVICE:
        from buildseg.inference.core.checkpoint_info import CheckpointInfo
        from buildseg.inference.jobs.tile_service import plan_area

        trained = CheckpointInfo.read(settings.checkpoint, **settings.segmenter_options()).input  # no model yet
        scenes, about = plan_area(settings, trained_gsd=trained.get("gsd"))  # a bad AOI or service: before any write
        settings = replace(settings, native_resolution=True)  # the zoom was chosen for the GSD: its tiles' own pixels
        outcome = _scenes_on_ray(settings, scenes) if settings.runner == "ray" else \
            _with_model(settings, SCENES, scenes=scenes)
        outcome.summary["area"] = {**about, "pieces": len(scenes)}
        return outcome
    records = None
    if kind == TILES:
        from buildseg.formats.tables import load_records

        records = load_records(settings.data)  # bad data fails before the models load
        if settings.gsd or settings.gsd_estimate:
            _check_tiles_gsd(settings)
    return _with_model(settings, kind, records=records)


def _check_tiles_gsd(settings: PredictSettings) -> None:
    """``--gsd`` and ``--gsd-estimate`` on tiles need a model that records its own GSD, the
    latter one with a scale head too; told before any model loads."""
    from buildseg.inference.core.checkpoint_info import CheckpointInfo
    from buildseg.runtime.checkpoint import load_checkpoint

    flag = f"--gsd {settings.gsd:g}" if settings.gsd else "--gsd-estimate"
    if not CheckpointInfo.read(settings.checkpoint, **settings.segmenter_options()).input.get("gsd"):
        raise BuildsegError(f"{flag} on tiles resamples them to the model's GSD, but {settings.checkpoint[0]} does not "
                            f"record one (a run trained without --gsd); drop {flag.split()[0]}")
    if settings.gsd_estimate and not settings.gsd and any(
            "scale" not in (load_checkpoint(c)["model_card"].get("image_outputs") or []) for c in settings.checkpoint):
        raise BuildsegError(f"--gsd-estimate needs a model with a scale head (--model buildings, 1.1 or later); "
                            f"{settings.checkpoint[0]} has none: give the tiles' --gsd, or drop --gsd-estimate")


def _scenes_on_ray(settings: PredictSettings, scenes) -> PredictOutcome:
    """Ray and its workers start first; the driver reads the checkpoints' description (no
    model, no torch) while they do."""
    from buildseg.inference.core.checkpoint_info import CheckpointInfo
    from buildseg.inference.runners.ray import predict_scenes_ray
    from buildseg.inference.runners.ray_workers import RayOptions, RayWorkers

    split = {} if settings.ray_split_megapixels is None else {"split_megapixels": settings.ray_split_megapixels}
    ray_options = RayOptions(address=settings.ray_address, workers=settings.ray_workers,
                             max_retries=settings.max_retries, **split)
    options = settings.segmenter_options()
    workers = RayWorkers.start(ray_options, settings.checkpoint, options, most=len(scenes))
    try:
        info = CheckpointInfo.read(settings.checkpoint, **options)
        summary = predict_scenes_ray(info, options, scenes, settings.out, geotiff_settings(settings, info.input,
                                     scenes=True), ray_options, progress=settings.progress, workers=workers)
    finally:
        workers.close()
    return PredictOutcome(SCENES, summary=summary)


def _with_model(settings: PredictSettings, kind: str, *, scenes=None, records=None) -> PredictOutcome:
    """The jobs that load the model in this process (under torchrun: on every rank)."""
    from buildseg.distributed import cleanup, init_distributed

    dist = init_distributed(settings.device)
    device = str(dist.device) if dist.device.type == "cuda" else settings.device  # each rank on its LOCAL_RANK GPU
    try:
        segmenter = _segmenter_for_job(settings, {**settings.segmenter_options(), "device": device}, kind=kind,
                                       records=records, scenes=scenes)
        outcome = PredictOutcome(kind, is_main=dist.is_main, engine=segmenter.engine, precision=segmenter.precision,
                                 device_type=segmenter.device.type)
        if kind == SCENES:
            from buildseg.inference.runners.local import predict_scenes

            outcome.summary = predict_scenes(segmenter, scenes, settings.out,
                                             geotiff_settings(settings, segmenter.input, scenes=True), dist,
                                             progress=settings.progress, shard=settings.shard or (0, 1))
        elif kind == GEOTIFF:
            from buildseg.inference.jobs.geotiff import predict_geotiff

            outcome.geo = predict_geotiff(segmenter, settings.data, settings.out, settings.footprints or settings.geojson,
                                          geotiff_settings(settings, segmenter.input), progress=settings.progress)
        else:
            outcome.stats = _tiles(settings, segmenter, records, dist)
    finally:
        cleanup(dist)
    return outcome


def _segmenter_for_job(settings: PredictSettings, options: dict, *, kind: str, records, scenes) -> Segmenter:
    """The model with the one-off optimisations (ONNX export, int8 at first use) this job's
    size pays for (``jobs/first_use.py``). Calibration tiles: the tiles of a CSV or folder,
    else windows of the (first) scene."""
    from buildseg.inference.core.checkpoint_info import CheckpointInfo
    from buildseg.inference.jobs import job_size
    from buildseg.inference.jobs.first_int8 import FIRST_USE_TILES, tile_sampler
    from buildseg.inference.jobs.first_use import segmenter_for_job
    from buildseg.inference.jobs.geotiff import MARGIN, plan_scene, sample_windows

    location = scenes[0].location if scenes else settings.data

    def plan(where: str):
        info = CheckpointInfo.read(settings.checkpoint)
        return plan_scene(info, where, geotiff_settings(settings, info.input))

    def job_tiles() -> float:
        if records is not None:
            return job_size.records_tiles(records)
        overhead = job_size.scene_overhead(block=settings.block, margin=MARGIN, window=settings.window,
                                           overlap=settings.overlap)
        if scenes is not None:
            return job_size.scenes_tiles(scenes, lambda scene: plan(scene.location).grid, overhead=overhead)
        grid = plan(location).grid
        return job_size.tiles_of_pixels(overhead * grid.height * grid.width)

    def scene_sampler(checkpoint: Path) -> list:
        return sample_windows(plan(location), FIRST_USE_TILES)

    return segmenter_for_job(settings.checkpoint, options, job_tiles=job_tiles,
                             sample=tile_sampler(records) if records is not None else scene_sampler)


def _tiles(settings: PredictSettings, segmenter, records, dist):
    from buildseg.inference.jobs.tile_layers import TILE_LAYERS
    from buildseg.inference.jobs.tiles import predict_records

    layer = TILE_LAYERS[settings.format](settings.out) if settings.format in TILE_LAYERS else None
    _, stats = predict_records(segmenter, records, None if layer else settings.out, batch_size=settings.batch_size,
                               num_workers=settings.num_workers, masks_dir=settings.masks_dir,
                               overlays_dir=settings.overlays_dir, skip_bad=settings.skip_bad,
                               progress=settings.progress and dist.is_main, dist=dist, layer=layer,
                               tile_gsd=settings.gsd, gsd_estimate=settings.gsd_estimate)
    return stats
