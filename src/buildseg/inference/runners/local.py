"""The local runner: many scenes in this process, or shared over torchrun's ranks.

Under torchrun, scene ``i`` goes to rank ``i % world_size``; with ``shard=(I, N)`` (a batch
scheduler's array job) this process takes the scenes ``I, I+N, ...``. A scene already done
(a valid done-record, see ``jobs/scenes.py``) is skipped, so a killed run resumes; rank 0
merges once every scene of the run is done.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from buildseg.data.scene_sources import SceneSource
from buildseg.distributed import SINGLE_PROCESS, DistInfo, barrier
from buildseg.inference.core.segmenter import Segmenter
from buildseg.inference.jobs.scenes import SceneSettings, check_scenes, finish, pending_scenes, predict_scene, run_key

log = logging.getLogger("buildseg")


def predict_scenes(segmenter: Segmenter, scenes: list[SceneSource], out_dir: str | Path, settings: SceneSettings,
                   dist: DistInfo = SINGLE_PROCESS, progress: bool = True,
                   shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Predict every scene of this process's share not yet done (``shard`` = (I, N): every N-th
    scene from the I-th, then this rank's part of it); rank 0 merges when all scenes are done."""
    out_dir = Path(out_dir)
    suffix = check_scenes(scenes, settings)
    key = run_key(segmenter, settings)
    first, count = shard
    mine = list(range(first, len(scenes), count))[dist.rank :: dist.world_size]
    todo = {mine[k] for k in pending_scenes([scenes[i] for i in mine], out_dir, key)}
    done = 0
    for k, i in enumerate(mine, start=1):
        if i not in todo:
            continue
        record = predict_scene(segmenter, scenes[i], i, out_dir, settings, key, progress=progress)
        done += 1
        if progress:
            log.info("[%d/%d] %s: %d footprints in %.1f s", k, len(mine), scenes[i].name, record["n_footprints"],
                     record["seconds"])
    barrier(dist)
    summary = {"predicted": done, "skipped": len(mine) - done, "scenes": len(scenes)}
    if dist.is_main:
        summary.update(finish(out_dir, scenes, key, suffix))
    return summary
