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

A scene above ``split_pixels`` is cut into pieces of whole blocks (``scene_pieces.py``):
the pieces go out like scenes, and when the last one is in, one worker assembles the
scene's mask and footprints (ahead of any scene still waiting, so finished pieces do not
sit on disk); the outputs equal the one-process path's.

A worker that dies (killed, pre-empted, out of memory) is restarted and its task retried,
up to ``max_retries`` times (Ray's ``max_restarts``/``max_task_retries``); a scene that fails
for a reason of its own (a damaged raster) stops the job with that scene's one-line error.
Workers on GPUs get ``num_gpus`` (one each by default); CPU workers get ``num_cpus`` cores and
that many engine threads, so workers on one machine do not oversubscribe it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildseg.errors import BuildsegError
from buildseg.inference.geotiff import ScenePlan, plan_scene
from buildseg.inference.scene_pieces import PIECES, Piece, PieceResult, assemble_scene, predict_piece, split_scene
from buildseg.inference.scene_sources import SceneSource
from buildseg.inference.scenes import (
    DONE,
    SceneSettings,
    check_scenes,
    finish,
    pending_scenes,
    predict_scene,
    run_key,
    scene_outputs,
    scene_settings,
    write_done_record,
)
from buildseg.inference.segmenter import Segmenter

log = logging.getLogger("buildseg")
CORES_PER_CPU_WORKER = 2  # default pool on CPUs: one worker per this many cores
PIECE_MEGAPIXELS = 64.0  # pieces of a split scene: about 8192 px squares (whole 2048 px blocks)
SHARE_PARTS = 4  # auto: a scene is split when it is over a quarter of one worker's share of the pixels


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray for the run
    workers: int | None = None  # None: one per GPU, else one per CORES_PER_CPU_WORKER cores
    max_retries: int = 2
    split_megapixels: float | None = None  # split scenes above this into pieces this size; None: auto; 0: never

    def split_pixels(self, total_pixels: int, workers: int) -> int | None:
        """The size above which a scene is cut into pieces (and the pieces' size); None: never.

        Auto: a scene over a quarter of one worker's share of all the pixels would hold up
        the end of the job, so scenes above max(64 Mpx, total / workers / 4) are split into
        64 Mpx pieces; a mosaic of many tiles is left whole (no assembly to pay), one
        50,000 px scene is shared out."""
        if self.split_megapixels is not None:
            return int(self.split_megapixels * 1e6) if self.split_megapixels > 0 else None
        return int(max(PIECE_MEGAPIXELS * 1e6, total_pixels / max(1, workers) / SHARE_PARTS))


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

    def piece(self, plan: ScenePlan, piece: Piece, index: int) -> dict:
        """One piece of a split scene: ``{"index", "piece": PieceResult}``, or an error."""
        try:
            return {"index": index, "piece": predict_piece(self.segmenter, plan, piece, self.out_dir)}
        except BuildsegError as exc:
            return {"error": str(exc), "name": plan.name}

    def assemble(self, scene: SceneSource, index: int, plan: ScenePlan, pieces: list[PieceResult]) -> dict:
        """A split scene's mask, footprints and done-record from all its pieces; the record."""
        started = time.monotonic()
        try:
            mask_path, layer_path = scene_outputs(self.out_dir, scene, self.settings)
            result = assemble_scene(plan, pieces, mask_path, layer_path, scene_settings(self.settings))
        except BuildsegError as exc:
            return {"error": str(exc), "name": scene.name}
        seconds = time.monotonic() - started + sum(p.seconds for p in pieces)  # worker time, as for a whole scene
        return write_done_record(self.out_dir, scene, index, self.key, result, seconds)


def scene_sizes(scenes: list[SceneSource]) -> list[tuple[int, float, int]]:
    """(pixels x bands, area in km² when the CRS is metric else 0, pixels) of each scene, from its header."""
    from buildseg.formats.rasters import open_raster

    sizes = []
    for scene in scenes:
        with open_raster(scene.location) as src:
            metric = src.crs is not None and src.crs.is_projected and (src.crs.linear_units or "").startswith("met")
            area = src.width * src.height * abs(src.transform.a * src.transform.e) / 1e6 if metric else 0.0
            sizes.append((src.width * src.height * src.count, area, src.width * src.height))
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
        pixels = dict(zip(todo, (s[2] for s in sizes)))
        area = dict(zip(todo, (s[1] for s in sizes)))
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=ray_options.address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, **({} if ray_options.address else {"num_cpus": os.cpu_count() or 1}))
        try:
            summary["predicted"] = _run_pool(ray, segmenter, options, scenes, order, pixels, area, out_dir, settings,
                                             key, ray_options, worker_class, tqdm, progress)
        finally:
            if started_here:
                ray.shutdown()
    summary.update(finish(out_dir, scenes, key, suffix))
    return summary


@dataclass
class _Split:
    """A scene in pieces on the pool: its plan and the pieces back so far."""

    plan: ScenePlan
    pieces: list[Piece]
    done: list[PieceResult]


def _tasks(segmenter: Segmenter, scenes, order, pixels: dict[int, int], settings: SceneSettings,
           split_pixels: int | None, piece_pixels: int | None):
    """(tasks largest first, splits): a task is ("scene", i) or ("piece", i, piece); only
    scenes above ``split_pixels`` are planned here (their header and stretch read once)."""
    tasks, splits = [], {}
    for i in order:
        if split_pixels is not None and pixels[i] > split_pixels:
            plan = plan_scene(segmenter, scenes[i].location, scene_settings(settings))
            pieces = split_scene(plan, piece_pixels)
            if len(pieces) > 1:
                splits[i] = _Split(plan, pieces, [])
                tasks += [(p.height * p.width, ("piece", i, p)) for p in pieces]
                continue
        tasks.append((pixels[i], ("scene", i)))
    tasks.sort(key=lambda t: -t[0])  # stable: ties keep the scenes' order
    return deque(task for _, task in tasks), splits


def _run_pool(ray, segmenter, options, scenes, order, pixels, area, out_dir, settings, key, ray_options, worker_class,
              tqdm, progress) -> int:
    from ray.util import ActorPool

    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    workers = ray_options.workers or (int(gpus) if gpus >= 1 else max(1, int(cpus) // CORES_PER_CPU_WORKER))
    split_pixels = ray_options.split_pixels(sum(pixels.values()), workers)
    piece_pixels = split_pixels if ray_options.split_megapixels else int(PIECE_MEGAPIXELS * 1e6)
    queue, splits = _tasks(segmenter, scenes, order, pixels, settings, split_pixels, piece_pixels)
    workers = max(1, min(workers, len(queue)))
    num_gpus = min(1.0, gpus / workers) if gpus >= 1 else 0.0
    num_cpus = max(1, int(cpus) // workers)
    device = "cuda" if num_gpus else "cpu"
    actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=ray_options.max_retries,
                       max_task_retries=ray_options.max_retries)(worker_class)
    checkpoints = [str(p) for p in segmenter.checkpoint_paths]
    worker_options = {**options, "device": device}
    pool = ActorPool([actor.remote(checkpoints, worker_options, str(out_dir), settings, key, num_cpus)
                      for _ in range(workers)])
    log.info("Ray: %d workers x (%d CPUs, %g GPUs) for %d scenes (%d split into %d pieces)", workers, num_cpus,
             num_gpus, len(order), len(splits), sum(len(s.pieces) for s in splits.values()))

    def submit(task) -> None:
        if task[0] == "scene":
            pool.submit(lambda a, t: a.predict.remote(scenes[t[1]], t[1]), task)
        elif task[0] == "piece":
            pool.submit(lambda a, t: a.piece.remote(splits[t[1]].plan, t[2], t[1]), task)
        else:
            pool.submit(lambda a, t: a.assemble.remote(scenes[t[1]], t[1], splits[t[1]].plan, splits[t[1]].done), task)

    started, km2, done = time.monotonic(), 0.0, 0
    bar = tqdm(total=len(order), desc="scenes", unit="scene", disable=not progress)
    try:
        while queue or pool.has_next():
            while queue and pool.has_free():
                submit(queue.popleft())
            try:
                reply = pool.get_next_unordered()
            except ray.exceptions.RayActorError as exc:
                raise BuildsegError(f"a Ray worker died {ray_options.max_retries + 1} times on a scene ({type(exc).__name__}); "
                                    "nothing of that scene was kept: run again (finished scenes are kept), with "
                                    "fewer --ray-workers if it ran out of memory") from None
            if "error" in reply:
                raise BuildsegError(reply["error"])
            if "piece" in reply:
                split = splits[reply["index"]]
                split.done.append(reply["piece"])
                if len(split.done) == len(split.pieces):
                    queue.appendleft(("assemble", reply["index"]))  # ahead of waiting scenes: frees its pieces' disk
                continue
            done += 1
            km2 += area.get(reply.get("index"), 0.0)
            bar.update(1)
            hours = max(1e-9, (time.monotonic() - started) / 3600)
            bar.set_postfix(km2_per_h=f"{km2 / hours:.1f}")
    finally:
        bar.close()
    shutil.rmtree(out_dir / PIECES, ignore_errors=True)
    return done
