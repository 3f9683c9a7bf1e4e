"""`predict --runner ray` on a local Ray of 2 workers: the local runner's outputs, with scenes
split into pieces too; a worker killed mid-scene and mid-piece retried; a re-run that redoes
only the scenes whose outputs were deleted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from buildseg.cli import main
from buildseg.inference.runners.ray import RayOptions, SceneWorker, predict_scenes_ray
from conftest import write_tiny_checkpoint
from test_tile_service import service  # noqa: F401,F811 - the tile server fixture

ray = pytest.importorskip("ray")
gpd = pytest.importorskip("geopandas")
pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


class DiesOnceWorker(SceneWorker):
    """Kills its own process the first time it starts ``scene_1``, and the first time it starts
    a piece of a split scene (marker files say it did)."""

    @staticmethod
    def _die_once(job, marker: str) -> None:
        if not (Path(job.out_dir) / marker).exists():
            (Path(job.out_dir) / marker).write_text(str(os.getpid()))
            os._exit(1)  # as a pre-empted or OOM-killed worker: no cleanup, no exception

    def predict(self, scene, index, job):
        if scene.name == "scene_1":
            self._die_once(job, "killed-once")
        return super().predict(scene, index, job)

    def piece(self, plan, piece, index, job):
        if piece.k == 1:
            self._die_once(job, "killed-in-a-piece")
        return super().piece(plan, piece, index, job)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture()
def scenes(tmp_path):
    from test_remote_scenes import write_cog

    folder = tmp_path / "scenes"
    folder.mkdir()
    for k, size in enumerate((320, 128, 256, 192)):  # mixed sizes: largest first matters
        write_cog(folder / f"scene_{k}.tif", seed=k, size=size, origin=(500000.0 + 200 * k, 4100000.0))
    return folder


def records(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [{k: v for k, v in r.items() if k != "seconds"} for r in manifest["scenes"]]


def same_masks(a: Path, b: Path) -> bool:
    import rasterio

    paths = sorted(a.glob("*_mask.tif"))
    assert [p.name for p in paths] == sorted(p.name for p in b.glob("*_mask.tif")) and paths
    for path in paths:
        with rasterio.open(path) as x, rasterio.open(b / path.name) as y:
            if x.transform != y.transform or not (x.read(1) == y.read(1)).all():
                return False
    return True


def same_layer(a: Path, b: Path) -> bool:
    x, y = gpd.read_file(a / "footprints.gpkg"), gpd.read_file(b / "footprints.gpkg")
    return len(x) == len(y) and bool(x.geometry.geom_equals(y.geometry).all()) and list(x["source"]) == list(y["source"])


def test_ray_runner_matches_the_local_runner_survives_a_killed_worker_and_redoes_only_what_is_gone(
        local_ray, scenes, tmp_path, capsys):
    from buildseg.data.scene_sources import list_scene_sources
    from buildseg.inference.core.segmenter import Segmenter
    from buildseg.inference.jobs.scenes import SceneSettings

    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    common = ["--checkpoint", str(ckpt), "--data", str(scenes), "--block", "128", "--window", "128", "--device", "cpu",
              "--engine", "torch", "--no-progress", "--threshold", "0.3"]
    assert main(["predict", *common, "--out", str(tmp_path / "local")]) == 0
    # scenes over 0.04 Mpx (scene_0: 320 px, scene_2: 256 px) cut into 128 px pieces (9 and 4) over both workers;
    # scene_1 and scene_3 go whole
    out = tmp_path / "ray"
    assert main(["predict", *common, "--out", str(out), "--runner", "ray", "--ray-workers", "2",
                 "--ray-split-megapixels", "0.04"]) == 0
    assert records(out) == records(tmp_path / "local")
    assert same_layer(out, tmp_path / "local") and same_masks(out, tmp_path / "local")
    assert not (out / ".buildseg-pieces").exists()

    # delete two scenes' outputs, then re-run with a worker that dies on one of them and in a piece of the other
    kept = (out / ".buildseg-done" / "scene_3.json").stat().st_mtime_ns
    for name in ("scene_1", "scene_0"):
        (out / f"{name}_mask.tif").unlink()
    options = dict(device="cpu", precision="auto", tta="none", threshold=0.3, min_area=None, ds_ensemble=None,
                   window=128, overlap=0.25, empty_vote=0, engine="torch", threads=None)
    segmenter = Segmenter.from_checkpoint(ckpt, **options)
    summary = predict_scenes_ray(segmenter, options, list_scene_sources(scenes), out,
                                 SceneSettings(block=128), RayOptions(workers=2, max_retries=2, split_megapixels=0.04),
                                 progress=False, worker_class=DiesOnceWorker)
    for marker in ("killed-once", "killed-in-a-piece"):
        assert (out / marker).exists(), f"no worker died ({marker}): the retry was not exercised"
    assert summary["predicted"] == 2 and summary["skipped"] == 2 and summary["remaining"] == 0
    assert (out / ".buildseg-done" / "scene_3.json").stat().st_mtime_ns == kept  # not redone
    assert records(out) == records(tmp_path / "local")
    assert same_layer(out, tmp_path / "local") and same_masks(out, tmp_path / "local")


def test_ray_runner_with_a_worker_that_always_dies_stops_with_one_line(local_ray, scenes, tmp_path):
    from buildseg.data.scene_sources import list_scene_sources
    from buildseg.errors import BuildsegError
    from buildseg.inference.core.segmenter import Segmenter
    from buildseg.inference.jobs.scenes import SceneSettings

    class AlwaysDies(SceneWorker):
        def predict(self, scene, index, job):
            os._exit(1)

    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    options = dict(device="cpu", engine="torch", window=128)
    segmenter = Segmenter.from_checkpoint(ckpt, **options)
    with pytest.raises(BuildsegError, match="died 2 times"):
        predict_scenes_ray(segmenter, options, list_scene_sources(scenes)[:1], tmp_path / "out",
                           SceneSettings(block=128), RayOptions(workers=1, max_retries=1), progress=False,
                           worker_class=AlwaysDies)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_pool_grows_to_the_wanted_workers_when_pieces_outnumber_the_scenes(local_ray, tmp_path):
    """One scene left, two workers wanted: the first worker gets both CPUs; when the scene is
    cut into pieces, the pool restarts as two 1-CPU workers (a second 2-CPU worker would never
    be scheduled on a 2-CPU Ray, and the job would hang), and stops workers beyond the tasks."""
    from buildseg.inference.runners.ray_workers import RayWorkers

    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    with RayWorkers.start(RayOptions(workers=2), [str(ckpt)], dict(device="cpu", engine="torch", window=128),
                          most=1) as workers:
        assert (len(workers.actors), workers.num_cpus) == (1, 2)
        workers.fit(5)
        assert (len(workers.actors), workers.num_cpus) == (2, 1)
        pids = ray.get([a.ready.remote() for a in workers.actors], timeout=120)
        assert len(set(pids)) == 2
        workers.fit(1)
        assert len(workers.actors) == 1 and ray.get(workers.actors[0].ready.remote(), timeout=60) in pids


def test_an_aoi_from_a_tile_service_on_ray_gives_the_local_runners_layer(local_ray, service, tmp_path):  # noqa: F811
    """The AOI's pieces are scenes: Ray hands them out and the merge joins them as locally."""
    from test_tile_service import COLS, ROWS, ZOOM, tile_bounds, write_aoi

    url, _ = service
    aoi = write_aoi(tmp_path / "aoi.gpkg", tile_bounds(0, 0, COLS, ROWS))
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    common = ["--checkpoint", str(ckpt), "--data", url, "--aoi", str(aoi), "--zoom", str(ZOOM), "--block", "256",
              "--piece-megapixels", "0.06", "--window", "128", "--engine", "torch", "--no-progress", "--threshold",
              "0.3", "--tile-cache", str(tmp_path / "cache")]
    assert main(["predict", *common, "--out", str(tmp_path / "local")]) == 0
    assert main(["predict", *common, "--out", str(tmp_path / "ray"), "--runner", "ray", "--ray-workers", "2"]) == 0
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["areas"]["aoi"]["pieces"] == COLS * ROWS
    local_only = ("scene", "mtime_ns")  # each run has its own aoi.vrt
    assert [{k: v for k, v in r.items() if k not in local_only} for r in records(tmp_path / "ray")] == \
        [{k: v for k, v in r.items() if k not in local_only} for r in records(tmp_path / "local")]
    assert same_layer(tmp_path / "ray", tmp_path / "local") and same_masks(tmp_path / "ray", tmp_path / "local")
