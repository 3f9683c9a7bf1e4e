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
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildseg.data.scene_sources import SceneSource
from buildseg.errors import BuildsegError
from buildseg.inference.core.checkpoint_info import CheckpointInfo
from buildseg.inference.core.segmenter import Segmenter
from buildseg.inference.jobs.geotiff import ScenePlan, plan_scene
from buildseg.inference.jobs.scene_pieces import PIECES, Piece, PieceResult, split_scene
from buildseg.inference.jobs.scenes import DONE, SceneSettings, check_scenes, finish, pending_scenes, run_key, scene_settings
from buildseg.inference.runners.ray_workers import PIECE_MEGAPIXELS, Job, RayOptions, RayWorkers, SceneWorker, require_ray

log = logging.getLogger("buildseg")
HEADER_THREADS = 16  # scene headers read at once before the run (remote ones are a round trip each)
__all__ = ["RayOptions", "SceneWorker", "predict_scenes_ray", "scene_sizes"]


def scene_sizes(scenes: list[SceneSource], *, threads: int = HEADER_THREADS) -> list[tuple[int, float, int]]:
    """(pixels x bands, area in km² when the CRS is metric else 0, pixels) of each scene, from
    its header; ``threads`` headers at a time (remote headers are a round trip each)."""
    with ThreadPoolExecutor(max(1, min(threads, len(scenes)))) as pool:
        return list(pool.map(_scene_size, scenes))


def _scene_size(scene: SceneSource) -> tuple[int, float, int]:
    from buildseg.formats.rasters import open_raster

    with open_raster(scene.location) as src:
        metric = src.crs is not None and src.crs.is_projected and (src.crs.linear_units or "").startswith("met")
        height, width = (src.height, src.width) if scene.window is None else scene.window[2:]  # a piece: its window
        area = width * height * abs(src.transform.a * src.transform.e) / 1e6 if metric else 0.0
        return width * height * src.count, area, width * height


def predict_scenes_ray(segmenter: Segmenter | CheckpointInfo, options: dict[str, Any], scenes: list[SceneSource], out_dir: str | Path,
                       settings: SceneSettings, ray_options: RayOptions | None = None, *, progress: bool = True,
                       worker_class: type = SceneWorker, workers: RayWorkers | None = None) -> dict[str, Any]:
    """Predict the scenes not yet done on a Ray actor pool; merge when all are done.

    ``segmenter`` (a :class:`CheckpointInfo` in the driver: no model needed there) gives the
    run key, the checkpoints and the channel count; ``options``
    are the keywords each worker builds its own from. ``worker_class``: the actor class
    (``SceneWorker`` or a subclass of it). ``workers``: a pool already starting
    (``RayWorkers.start``, as ``buildseg predict`` does before it loads its own model); its
    owner closes it. Without one, a pool is started here (while the scenes' headers are
    read) and closed at the end."""
    from tqdm import tqdm

    ray_options = ray_options or RayOptions()
    out_dir = Path(out_dir).resolve()  # the workers' processes may start in another folder
    suffix = check_scenes(scenes, settings)
    (out_dir / DONE).mkdir(parents=True, exist_ok=True)
    key = run_key(segmenter, settings)
    todo = pending_scenes(scenes, out_dir, key)
    summary = {"predicted": 0, "skipped": len(scenes) - len(todo), "scenes": len(scenes)}
    if todo:
        own = workers is None
        with ThreadPoolExecutor(1) as headers:  # the headers (HTTP range reads for remote scenes) while Ray starts
            sizes_read = headers.submit(scene_sizes, [scenes[i] for i in todo])
            if own:
                require_ray()
                workers = RayWorkers.start(ray_options, [str(p) for p in segmenter.checkpoint_paths], options,
                                           most=len(todo), worker_class=worker_class)
        try:
            sizes = sizes_read.result()
            order = [i for _, i in sorted(zip((s[0] for s in sizes), todo), key=lambda t: (-t[0], t[1]))]
            pixels = dict(zip(todo, (s[2] for s in sizes)))
            area = dict(zip(todo, (s[1] for s in sizes)))
            summary["predicted"] = _run_pool(workers, segmenter, scenes, order, pixels, area, Job(str(out_dir), settings, key),
                                             ray_options, tqdm, progress)
        finally:
            if own:
                workers.close()
    summary.update(finish(out_dir, scenes, key, suffix))
    return summary


@dataclass
class _Split:
    """A scene in pieces on the pool: its plan and the pieces back so far."""

    plan: ScenePlan
    pieces: list[Piece]
    done: list[PieceResult]


def _tasks(segmenter: Segmenter | CheckpointInfo, scenes, order, pixels: dict[int, int], settings: SceneSettings,
           split_pixels: int | None, piece_pixels: int | None):
    """(tasks largest first, splits): a task is ("scene", i) or ("piece", i, piece); only
    scenes above ``split_pixels`` are planned here (their header and stretch read once)."""
    tasks, splits = [], {}
    for i in order:
        if split_pixels is not None and pixels[i] > split_pixels and scenes[i].window is None:  # not a piece already
            plan = plan_scene(segmenter, scenes[i].location, scene_settings(settings))
            pieces = split_scene(plan, piece_pixels)
            if len(pieces) > 1:
                splits[i] = _Split(plan, pieces, [])
                tasks += [(p.height * p.width, ("piece", i, p)) for p in pieces]
                continue
        tasks.append((pixels[i], ("scene", i)))
    tasks.sort(key=lambda t: -t[0])  # stable: ties keep the scenes' order
    return deque(task for _, task in tasks), splits


def _run_pool(workers: RayWorkers, segmenter, scenes, order, pixels, area, job: Job, ray_options, tqdm,
              progress) -> int:
    from ray.util import ActorPool

    ray, settings = workers.ray, job.settings
    split_pixels = ray_options.split_pixels(sum(pixels.values()), workers.wanted)
    piece_pixels = split_pixels if ray_options.split_megapixels else int(PIECE_MEGAPIXELS * 1e6)
    queue, splits = _tasks(segmenter, scenes, order, pixels, settings, split_pixels, piece_pixels)
    workers.fit(len(queue))
    pool = ActorPool(list(workers.actors))
    log.info("Ray: %d workers x (%d CPUs, %g GPUs) for %d scenes (%d split into %d pieces)", len(workers.actors),
             workers.num_cpus, workers.num_gpus, len(order), len(splits), sum(len(s.pieces) for s in splits.values()))

    def submit(task) -> None:
        if task[0] == "scene":
            pool.submit(lambda a, t: a.predict.remote(scenes[t[1]], t[1], job), task)
        elif task[0] == "piece":
            pool.submit(lambda a, t: a.piece.remote(splits[t[1]].plan, t[2], t[1], job), task)
        else:
            pool.submit(lambda a, t: a.assemble.remote(scenes[t[1]], t[1], splits[t[1]].plan, splits[t[1]].done, job),
                        task)

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
    shutil.rmtree(Path(job.out_dir) / PIECES, ignore_errors=True)
    return done
