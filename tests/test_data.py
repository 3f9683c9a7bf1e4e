import csv

import cv2
import numpy as np
import pytest

from buildseg.data.datasets import EpochSampler, GridTileDataset, TrainCropDataset, grid_offsets
from buildseg.errors import BuildsegError
from buildseg.formats import rle
from buildseg.formats.images import read_rgb
from buildseg.formats.tables import load_records


def write_csv(path, rows, header=("img_id", "img_path", "mask_rle")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_image(path, shape, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*shape, channels) if channels > 1 else shape, dtype=np.uint8)
    cv2.imwrite(str(path), image)
    return image


def test_crops_are_native_scale_and_padded(tmp_path):
    make_image(tmp_path / "a.png", (300, 260))
    make_image(tmp_path / "b.png", (50, 40))
    mask = np.zeros((300, 260), np.uint8)
    mask[10:20, 10:30] = 1
    write_csv(tmp_path / "t.csv", [("a", "./a.png", rle.encode(mask)), ("b", "b.png", "-1")])
    ds = TrainCropDataset(load_records(tmp_path / "t.csv"), crop_size=128, crops_per_image=3)
    assert len(ds) == 6
    for i in range(len(ds)):
        image, m = ds[(0, i)]
        assert image.shape == (3, 128, 128) and m.shape == (1, 128, 128)
        assert image.dtype.is_floating_point is False
    # the small image is padded with zeros, its mask with background
    image, m = ds[(0, 1)]
    assert (image == 0).float().mean() > 0.8 and m.sum() == 0
    # same (seed, epoch, index) -> same sample; another epoch -> another crop
    a, _ = ds[(0, 0)]
    b, _ = ds[(0, 0)]
    c, _ = ds[(1, 0)]
    assert (a == b).all() and not (a == c).all()


def test_auto_crops_cover_the_area(tmp_path):
    make_image(tmp_path / "a.png", (448, 448))
    write_csv(tmp_path / "t.csv", [("a", "a.png", "-1")])
    assert len(TrainCropDataset(load_records(tmp_path / "t.csv"), crop_size=224, crops_per_image=0)) == 4


def test_grid_tiles_cover_centred_grid_with_empty_tiles(tmp_path):
    make_image(tmp_path / "a.png", (500, 460))
    mask = np.zeros((500, 460), np.uint8)
    mask[300:, :] = 1
    write_csv(tmp_path / "t.csv", [("a", "a.png", rle.encode(mask))])
    ds = GridTileDataset(load_records(tmp_path / "t.csv"), tile=224)
    assert grid_offsets(500, 224) == [(26, 224), (250, 224)]
    assert len(ds) == 4
    image = read_rgb(tmp_path / "a.png")
    tile, m, valid = ds[0]
    assert valid.tolist() == [224, 224] and m.sum() == 0  # an empty tile is kept
    np.testing.assert_array_equal(tile.numpy().transpose(1, 2, 0), image[26:250, 6:230])
    assert ds[2][1].sum() > 0


def test_epoch_sampler_skips_for_resume(tmp_path):
    sampler = EpochSampler(list(range(10)), seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip=4)
    assert list(sampler) == full[4:] and all(e == 2 for e, _ in full)


def test_folder_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    make_image(tmp_path / "images/x1.png", (64, 64))
    mask = np.zeros((64, 64), np.uint8)
    mask[5:9, 5:9] = 255
    cv2.imwrite(str(tmp_path / "masks/x1.png"), mask)
    records = load_records(tmp_path, require_masks=True)
    assert records[0].load_mask((64, 64)).sum() == 16


def test_grayscale_and_rgba_are_converted(tmp_path):
    make_image(tmp_path / "g.png", (20, 30), channels=1)
    make_image(tmp_path / "r.png", (20, 30), channels=4)
    assert read_rgb(tmp_path / "g.png").shape == (20, 30, 3)
    assert read_rgb(tmp_path / "r.png").shape == (20, 30, 3)


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing_image", "not found"),
        ("corrupt", "corrupt"),
        ("size_mismatch", "a 20x30 mask"),
        ("bad_rle", "odd number"),
        ("missing_column", "no 'img_path' column"),
        ("empty_csv", "is empty"),
        ("header_only", "no rows"),
    ],
)
def test_bad_inputs_name_the_file_or_row(tmp_path, case, fragment):
    make_image(tmp_path / "ok.png", (20, 30))
    rows = [("ok", "ok.png", "1 5")]
    header = ("img_id", "img_path", "mask_rle")
    if case == "missing_image":
        rows = [("gone", "gone.png", "1 5")]
    elif case == "corrupt":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
        rows = [("bad", "bad.png", "1 5")]
    elif case == "size_mismatch":
        rows = [("ok", "ok.png", "590 20")]
    elif case == "bad_rle":
        rows = [("ok", "ok.png", "1 5 7")]
    elif case == "missing_column":
        header = ("img_id", "path", "mask_rle")
    path = tmp_path / "t.csv"
    if case == "empty_csv":
        path.write_text("")
    elif case == "header_only":
        write_csv(path, [], header)
    else:
        write_csv(path, rows, header)
    with pytest.raises(BuildsegError) as info:
        records = load_records(path)
        ds = TrainCropDataset(records, crop_size=16, crops_per_image=1)
        ds[(0, 0)]
    message = str(info.value)
    assert fragment in message
    if case in ("missing_image", "corrupt"):
        assert ("gone.png" in message) or ("bad.png" in message)
    if case in ("bad_rle", "size_mismatch"):
        assert "'ok'" in message


def test_16_bit_png_uses_the_geotiff_percentile_stretch(tmp_path):
    from buildseg.formats.images import read_image
    from buildseg.formats.stretch import fit_stretch

    rng = np.random.default_rng(0)
    twelve_bit = rng.integers(200, 3800, (40, 50, 3)).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    cv2.imwrite(str(tmp_path / "u16.png"), twelve_bit[:, :, ::-1])  # OpenCV writes BGR
    got = read_image(tmp_path / "u16.png")
    assert got.dtype == np.uint8 and got.mean() > 100  # not nearly black, as >> 8 would make it
    # the same per-band 2-98 percentile map as GeoTIFF prediction, computed independently with NumPy
    low, high = np.percentile(twelve_bit.reshape(-1, 3).astype(np.float64), (2, 98), axis=0)
    want = np.clip(np.rint((twelve_bit - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    stretch = fit_stretch(twelve_bit.transpose(2, 0, 1))
    np.testing.assert_array_equal(stretch.apply_hwc(twelve_bit), got)


def test_mask_channel_rule(tmp_path):
    from buildseg.formats.images import read_mask

    building = np.zeros((20, 30), dtype=np.uint8)
    building[5:10, 5:20] = 1
    opaque = np.zeros((20, 30, 4), dtype=np.uint8)
    opaque[:, :, 3] = 255  # opaque everywhere: not "all building"
    opaque[building > 0, 2] = 255  # red buildings (BGRA on disk)
    cv2.imwrite(str(tmp_path / "opaque.png"), opaque)
    np.testing.assert_array_equal(read_mask(tmp_path / "opaque.png"), building)
    layer = np.zeros((20, 30, 4), dtype=np.uint8)
    layer[:, :, 3] = building * 255  # black colour, buildings opaque on a transparent layer
    cv2.imwrite(str(tmp_path / "layer.png"), layer)
    np.testing.assert_array_equal(read_mask(tmp_path / "layer.png"), building)
    cv2.imwrite(str(tmp_path / "white.png"), np.repeat(building[:, :, None] * 255, 3, axis=2))
    np.testing.assert_array_equal(read_mask(tmp_path / "white.png"), building)


@pytest.mark.slow
def test_four_channel_images_train_and_predict_end_to_end(tmp_path):
    """RGB+NIR (here RGBA PNGs) train with in_chans 4 and predict with the same model."""
    from buildseg.cli import main
    from conftest import tiny_config

    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        image = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "ds" / "images" / f"a{k}.png"), image)
        cv2.imwrite(str(tmp_path / "ds" / "masks" / f"a{k}.png"), (image[:, :, 3] > 128).astype(np.uint8) * 255)
    config = tiny_config(tmp_path / "unused", tmp_path / "run", epochs=1)
    config.data.train = str(tmp_path / "ds")
    config.data.crop_size = config.data.val_tile = 32
    config.model.in_chans = 4
    config.save(tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 0
    out = tmp_path / "sub.csv"
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "ds"), "--out", str(out),
                 "--no-progress", "--num-workers", "0", "--device", "cpu"]) == 0
    assert len(out.read_text().splitlines()) == 5


def test_named_augmentations_and_scale(tmp_path):
    """Every augmentation name builds and runs; "scale" cuts crop x s windows resized to the crop."""
    from buildseg.data.augment import AUGMENTATIONS
    from buildseg.data.datasets import TrainCropDataset
    from buildseg.data.synth import write_dataset
    from buildseg.formats.tables import load_records

    write_dataset(tmp_path, n_train=2, train_size=256, n_test=1, test_size=64, seed=0, progress=False)
    records = load_records(tmp_path / "train.csv", require_masks=True)
    plain = TrainCropDataset(records, crop_size=64, crops_per_image=4, augment=False, seed=1)
    scaled = TrainCropDataset(records, crop_size=64, crops_per_image=4, augment=True, seed=1, augmentations=AUGMENTATIONS, scale_range=(2.0, 2.0))
    for i in range(4):
        image, mask = scaled[(0, i)]
        assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0, 1}
    # a fixed scale of 2: the crop shows a 128 px window of the image, halved
    import cv2

    image, mask, _ = scaled.crop((0, 0))
    record = records[0]
    from buildseg.formats.images import read_image

    full = read_image(record.image_path, 3)
    found = False
    for y in range(0, 256 - 128 + 1):
        for x in range(0, 256 - 128 + 1):
            if np.array_equal(cv2.resize(full[y : y + 128, x : x + 128], (64, 64), interpolation=cv2.INTER_AREA), image):
                found = True
                break
        if found:
            break
    assert found
    assert plain.crop((0, 0))[0].shape == (64, 64, 3)
