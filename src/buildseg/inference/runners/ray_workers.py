"""The Ray side of ``predict --runner ray``: the options, the worker actor and the pool's start.

This module imports nothing heavy at the top (no torch, no rasterio), so that the
``buildseg predict`` driver can start Ray and its workers first and load its own copy of
the model while the workers load theirs: on a small machine the two starts overlap instead
of adding up (benchmarks/README.md, "Ray's overhead"). The scheduling is ``ray_runner.py``'s.

A worker holds one Segmenter for its life (``Segmenter.from_checkpoint`` in the actor's
constructor: loaded and compiled once, not per scene); what to write where comes with each
call (a :class:`Job`), so a worker that Ray restarts after a crash, which runs only the
constructor again, needs nothing else.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildseg.errors import BuildsegError
from buildseg.runtime import packaged
from buildseg.settings.predict import MAX_RETRIES

if TYPE_CHECKING:
    from buildseg.data.scene_sources import SceneSource
    from buildseg.inference.jobs.geotiff import ScenePlan
    from buildseg.inference.jobs.scene_pieces import Piece, PieceResult
    from buildseg.inference.jobs.scenes import SceneSettings

log = logging.getLogger("buildseg")
CORES_PER_CPU_WORKER = 2  # default pool on CPUs: one worker per this many cores
PIECE_MEGAPIXELS = 64.0  # pieces of a split scene: about 8192 px squares (whole 2048 px blocks)
SHARE_PARTS = 4  # auto: a scene is split when it is over a quarter of one worker's share of the pixels


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray for the run
    workers: int | None = None  # None: one per GPU, else one per CORES_PER_CPU_WORKER cores
    max_retries: int = MAX_RETRIES
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


@dataclass(frozen=True)
class Job:
    """Where a worker writes and under which run key: sent with every call."""

    out_dir: str
    settings: SceneSettings
    key: str


class SceneWorker:
    """A Ray actor: one Segmenter for its life, one scene (or piece, or assembly) per call."""

    def __init__(self, checkpoints: list[str], options: dict[str, Any], threads: int) -> None:
        import torch

        from buildseg.inference.core.segmenter import Segmenter

        torch.set_num_threads(threads)
        self.segmenter = Segmenter.from_checkpoint(checkpoints, **{**options, "threads": threads})

    def ready(self) -> int:
        """The worker's process id, once its model is loaded."""
        return os.getpid()

    def predict(self, scene: SceneSource, index: int, job: Job) -> dict:
        """The scene's done-record, or ``{"error": message}`` for a BuildsegError (bad input)."""
        from buildseg.inference.jobs.scenes import predict_scene

        try:
            return predict_scene(self.segmenter, scene, index, Path(job.out_dir), job.settings, job.key)
        except BuildsegError as exc:
            return {"error": str(exc), "name": scene.name}

    def piece(self, plan: ScenePlan, piece: Piece, index: int, job: Job) -> dict:
        """One piece of a split scene: ``{"index", "piece": PieceResult}``, or an error."""
        from buildseg.inference.jobs.scene_pieces import predict_piece

        try:
            return {"index": index, "piece": predict_piece(self.segmenter, plan, piece, Path(job.out_dir))}
        except BuildsegError as exc:
            return {"error": str(exc), "name": plan.name}

    def assemble(self, scene: SceneSource, index: int, plan: ScenePlan, pieces: list[PieceResult], job: Job) -> dict:
        """A split scene's mask, footprints and done-record from all its pieces; the record."""
        from buildseg.inference.jobs.scene_pieces import assemble_scene
        from buildseg.inference.jobs.scenes import scene_outputs, scene_settings, write_done_record

        started = time.monotonic()
        out_dir = Path(job.out_dir)
        try:
            mask_path, layer_path = scene_outputs(out_dir, scene, job.settings)
            result = assemble_scene(plan, pieces, mask_path, layer_path, scene_settings(job.settings))
        except BuildsegError as exc:
            return {"error": str(exc), "name": scene.name}
        seconds = time.monotonic() - started + sum(p.seconds for p in pieces)  # worker time, as for a whole scene
        return write_done_record(out_dir, scene, index, job.key, result, seconds)


def require_ray():
    try:
        import ray
    except ImportError:
        raise BuildsegError("--runner ray needs Ray: pip install 'buildseg[ray]' (make installs it)") from None
    return ray


class RayWorkers:
    """The pool's actors, started as soon as the checkpoints and options are known.

    ``start`` connects to (or starts) Ray and creates ``min(wanted, most)`` actors, which
    load their models in the background, each with an equal share of the cluster's CPUs (or
    GPUs); ``fit(tasks)`` stops the actors beyond the task count, and when a job has more
    tasks than actors (a split scene's pieces) and fewer actors than wanted, it starts the
    wanted number afresh with smaller shares. ``close`` stops them, and Ray when it was
    started here. A context manager."""

    def __init__(self, ray, ray_options: RayOptions, worker_class: type, paths: list[str], options: dict[str, Any],
                 started_here: bool) -> None:
        self.ray, self.ray_options, self.worker_class = ray, ray_options, worker_class
        self.paths, self.options, self.started_here = paths, options, started_here
        resources = ray.cluster_resources()
        self.gpus, self.cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        self.wanted = ray_options.workers or (int(self.gpus) if self.gpus >= 1
                                              else max(1, int(self.cpus) // CORES_PER_CPU_WORKER))
        self.actors: list = []
        self.num_cpus, self.num_gpus = 1, 0.0

    @classmethod
    def start(cls, ray_options: RayOptions, checkpoints: list[str], options: dict[str, Any], *, most: int,
              worker_class: type = SceneWorker) -> RayWorkers:
        ray = require_ray()
        started_here = not ray.is_initialized()
        if started_here:
            began = time.monotonic()
            ray.init(address=ray_options.address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, **({} if ray_options.address else {"num_cpus": os.cpu_count() or 1}))
            log.info("Ray started in %.1f s", time.monotonic() - began)
        try:
            # workers may start in another folder: paths absolute; a packaged model's spec as it is
            paths = [c if packaged.name_of(str(c)) else str(Path(c).resolve()) for c in checkpoints]
            workers = cls(ray, ray_options, worker_class, paths, options, started_here)
            workers._spawn(max(1, min(workers.wanted, most)))
        except BaseException:
            if started_here:
                ray.shutdown()
            raise
        return workers

    def _spawn(self, count: int) -> None:
        """``count`` fresh actors, each with 1/count of the CPUs (or GPUs)."""
        self.num_gpus = min(1.0, self.gpus / count) if self.gpus >= 1 else 0.0
        self.num_cpus = max(1, int(self.cpus) // count)
        actor_class = self.ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                      max_restarts=self.ray_options.max_retries,
                                      max_task_retries=self.ray_options.max_retries)(self.worker_class)
        options = {**self.options, "device": "cuda" if self.num_gpus else "cpu"}
        self.actors = [actor_class.remote(self.paths, options, self.num_cpus) for _ in range(count)]

    def fit(self, tasks: int) -> None:
        """One actor per task, up to the wanted number."""
        target = max(1, min(self.wanted, tasks))
        if target > len(self.actors):
            self._stop_actors()
            self._spawn(target)
        for actor in self.actors[target:]:
            self.ray.kill(actor)
        del self.actors[target:]

    def _stop_actors(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone with its node
                pass
        self.actors = []

    def close(self) -> None:
        self._stop_actors()
        if self.started_here:
            self.ray.shutdown()

    def __enter__(self) -> RayWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
