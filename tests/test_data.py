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
