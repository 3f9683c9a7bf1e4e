"""Training from GeoTIFF scenes and vector footprints (data/geo.py), end to end.

The scenes are made here: a projected raster (UTM 33N) with 16-bit data and a nodata border,
footprints written in EPSG:4326 with one invalid (bow-tie) polygon. Masks are checked against
an independent rasterisation (geopandas reprojection + one rasterize call over the whole scene).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from buildseg.cli import main

gpd = pytest.importorskip("geopandas")  # the geo extra, installed by `make test`
rasterio = pytest.importorskip("rasterio")
from rasterio.features import rasterize  # noqa: E402
from shapely.geometry import Point  # noqa: E402

from buildseg.data.geo import GeoGridDataset, GeoWindowDataset, prepare_geo_data  # noqa: E402
from buildseg.data.synth_geo import write_geo_scene  # noqa: E402
from buildseg.formats.rasters import raster_stretch  # noqa: E402

BANDS = [1, 2, 3]
TRAIN_FAST = ["--encoder", "resnet18", "--weights", "none", "--epochs", "1", "--batch-size", "2", "--crop-size", "64",
              "--val-tile", "64", "--crops-per-image", "2", "--decoder-channels", "8", "8", "8", "8", "8",
              "--precision", "fp32", "--num-workers", "0", "--no-progress", "--no-tensorboard",
              "--no-quantize-at-end"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("geo")
    return write_geo_scene(root / "scene.tif", root / "labels.geojson", size=384, pixel=0.5, seed=3,
                           sixteen_bit=True, nodata_border=48, invalid_polygon=True)


@pytest.fixture(scope="module")
def fine_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine")
    return write_geo_scene(root / "fine.tif", root / "fine.gpkg", size=512, pixel=0.25, seed=4)


def independent_mask(scene, all_touched=False) -> np.ndarray:
    """The whole scene's footprint mask: read, repair, reproject with geopandas, one rasterize call."""
    frame = gpd.read_file(scene.labels)
    frame["geometry"] = frame.geometry.make_valid()
    frame = frame.to_crs(scene.crs)
    with rasterio.open(scene.raster) as src:
        return rasterize(((g, 1) for g in frame.geometry), out_shape=(src.height, src.width), transform=src.transform,
                         fill=0, dtype="uint8", all_touched=all_touched)


@pytest.mark.parametrize("all_touched", [False, True])
def test_window_masks_equal_an_independent_rasterisation(scene, all_touched):
    geo = prepare_geo_data(str(scene.raster), [str(scene.labels)], BANDS)
    assert geo.scenes[0].crs.to_string() == "EPSG:32633"
    reference = independent_mask(scene, all_touched)
    # the labels went 32633 -> 4326 -> 32633: their mask still matches the scene's truth
    truth = scene.mask.astype(bool)
    assert (reference.astype(bool) & truth).sum() / (reference.astype(bool) | truth).sum() > 0.97
    dataset = GeoWindowDataset(geo.scenes, BANDS, crop_size=80, augment=False, all_touched=all_touched, max_nodata=0.5)
    checked = 0
    for i in range(24):
        win, image, valid, _ = dataset.window((0, i))
        mask = geo.scenes[0].rasterize(win.row, win.col, 80, 80, all_touched)
        np.testing.assert_array_equal(mask, reference[win.row : win.row + 80, win.col : win.col + 80])
        checked += int(mask.any())
    assert checked >= 6  # positive windows were drawn


def test_the_invalid_polygon_is_repaired_and_counted(scene, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="buildseg"):
        prepare_geo_data(str(scene.raster), [str(scene.labels)], BANDS)
    assert "1 invalid geometries repaired" in caplog.text


@pytest.mark.slow
def test_no_training_window_is_mostly_nodata(scene):
    geo = prepare_geo_data(str(scene.raster), [str(scene.labels)], BANDS)
    dataset = GeoWindowDataset(geo.scenes, BANDS, crop_size=96, augment=True, max_nodata=0.2, positive_fraction=0.5)
    for i in range(40):
        win, image, valid, _ = dataset.window((1, i))
        assert 1.0 - valid.mean() <= 0.2
        assert not image[~valid].any()  # nodata reads as 0
        _, mask = dataset[(1, i)]
        assert mask.dtype == torch.uint8 and mask.shape == (1, 96, 96)
    # and the border really is nodata: a window on it is invalid there
    from buildseg.formats.rasters import read_window

    with rasterio.open(scene.raster) as src:
        _, valid = read_window(src, BANDS, geo.scenes[0].grid, 0, 0, 96, 96, geo.scenes[0].stretch)
    assert valid[:48].sum() == 0 and valid[:, :48].sum() == 0 and valid[60:, 60:].all()


def test_gsd_resamples_windows_to_the_asked_pixel_size(fine_scene):
    geo = prepare_geo_data(str(fine_scene.raster), [str(fine_scene.labels)], BANDS, gsd=0.5)
    s = geo.scenes[0]
    assert (s.grid.height, s.grid.width) == (256, 256)
    dataset = GeoWindowDataset(geo.scenes, BANDS, crop_size=64, augment=False)
    win, image, _, _ = dataset.window((0, 0))
    transform = s.grid_transform(win.row, win.col)
    assert transform.a == pytest.approx(0.5) and transform.e == pytest.approx(-0.5)
    assert image.shape == (64, 64, 3)
    # the window shows the same ground as the 0.25 m pixels under it, averaged 2x2
    with rasterio.open(fine_scene.raster) as src:
        native = src.read(BANDS, window=rasterio.windows.Window(win.col * 2, win.row * 2, 128, 128)).astype(np.float32)
    halved = native.reshape(3, 64, 2, 64, 2).mean(axis=(2, 4)).transpose(1, 2, 0)
    assert np.corrcoef(halved.ravel(), image.astype(np.float32).ravel())[0, 1] > 0.95
    mask = s.rasterize(win.row, win.col, 64, 64, False)
    truth = fine_scene.mask[win.row * 2 : win.row * 2 + 128, win.col * 2 : win.col * 2 + 128]
    assert np.abs(mask.astype(float) - truth.reshape(64, 2, 64, 2).mean(axis=(1, 3))).mean() < 0.05


@pytest.mark.slow
def test_train_then_predict_with_gsd_bands_and_the_same_stretch(fine_scene, scene, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--data", str(scene.raster), "--labels", str(scene.labels), "--gsd", "0.5",
                 "--bands", "1,2,3", "--out", str(run), *TRAIN_FAST]) == 0
    payload = torch.load(run / "best.pt", weights_only=False)
    assert payload["input"] == {"gsd": 0.5, "bands": [1, 2, 3]}
    stored = json.loads((run / "scenes.json").read_text())[0]["stretch"]

    import buildseg.inference.jobs.geotiff as geotiff

    seen = []

    def recording(*args, **kwargs):
        seen.append(raster_stretch(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(geotiff, "raster_stretch", recording)
    out = tmp_path / "mask.tif"
    assert main(["predict", "--checkpoint", str(run), "--data", str(scene.raster), "--out", str(out),
                 "--block", "256", "--window", "256", "--device", "cpu"]) == 0
    assert seen[0].low.tolist() == stored["low"] and seen[0].high.tolist() == stored["high"]
    with rasterio.open(out) as m, rasterio.open(scene.raster) as s:
        assert (m.height, m.width, m.transform, m.crs) == (s.height, s.width, s.transform, s.crs)
        assert not m.read(1)[:48].any()  # nothing predicted on nodata

    # a 0.25 m scene with the 0.5 m model: read at 0.5 m, written back at 0.25 m
    calls = []
    real = geotiff.read_window

    def spy(src, bands, grid, *args, **kwargs):
        calls.append(grid)
        return real(src, bands, grid, *args, **kwargs)

    monkeypatch.setattr(geotiff, "read_window", spy)
    out = tmp_path / "fine_mask.tif"
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--data", str(fine_scene.raster), "--out", str(out),
                 "--block", "256", "--window", "256", "--device", "cpu"]) == 0
    assert calls and calls[0].gsd == 0.5 and calls[0].step_x == pytest.approx(2.0)
    with rasterio.open(out) as m:
        assert (m.height, m.width) == (512, 512)
    calls.clear()
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--data", str(fine_scene.raster), "--out", str(out),
                 "--native-resolution", "--block", "256", "--window", "256", "--device", "cpu"]) == 0
    assert not calls[0].resampled


@pytest.mark.slow
def test_scene_list_with_split_parquet_labels_and_four_bands_select_three(tmp_path):
    a = write_geo_scene(tmp_path / "a.tif", tmp_path / "a.parquet", size=192, seed=1, bands=4)
    b = write_geo_scene(tmp_path / "b.tif", tmp_path / "b.gpkg", size=192, seed=2, bands=4,
                        origin=(500200.0, 4100000.0))
    listing = tmp_path / "scenes.csv"
    with listing.open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "split"), ("a.tif", "train"), ("b.tif", "val")])
    geo = prepare_geo_data(str(listing), [str(a.labels), str(b.labels)], [1, 2, 4])
    assert [s.train for s in geo.scenes] == [True, False]
    val = GeoGridDataset(geo.scenes, [1, 2, 4], tile=64)
    assert len(val) == 9 and all(t.scene == 1 for t in val.tiles)
    image, mask, valid = val[0]
    assert image.shape == (3, 64, 64) and valid.tolist() == [64, 64]
    run = tmp_path / "run"
    assert main(["train", "--data", str(listing), "--labels", str(a.labels), str(b.labels), "--bands", "1,2,3,4",
                 "--out", str(run), *TRAIN_FAST]) == 0
    payload = torch.load(run / "last.pt", weights_only=False)
    assert payload["model_card"]["in_chans"] == 4 and payload["input"]["bands"] == [1, 2, 3, 4]


def test_val_region_is_held_out_of_training(scene):
    with rasterio.open(scene.raster) as src:
        left, bottom, right, top = src.bounds
    region = f"{left},{bottom},{(left + right) / 2},{top}"  # the western half
    geo = prepare_geo_data(str(scene.raster), [str(scene.labels)], BANDS, val_region=region)
    s = geo.scenes[0]
    dataset = GeoWindowDataset(geo.scenes, BANDS, crop_size=64, augment=False, max_nodata=0.5)
    for i in range(20):
        win, _, _, _ = dataset.window((0, i))
        assert not s.held_out.intersects(s.window_box(win.row, win.col, 64, 64))
    val = GeoGridDataset(geo.scenes, BANDS, tile=64)
    assert len(val) > 0
    assert all(s.val_region.contains(Point(s.grid_transform(t.row + 32, t.col + 32) @ (0, 0))) for t in val.tiles)


# -- clear errors: exit 2, one line naming the input and the fix -------------------------------
def _no_crs(tmp, scene):
    with rasterio.open(scene.raster) as src:
        data, profile = src.read(), src.profile
    profile.update(crs=None)
    path = tmp / "nocrs.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return ["--data", path, "--labels", scene.labels], ["nocrs.tif", "no CRS", "EPSG:4326", "gdal_edit"]


def _elsewhere(tmp, scene):
    frame = gpd.read_file(scene.labels)
    frame["geometry"] = frame.geometry.translate(5.0, 0.0)  # five degrees east
    path = tmp / "far.geojson"
    frame.to_file(path)
    return ["--data", scene.raster, "--labels", path], ["do not overlap", "far.geojson", "scene bbox", "EPSG:32633"]


def _points(tmp, scene):
    path = tmp / "points.geojson"
    gpd.GeoDataFrame(geometry=[Point(15.0, 37.0)], crs="EPSG:4326").to_file(path)
    return ["--data", scene.raster, "--labels", path], ["points.geojson", "no polygons", "Point"]


def _bands(tmp, scene):
    return ["--data", scene.raster, "--labels", scene.labels, "--bands", "1,2,5"], ["scene.tif", "3 band", "--bands"]


def _upsample(tmp, scene):
    return ["--data", scene.raster, "--labels", scene.labels, "--gsd", "0.1"], ["scene.tif", "5.0x", "--gsd >= 0.125"]


def _missing_labels(tmp, scene):
    return ["--data", scene.raster, "--labels", tmp / "nope.gpkg"], ["labels file not found", "nope.gpkg"]


def _bad_region(tmp, scene):
    return ["--data", scene.raster, "--labels", scene.labels, "--val-region", "1,2,3"], ["--val-region", "minx,miny,maxx,maxy"]


@pytest.mark.parametrize("case", [_no_crs, _elsewhere, _points, _bands, _upsample, _missing_labels, _bad_region],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_geo_inputs_fail_with_one_clear_line(case, scene, tmp_path, capsys):
    args, fragments = case(tmp_path, scene)
    code = main(["train", *map(str, args), "--out", str(tmp_path / "run"), *TRAIN_FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    line = err[-1]
    assert line.startswith("buildseg train: error:") and "Traceback" not in "\n".join(err)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_labels_layer_of_a_geopackage(scene, tmp_path):
    frame = gpd.read_file(scene.labels)
    path = tmp_path / "two_layers.gpkg"
    frame.iloc[:0].to_file(path, layer="roads_empty")
    frame.to_file(path, layer="buildings")
    geo = prepare_geo_data(str(scene.raster), [str(path)], BANDS, layer="buildings")
    assert len(geo.scenes[0].polygons) == len(frame)
    from buildseg.errors import BuildsegError

    with pytest.raises(BuildsegError, match="--labels-layer 'nope'"):
        prepare_geo_data(str(scene.raster), [str(path)], BANDS, layer="nope")
