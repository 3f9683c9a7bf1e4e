"""``predict --runner ray``: many scenes over a pool of Ray workers, each holding one model.

The driver (the ``buildseg predict`` process) lists the scenes that have no valid done-record,
orders them largest first (pixels x bands, from each raster's header) and hands them out
dynamically to an actor pool: a worker that finishes takes the next scene, so one large
scene no longer stalls a static share while others idle. Each worker loads and compiles the
checkpoint once (``Segmenter.from_checkpoint`` in the actor's constructor) and writes exactly
what the local runner writes (``scenes.predict_scene``: mask, footprints, done-record) into
OUT_DIR, which every worker must see (one machine, or a shared file system). When all scenes
are done the driver merges the layer and the manifest as the local runner does, so the
outputs are the same.

A worker that dies (killed, pre-empted, out of memory) is restarted and its scene retried,
up to ``max_retries`` times (Ray's ``max_restarts``/``max_task_retries``); a scene that fails
for a reason of its own (a damaged raster) stops the job with that scene's one-line error.
Workers on GPUs get ``num_gpus`` (one each by default); CPU workers get ``num_cpus`` cores and
that many engine threads, so workers on one machine do not oversubscribe it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildseg.errors import BuildsegError
from buildseg.inference.scene_sources import SceneSource
from buildseg.inference.scenes import DONE, SceneSettings, check_scenes, finish, pending_scenes, predict_scene, run_key
from buildseg.inference.segmenter import Segmenter

log = logging.getLogger("buildseg")
CORES_PER_CPU_WORKER = 2  # default pool on CPUs: one worker per this many cores


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray for the run
    workers: int | None = None  # None: one per GPU, else one per CORES_PER_CPU_WORKER cores
    max_retries: int = 2


class SceneWorker:
    """A Ray actor: one Segmenter for its life, one scene per call."""

    def __init__(self, checkpoints: list[str], options: dict[str, Any], out_dir: str, settings: SceneSettings,
                 key: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.segmenter = Segmenter.from_checkpoint(checkpoints, **{**options, "threads": threads})
        self.out_dir, self.settings, self.key = Path(out_dir), settings, key

    def predict(self, scene: SceneSource, index: int) -> dict:
        """The scene's done-record, or ``{"error": message}`` for a BuildsegError (bad input)."""
        try:
            return predict_scene(self.segmenter, scene, index, self.out_dir, self.settings, self.key)
        except BuildsegError as exc:
            return {"error": str(exc), "name": scene.name}


def scene_sizes(scenes: list[SceneSource]) -> list[tuple[int, float]]:
    """(pixels x bands, area in km² when the CRS is metric else 0) of each scene, from its header."""
    from buildseg.formats.rasters import open_raster

    sizes = []
    for scene in scenes:
        with open_raster(scene.location) as src:
            metric = src.crs is not None and src.crs.is_projected and (src.crs.linear_units or "").startswith("met")
            area = src.width * src.height * abs(src.transform.a * src.transform.e) / 1e6 if metric else 0.0
            sizes.append((src.width * src.height * src.count, area))
    return sizes


def _require_ray():
    try:
        import ray
    except ImportError:
        raise BuildsegError("--runner ray needs Ray: pip install 'buildseg[ray]' (make installs it)") from None
    return ray


def predict_scenes_ray(segmenter: Segmenter, options: dict[str, Any], scenes: list[SceneSource], out_dir: str | Path,
                       settings: SceneSettings, ray_options: RayOptions = RayOptions(), *, progress: bool = True,
                       worker_class: type = SceneWorker) -> dict[str, Any]:
    """Predict the scenes not yet done on a Ray actor pool; merge when all are done.

    ``segmenter`` (loaded in the driver) gives the run key and the checkpoints; ``options``
    are the keywords each worker builds its own from. ``worker_class``: the actor class
    (``SceneWorker`` or a subclass of it)."""
    from tqdm import tqdm

    ray = _require_ray()
    out_dir = Path(out_dir)
    suffix = check_scenes(scenes, settings)
    (out_dir / DONE).mkdir(parents=True, exist_ok=True)
    key = run_key(segmenter, settings)
    todo = pending_scenes(scenes, out_dir, key)
    summary = {"predicted": 0, "skipped": len(scenes) - len(todo), "scenes": len(scenes)}
    if todo:
        sizes = scene_sizes([scenes[i] for i in todo])
        order = [i for _, i in sorted(zip((s[0] for s in sizes), todo), key=lambda t: (-t[0], t[1]))]
        area = dict(zip(todo, (s[1] for s in sizes)))
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=ray_options.address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, **({} if ray_options.address else {"num_cpus": os.cpu_count() or 1}))
        try:
            summary["predicted"] = _run_pool(ray, segmenter, options, scenes, order, area, out_dir, settings, key,
                                             ray_options, worker_class, tqdm, progress)
        finally:
            if started_here:
                ray.shutdown()
    summary.update(finish(out_dir, scenes, key, suffix))
    return summary


def _run_pool(ray, segmenter, options, scenes, order, area, out_dir, settings, key, ray_options, worker_class, tqdm,
              progress) -> int:
    from ray.util import ActorPool

    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    workers = ray_options.workers or (int(gpus) if gpus >= 1 else max(1, int(cpus) // CORES_PER_CPU_WORKER))
    workers = max(1, min(workers, len(order)))
    num_gpus = min(1.0, gpus / workers) if gpus >= 1 else 0.0
    num_cpus = max(1, int(cpus) // workers)
    device = "cuda" if num_gpus else "cpu"
    actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=ray_options.max_retries,
                       max_task_retries=ray_options.max_retries)(worker_class)
    checkpoints = [str(p) for p in segmenter.checkpoint_paths]
    worker_options = {**options, "device": device}
    pool = ActorPool([actor.remote(checkpoints, worker_options, str(out_dir), settings, key, num_cpus)
                      for _ in range(workers)])
    log.info("Ray: %d workers x (%d CPUs, %g GPUs) for %d scenes", workers, num_cpus, num_gpus, len(order))
    started, km2, done = time.monotonic(), 0.0, 0
    bar = tqdm(total=len(order), desc="scenes", unit="scene", disable=not progress)
    try:
        results = pool.map_unordered(lambda a, i: a.predict.remote(scenes[i], i), order)
        while True:
            try:
                record = next(results)
            except StopIteration:
                break
            except ray.exceptions.RayActorError as exc:
                raise BuildsegError(f"a Ray worker died {ray_options.max_retries + 1} times on a scene ({type(exc).__name__}); "
                                    "nothing of that scene was kept: run again (finished scenes are kept), with "
                                    "fewer --ray-workers if it ran out of memory") from None
            if "error" in record:
                raise BuildsegError(record["error"])
            done += 1
            km2 += area.get(record.get("index"), 0.0)
            bar.update(1)
            hours = max(1e-9, (time.monotonic() - started) / 3600)
            bar.set_postfix(km2_per_h=f"{km2 / hours:.1f}")
    finally:
        bar.close()
    return done
