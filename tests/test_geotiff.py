import json
import warnings

import numpy as np
import pytest
import torch

from buildseg.cli import main
from buildseg.data.synth import make_scene
from buildseg.models import ModelCard, build_model
from buildseg.runtime.checkpoint import FORMAT, save_atomic

rasterio = pytest.importorskip("rasterio")  # the geo extra, installed by `make test`
from rasterio.transform import from_origin  # noqa: E402
from shapely.geometry import box, shape  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    card = ModelCard(encoder="resnet18", decoder_channels=[32, 16, 16, 16, 8], deep_supervision=False, ds_ensemble=False)
    model = build_model(card)
    torch.nn.init.constant_(model.net.head.bias, 0.0)
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    save_atomic({"format": FORMAT, "model_card": card.to_dict(), "model": model.state_dict(),
                 "postprocess": {"threshold": 0.45}}, path)
    return path


def write_tif(path, crs):
    image, _ = make_scene(np.random.default_rng(0), 600)
    image = image[:, :500]
    transform = from_origin(500000.0, 4100000.0, 0.5, 0.5) if crs else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", driver="GTiff", height=600, width=500, count=3, dtype="uint8",
                           crs=crs, transform=transform) as dst:
            dst.write(image.transpose(2, 0, 1))
    return path


@pytest.mark.slow
def test_geotiff_in_georeferenced_mask_and_polygons_out(checkpoint, tmp_path):
    src = write_tif(tmp_path / "scene.tif", "EPSG:32633")
    out, geojson = tmp_path / "mask.tif", tmp_path / "b.geojson"
    assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(src), "--out", str(out),
                 "--geojson", str(geojson), "--block", "256", "--window", "256", "--device", "cpu"]) == 0
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert b.crs == a.crs and b.transform == a.transform and (b.height, b.width) == (a.height, a.width)
        mask = b.read(1)
        bounds = box(*a.bounds)
    assert set(np.unique(mask)) <= {0, 1} and mask.any()
    collection = json.loads(geojson.read_text())
    assert collection["features"]
    polygons = [shape(f["geometry"]) for f in collection["features"]]
    assert all(bounds.buffer(1e-6).contains(p) for p in polygons)
    # areas in m^2 at 0.5 m/px add up to the mask's pixel count x 0.25
    total = sum(f["properties"]["area_m2"] for f in collection["features"])
    assert total == pytest.approx(mask.sum() * 0.25, rel=1e-6)


@pytest.mark.slow
def test_geotiff_without_crs_warns_and_uses_pixels(checkpoint, tmp_path):
    src = write_tif(tmp_path / "plain.tif", None)
    with pytest.warns(UserWarning, match="no CRS"):
        assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(src), "--out", str(tmp_path / "m.tif"),
                     "--geojson", str(tmp_path / "p.geojson"), "--block", "256", "--device", "cpu"]) == 0
    collection = json.loads((tmp_path / "p.geojson").read_text())
    assert "crs" not in collection
    for f in collection["features"]:
        minx, miny, maxx, maxy = shape(f["geometry"]).bounds
        assert 0 <= minx and maxx <= 500 and 0 <= miny and maxy <= 600


def write_raster(path, array, dtype, nodata=None):
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                       dtype=dtype, crs="EPSG:32633", transform=from_origin(500000.0, 4100000.0, 0.5, 0.5),
                       nodata=nodata) as dst:
        dst.write(array.astype(dtype))
    return path


def test_percentile_stretch_matches_numpy_and_skips_nodata(tmp_path):
    from buildseg.inference.jobs.geotiff import raster_stretch

    rng = np.random.default_rng(1)
    data = rng.integers(100, 4000, size=(3, 300, 200)).astype(np.uint16)  # 12-bit imagery
    data[:, :50] = 65535  # a nodata strip that must not move the percentiles
    data[:, 50:60] = 0  # fill
    src_path = write_raster(tmp_path / "u16.tif", data, "uint16", nodata=65535)
    with rasterio.open(src_path) as src:
        stretch = raster_stretch(src, [1, 2, 3], sample=4096)  # no decimation: exact percentiles
    valid = data[:, 60:].reshape(3, -1).astype(np.float64)
    assert stretch.low == pytest.approx(np.percentile(valid, 2, axis=1), rel=1e-6)
    assert stretch.high == pytest.approx(np.percentile(valid, 98, axis=1), rel=1e-6)
    out = stretch.apply(data[:, 60:])
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    # about 2% of the valid pixels sit at each end, as a percentile stretch promises
    assert 0.01 < (out == 0).mean() < 0.03 and 0.01 < (out == 255).mean() < 0.03


def test_float_raster_with_nan_stretches_on_its_finite_values(tmp_path):
    from buildseg.inference.jobs.geotiff import raster_stretch

    data = np.random.default_rng(2).uniform(0.05, 0.4, size=(3, 100, 80)).astype(np.float32)  # reflectance
    data[:, :10] = np.nan
    with rasterio.open(write_raster(tmp_path / "f32.tif", data, "float32")) as src:
        stretch = raster_stretch(src, [1, 2, 3])
    finite = data[:, 10:].reshape(3, -1).astype(np.float64)
    assert stretch.low == pytest.approx(np.percentile(finite, 2, axis=1), rel=1e-5)
    out = stretch.apply(data)
    assert (out[:, :10] == 0).all() and out[:, 10:].max() == 255


@pytest.mark.slow
def test_uint16_geotiff_prediction_equals_prediction_on_its_stretched_uint8(checkpoint, tmp_path):
    from buildseg.inference.jobs.geotiff import raster_stretch

    image, _ = make_scene(np.random.default_rng(0), 600)
    twelve_bit = image[:, :500].transpose(2, 0, 1).astype(np.uint16) * 16 + 7
    src16 = write_raster(tmp_path / "u16.tif", twelve_bit, "uint16")
    with rasterio.open(src16) as src:
        stretched = raster_stretch(src, [1, 2, 3]).apply(src.read())
    assert stretched.max() == 255  # the old >>8 mapping gave at most 15: a black image to the model
    src8 = write_raster(tmp_path / "u8.tif", stretched, "uint8")
    masks = []
    for src in (src16, src8):  # blocks of 256: the stretch must be the same in every block
        out = tmp_path / f"mask_{src.stem}.tif"
        assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(src), "--out", str(out),
                     "--block", "256", "--window", "256", "--device", "cpu"]) == 0
        with rasterio.open(out) as result:
            masks.append(result.read(1))
    assert masks[0].any() and np.array_equal(masks[0], masks[1])


def _local_segmenter(**kwargs):
    from buildseg.inference.core.postprocess import PostProcess
    from buildseg.inference.core.segmenter import Segmenter
    from conftest import LocalModel

    return Segmenter([LocalModel(seed=4)], device="cpu", precision="fp32", channels_last=False, window=4096,
                     postprocess=PostProcess(threshold=0.5), **kwargs)


def _write_rgb(path, image):
    with rasterio.open(path, "w", driver="GTiff", height=image.shape[0], width=image.shape[1], count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000.0, 4100000.0, 0.5, 0.5)) as dst:
        dst.write(image.transpose(2, 0, 1))
    return path


def test_blockwise_geotiff_prediction_equals_whole_image_prediction(tmp_path):
    from buildseg.inference.jobs.geotiff import predict_geotiff

    image, _ = make_scene(np.random.default_rng(5), 520)
    src = _write_rgb(tmp_path / "s.tif", np.ascontiguousarray(image[:, :470]))  # not a multiple of the block
    seg = _local_segmenter()
    blocks = predict_geotiff(seg, src, tmp_path / "blocks.tif", block=128).mask_path
    whole = predict_geotiff(seg, src, tmp_path / "whole.tif", block=4096).mask_path
    with rasterio.open(blocks) as a, rasterio.open(whole) as b:
        got, want = a.read(1), b.read(1)
    assert 0.05 < want.mean() < 0.95  # a real, mixed mask
    np.testing.assert_array_equal(got, want)


def test_a_building_across_block_borders_is_one_polygon(tmp_path):
    import json as _json

    from buildseg.inference.jobs.geotiff import predict_geotiff

    image = np.zeros((256, 256, 3), dtype=np.uint8)
    image[100:160, 90:200] = 255  # crosses the vertical block border at x=128 and the horizontal one at y=128
    src = _write_rgb(tmp_path / "s.tif", image)
    from buildseg.inference.core.postprocess import PostProcess
    from buildseg.inference.core.segmenter import Segmenter
    from conftest import LocalModel

    bright = LocalModel()
    with torch.no_grad():  # logit > 0 exactly on bright pixels
        bright.conv.weight.zero_()
        bright.conv.weight[0, :, 2, 2] = 1.0 / 3
        bright.conv.bias.zero_()
    seg = Segmenter([bright], device="cpu", precision="fp32", channels_last=False, window=4096,
                    postprocess=PostProcess(threshold=0.5))
    result = predict_geotiff(seg, src, tmp_path / "m.tif", tmp_path / "b.geojson", block=128)
    features = _json.loads((tmp_path / "b.geojson").read_text())["features"]
    assert result.n_polygons == len(features) == 1
    with rasterio.open(tmp_path / "m.tif") as m:
        mask = m.read(1)
    assert mask[100:160, 90:200].all() and mask.sum() == 60 * 110
    assert features[0]["properties"]["area_m2"] == pytest.approx(60 * 110 * 0.25)


def test_scene_pieces_cover_every_block_once_and_split_only_what_would_hold_up_a_pool():
    from buildseg.formats.rasters import SceneGrid
    from buildseg.inference.jobs.geotiff import ScenePlan
    from buildseg.inference.jobs.scene_pieces import split_scene
    from buildseg.inference.runners.ray import PIECE_MEGAPIXELS, RayOptions

    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width, block = int(rng.integers(1, 3000)), int(rng.integers(1, 3000)), int(rng.choice([64, 128, 500]))
        plan = ScenePlan("x.tif", "x.tif", (1, 2, 3), SceneGrid(height, width, 1.0, 1.0, None), None, height, width,
                         block, 8, None, from_origin(0, 0, 1, 1))
        pieces = split_scene(plan, int(rng.integers(1, 4_000_000)))
        blocks = [b for p in pieces for b in p.blocks]
        assert sorted(blocks) == sorted(plan.blocks())  # every block in exactly one piece
        covered = np.zeros((height, width), np.int32)
        for p in pieces:
            covered[p.row : p.row + p.height, p.col : p.col + p.width] += 1
            assert all(p.row <= y < p.row + p.height and p.col <= x < p.col + p.width for y, x in p.blocks)
        assert (covered == 1).all()
    auto = RayOptions()
    assert auto.split_pixels(total_pixels=400 * 10**8, workers=64) == 400 * 10**8 // 64 // 4  # tiles stay whole
    assert auto.split_pixels(total_pixels=10**6, workers=2) == PIECE_MEGAPIXELS * 1e6  # small jobs: never below a piece
    assert RayOptions(split_megapixels=0).split_pixels(total_pixels=10**12, workers=64) is None
    assert RayOptions(split_megapixels=0.5).split_pixels(total_pixels=1, workers=1) == 500_000
