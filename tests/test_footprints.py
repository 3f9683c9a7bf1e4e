"""Footprints from GeoTIFF prediction (footprints/ + inference/jobs/geotiff.py + inference/jobs/scenes.py):
GIS formats, COG masks, area filter, simplification, regularisation, and the many-scenes job
with its manifest (resume after a kill, invalidation by a changed checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gpd = pytest.importorskip("geopandas")
rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

from buildseg.cli import main  # noqa: E402
from buildseg.data.synth import make_scene  # noqa: E402
from buildseg.inference.core.postprocess import PostProcess  # noqa: E402
from buildseg.inference.core.segmenter import Segmenter  # noqa: E402
from buildseg.inference.jobs.geotiff import predict_geotiff  # noqa: E402
from conftest import LocalModel, write_tiny_checkpoint  # noqa: E402


def bright_segmenter() -> Segmenter:
    """Buildings exactly where the image is bright (a 1x1 'model')."""
    model = LocalModel()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.weight[0, :, 2, 2] = 1.0 / 3
        model.conv.bias.zero_()
    return Segmenter([model], device="cpu", precision="fp32", channels_last=False, window=4096,
                     postprocess=PostProcess(threshold=0.5))


def write_rgb(path, image, origin=(500000.0, 4100000.0), crs="EPSG:32633"):
    with rasterio.open(path, "w", driver="GTiff", height=image.shape[0], width=image.shape[1], count=3, dtype="uint8",
                       crs=crs, transform=from_origin(*origin, 0.5, 0.5)) as dst:
        dst.write(image.transpose(2, 0, 1))
    return path


def houses(seed=0, size=256, n=8) -> np.ndarray:
    """Bright rotated rectangles (houses) on black, a few touching block borders."""
    import cv2

    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    for _ in range(n):
        cx, cy = rng.uniform(20, size - 20, 2)
        w, h = rng.uniform(10, 30, 2)
        box = cv2.boxPoints(((cx, cy), (w, h), rng.uniform(0, 90))).astype(np.int32)
        cv2.fillPoly(image, [box], (255, 255, 255))
    return image


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet", ".fgb", ".geojson"])
def test_footprint_formats_attributes_and_cog_mask(tmp_path, suffix):
    src = write_rgb(tmp_path / "s.tif", houses())
    result = predict_geotiff(bright_segmenter(), src, tmp_path / "m.tif", tmp_path / f"b{suffix}", block=128)
    frame = gpd.read_parquet(result.footprints_path) if suffix == ".parquet" else gpd.read_file(result.footprints_path)
    assert len(frame) == result.n_polygons > 3
    assert {"area_m2", "mean_prob", "source"} <= set(frame.columns)
    assert (frame["source"] == "s.tif").all() and frame["mean_prob"].between(0.5, 1.0).all()
    assert frame.crs.to_epsg() == 32633 and frame.geometry.is_valid.all()
    with rasterio.open(result.mask_path) as m:
        assert m.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert m.crs.to_epsg() == 32633 and m.read(1).any()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_simplify_min_area_and_regularize(tmp_path):
    import shapely

    src = write_rgb(tmp_path / "s.tif", houses(seed=1, n=10))
    seg = bright_segmenter()
    exact = predict_geotiff(seg, src, tmp_path / "m.tif", tmp_path / "exact.gpkg", simplify=0).footprints
    simple = predict_geotiff(seg, src, tmp_path / "m.tif", tmp_path / "simple.gpkg").footprints
    with rasterio.open(tmp_path / "m.tif") as m:
        assert exact["area_m2"].sum() == pytest.approx(m.read(1).sum() * 0.25)  # exact pixel outlines
    assert len(exact) == len(simple)
    vertices = lambda f: int(shapely.get_num_coordinates(np.asarray(f.geometry.values)).sum())  # noqa: E731
    assert vertices(simple) < 0.5 * vertices(exact)
    for a, b in zip(exact.geometry, simple.geometry):  # one-pixel tolerance moves no edge by more than a pixel
        assert a.hausdorff_distance(b) <= 0.5 + 1e-6
    floor = float(exact["area_m2"].median())
    big = predict_geotiff(seg, src, tmp_path / "m.tif", tmp_path / "big.gpkg", min_area_m2=floor).footprints
    assert len(big) == int((exact["area_m2"] >= floor).sum()) and 0 < len(big) < len(exact)
    square = predict_geotiff(seg, src, tmp_path / "m.tif", tmp_path / "reg.gpkg", regularize=True).footprints
    assert len(square) == len(exact)
    for a in exact.geometry:  # each regularised footprint stays within 3 px (1.5 m) of its pixel outline
        b = square.geometry[square.geometry.intersects(a)].iloc[0]
        assert a.hausdorff_distance(b) <= 1.5 + 1e-6
        assert a.intersection(b).area / a.union(b).area > 0.85


def test_touching_at_a_corner_across_a_block_corner_is_one_footprint(tmp_path):
    image = np.zeros((256, 256, 3), np.uint8)
    image[100:128, 100:128] = 255
    image[128:150, 128:160] = 255  # touches the first only at the corner (128, 128): 8-connected
    src = write_rgb(tmp_path / "s.tif", image)
    result = predict_geotiff(bright_segmenter(), src, tmp_path / "m.tif", tmp_path / "b.gpkg", block=128, simplify=0)
    assert result.n_polygons == 1
    assert result.footprints["area_m2"].iloc[0] == pytest.approx((28 * 28 + 22 * 32) * 0.25)


@pytest.fixture()
def scene_folder(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    for k in range(3):
        image, _ = make_scene(np.random.default_rng(k), 192)
        write_rgb(folder / f"tile_{k}.tif", image, origin=(500000.0 + 96 * k, 4100000.0))
    return folder


def _predict_folder(checkpoint, folder, out, *extra):
    return main(["predict", "--checkpoint", str(checkpoint), "--data", str(folder), "--out", str(out),
                 "--block", "128", "--window", "128", "--device", "cpu", "--no-progress", *extra])


@pytest.mark.slow
def test_many_scenes_manifest_resume_and_merged_layer(scene_folder, tmp_path, monkeypatch):
    import buildseg.inference.jobs.scenes as scenes_mod

    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    whole = tmp_path / "whole"
    assert _predict_folder(checkpoint, scene_folder, whole) == 0
    manifest = json.loads((whole / "manifest.json").read_text())
    assert [s["mask"] for s in manifest["scenes"]] == [f"tile_{k}_mask.tif" for k in range(3)]
    merged = gpd.read_file(whole / "footprints.gpkg")
    assert len(merged) == manifest["n_footprints"] == sum(s["n_footprints"] for s in manifest["scenes"])
    assert set(merged["source"]) <= {f"tile_{k}.tif" for k in range(3)}

    # a run killed during the second scene, then resumed: only the unfinished scenes run again
    out = tmp_path / "resumed"
    real, calls = scenes_mod.predict_geotiff, []

    def dies_on_second(segmenter, scene, *args, **kwargs):
        calls.append(Path(scene).name)  # the scene's location: a path or a URL string
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(segmenter, scene, *args, **kwargs)

    monkeypatch.setattr(scenes_mod, "predict_geotiff", dies_on_second)
    assert _predict_folder(checkpoint, scene_folder, out) == 130
    assert not (out / "manifest.json").exists() and not (out / "tile_1_mask.tif").exists()
    calls.clear()
    monkeypatch.setattr(scenes_mod, "predict_geotiff", lambda *a, **k: (calls.append(Path(a[1]).name), real(*a, **k))[1])
    assert _predict_folder(checkpoint, scene_folder, out) == 0
    assert calls == ["tile_1.tif", "tile_2.tif"]
    resumed = gpd.read_file(out / "footprints.gpkg")
    assert resumed.geometry.geom_equals(merged.geometry).all() and list(resumed["source"]) == list(merged["source"])
    calls.clear()
    assert _predict_folder(checkpoint, scene_folder, out) == 0 and calls == []  # everything done: nothing runs

    # a changed checkpoint (or setting) invalidates every scene
    write_tiny_checkpoint(checkpoint, seed=1)
    assert _predict_folder(checkpoint, scene_folder, out) == 0 and len(calls) == 3
    calls.clear()
    assert _predict_folder(checkpoint, scene_folder, out, "--min-area-m2", "5") == 0 and len(calls) == 3


@pytest.mark.slow
def test_scene_list_csv_and_parquet_format(scene_folder, tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    listing = tmp_path / "list.csv"
    listing.write_text("path\nscenes/tile_0.tif\nscenes/tile_2.tif\n")
    assert _predict_folder(checkpoint, listing, tmp_path / "out", "--format", "parquet") == 0
    assert (tmp_path / "out" / "tile_2.parquet").is_file() and (tmp_path / "out" / "footprints.parquet").is_file()
    assert not (tmp_path / "out" / "tile_1_mask.tif").exists()


@pytest.mark.slow
def test_many_scenes_shared_by_two_torchrun_processes(scene_folder, tmp_path):
    import os
    import subprocess
    import sys

    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt")
    single = tmp_path / "single"
    assert _predict_folder(checkpoint, scene_folder, single) == 0
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "buildseg",
           "predict", "--checkpoint", str(checkpoint), "--data", str(scene_folder), "--out", str(out), "--block", "128",
           "--window", "128", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((out / ".buildseg-done").glob("*.json"))]
    assert len(records) == 3 and proc.stdout.count("merged layer") == 1
    merged, reference = gpd.read_file(out / "footprints.gpkg"), gpd.read_file(single / "footprints.gpkg")
    assert len(merged) == len(reference) and merged.geometry.geom_equals(reference.geometry).all()


@pytest.mark.slow
def test_checkpoint_info_gives_the_segmenters_run_key_and_plan_without_a_model(tmp_path):
    """The Ray driver reads a CheckpointInfo instead of building the models: the run key (the
    outputs' identity across runners and re-runs), the stored input and the channel count must
    equal the Segmenter's for any options, ensembles included."""
    from buildseg.inference.core.checkpoint_info import CheckpointInfo
    from buildseg.inference.jobs.scenes import SceneSettings, run_key
    from buildseg.runtime.checkpoint import load_checkpoint, save_atomic

    one = write_tiny_checkpoint(tmp_path / "a.pt", in_chans=4)
    payload = load_checkpoint(one)
    payload.update(postprocess={"threshold": 0.4, "min_area": 12}, input={"gsd": 0.5, "bands": [1, 2, 3, 4]})
    save_atomic(payload, tmp_path / "b.pt")
    rng = np.random.default_rng(0)
    for _ in range(6):
        options = dict(tta=str(rng.choice(["none", "flip", "d4"])), window=int(rng.choice([128, 256])),
                       overlap=float(rng.choice([0.0, 0.25])),
                       threshold=None if rng.random() < 0.5 else float(rng.uniform(0.2, 0.8)),
                       min_area=None if rng.random() < 0.5 else int(rng.integers(0, 50)))
        spec = [str(tmp_path / "b.pt")] if rng.random() < 0.5 else [str(one), str(tmp_path / "b.pt")]
        if len(spec) == 2:
            payload_a = load_checkpoint(one)
            payload_a["input"] = payload["input"]
            save_atomic(payload_a, one)
        settings = SceneSettings(block=int(rng.choice([128, 256])), gsd=None, bands=None)
        info = CheckpointInfo.read(spec, **options, engine="openvino", device="cpu", threads=1)
        seg = Segmenter.from_checkpoint(spec, device="cpu", engine="torch", **options)
        assert run_key(info, settings) == run_key(seg, settings)
        assert (info.input, info.in_chans, info.postprocess) == (seg.input, seg.in_chans, seg.postprocess)
