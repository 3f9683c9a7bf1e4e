"""The decoded-image store: bit-identical crops, invalidation, concurrent builds, fallbacks."""

import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from buildseg.cli import main
from buildseg.data.datasets import TrainCropDataset
from buildseg.data.store import DecodedStore, StoreUnavailable, entry_key, open_store
from buildseg.formats.tables import load_records
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def records(synth_data):
    return load_records(synth_data / "train.csv", require_masks=True)


@pytest.mark.parametrize("mode", ["disk", "ram"])
def test_store_crops_are_bit_identical_to_decoded_crops(records, tmp_path, mode):
    store = DecodedStore(records, 3, mode, tmp_path / "cache")
    store.build()
    decoded = TrainCropDataset(records, crop_size=96, crops_per_image=4, augment=True, seed=3)
    stored = TrainCropDataset(records, crop_size=96, crops_per_image=4, augment=True, seed=3, store=store)
    small = TrainCropDataset(records, crop_size=300, crops_per_image=1, augment=True, seed=3)  # larger than the 256 px images: padded
    small_stored = TrainCropDataset(records, crop_size=300, crops_per_image=1, augment=True, seed=3, store=store)
    for epoch in (0, 1):
        for i in range(len(decoded)):
            a, b = decoded[(epoch, i)], stored[(epoch, i)]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (epoch, i)
    for i in range(len(small)):
        assert all(torch.equal(x, y) for x, y in zip(small[(0, i)], small_stored[(0, i)]))
    image, mask = decoded[(0, 5)]
    assert image.shape == (3, 96, 96) and mask.shape == (1, 96, 96) and mask.max() <= 1


def test_windows_match_the_decoded_arrays_at_any_offset(records, tmp_path):
    store = DecodedStore(records[:1], 3, "disk", tmp_path / "cache")
    store.build()
    from buildseg.formats.images import read_rgb

    image = read_rgb(records[0].image_path)
    mask = records[0].load_mask(image.shape[:2])
    rng = np.random.default_rng(0)
    for _ in range(50):
        y, x = rng.integers(0, 256, 2)
        h, w = rng.integers(1, 80, 2)
        got_image, got_mask = store.window(0, int(y), int(x), int(h), int(w))
        np.testing.assert_array_equal(got_image, image[y : y + h, x : x + w])
        np.testing.assert_array_equal(got_mask, mask[y : y + h, x : x + w])


def test_a_changed_image_is_decoded_again(tmp_path, synth_data):
    rng = np.random.default_rng(0)
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "ds" / "images" / "a.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "ds" / "masks" / "a.png"), np.zeros((64, 64), np.uint8))
    records = load_records(tmp_path / "ds", require_masks=True)
    first = DecodedStore(records, 3, "disk", tmp_path / "cache")
    assert first.build().built == 1
    assert DecodedStore(records, 3, "disk", tmp_path / "cache").build().built == 0  # reused
    new = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    time.sleep(0.01)
    cv2.imwrite(str(tmp_path / "ds" / "images" / "a.png"), new)
    records = load_records(tmp_path / "ds", require_masks=True)
    again = DecodedStore(records, 3, "disk", tmp_path / "cache")
    assert again.build().built == 1
    np.testing.assert_array_equal(again.window(0, 0, 0, 64, 64)[0], new[:, :, ::-1])


BUILD_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from buildseg.data.store import DecodedStore
from buildseg.formats.tables import load_records
stats = DecodedStore(load_records({data!r}, require_masks=True), 3, "disk", {cache!r}).build()
print(stats.built)
"""


def test_two_processes_building_at_once_make_one_valid_store(synth_data, tmp_path, records):
    cache = tmp_path / "cache"
    script = BUILD_SCRIPT.format(tests=str(REPO / "tests"), data=str(synth_data / "train.csv"), cache=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    built = sorted(int(p.communicate(timeout=300)[0].strip()) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert built == [0, len(records)]  # each entry built once, by one of them
    assert not list(cache.glob("*.tmp*"))
    assert len(list(cache.glob("*.image.npy"))) == len(records)
    store = DecodedStore(records, 3, "disk", cache)
    assert store.build().built == 0
    decoded = TrainCropDataset(records, crop_size=64, crops_per_image=2, seed=1)
    stored = TrainCropDataset(records, crop_size=64, crops_per_image=2, seed=1, store=store)
    assert all(torch.equal(decoded[(0, i)][0], stored[(0, i)][0]) for i in range(len(decoded)))


def test_full_disk_falls_back_to_decoding_with_a_warning(records, tmp_path, monkeypatch, caplog):
    import buildseg.data.store as store_module

    def full(handle, array):
        handle.write(b"\\x93NUMPY partial")  # half an entry, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.np, "save", full)
    assert open_store(records, 3, "disk", str(tmp_path / "cache"), 0.25) is None
    assert "No space left" in caplog.text and "decoding every crop" in caplog.text
    assert not list((tmp_path / "cache").glob("*.npy"))  # no partial entry under a real name


def test_unusable_cache_folder_falls_back(records, tmp_path, caplog):
    (tmp_path / "file").write_text("not a folder")
    assert open_store(records, 3, "disk", str(tmp_path / "file" / "cache"), 0.25) is None
    assert "cannot build" in caplog.text
    with pytest.raises(StoreUnavailable):
        DecodedStore(records, 3, "disk", tmp_path / "file" / "cache").build()


def test_auto_picks_ram_when_it_fits_and_disk_when_not(records):
    from buildseg.data.store import choose_mode

    assert choose_mode("auto", records, 3, 0.25) == "ram"
    assert choose_mode("auto", records, 3, 1e-12) == "disk"
    assert choose_mode("none", records, 3, 0.25) == "none"


@pytest.mark.slow
def test_cache_cli_builds_ahead_and_training_reuses_it(synth_data, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["cache", "--data", str(synth_data / "train.csv"), "--cache-dir", str(cache)]) == 0
    assert "decoded-image store" in capsys.readouterr().out
    config = tiny_config(synth_data, tmp_path / "run", epochs=1)
    config.data.cache, config.data.cache_dir = "disk", str(cache)
    before = {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    from buildseg.training.loop import train

    train(config)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == before  # read, not rebuilt
    assert entry_key(load_records(synth_data / "train.csv")[0], 3) in {p.name.split(".")[0] for p in before}
