"""Many sources as one corpus: source and GSD columns, the manifest join, source-balanced
sampling at its documented shares, crops resampled to the model's GSD, the Dice per source."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from buildseg.data.corpus import record_weights, source_shares, with_manifest
from buildseg.data.datasets import GridTileDataset, TrainCropDataset
from buildseg.errors import BuildsegError
from buildseg.formats import rle
from buildseg.formats.tables import load_records, parse_gsd


def write_corpus(root: Path, sources: dict[str, int], *, size: int = 64, gsd: dict[str, str] | None = None,
                 columns: bool = True, building: int | None = None) -> Path:
    """A competition CSV with ``n`` tiles per source (each tile one centred square building of
    ``building`` px, default half the tile)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for source, n in sources.items():
        for k in range(n):
            img_id = f"{source}_{k}"
            image = np.full((size, size, 3), 60, np.uint8)
            mask = np.zeros((size, size), np.uint8)
            b = building or size // 2
            start = (size - b) // 2
            mask[start : start + b, start : start + b] = 1
            image[mask > 0] = 200
            Image.fromarray(image).save(root / "images" / f"{img_id}.png")
            row = {"img_id": img_id, "img_path": f"images/{img_id}.png", "mask_rle": rle.encode(mask)}
            if columns:
                row.update(source=source, gsd=(gsd or {}).get(source, ""))
            rows.append(row)
    path = root / "train.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("~0.3 (original 300x300)", 0.3), ("0.54 (z18 at 24.5N)", 0.54),
                                         ("1 m", 1.0), ("", None), ("unknown", None), ("0.3-2.5 (range)", None),
                                         ("0.3\u20132.5 m", None), ("<0.8 (xBD spec)", None), (".5", 0.5)])
def test_gsd_cells_parse_to_metres_or_unknown(text, value):
    assert parse_gsd(text, where="t.csv line 2") == value


@pytest.mark.parametrize("text", ["abc", "0", "-0.5"])
def test_a_bad_gsd_cell_names_the_file_and_line(text):
    with pytest.raises(BuildsegError, match=r"t.csv line 7: gsd .* is not metres per pixel"):
        parse_gsd(text, where="t.csv line 7")


def test_source_and_gsd_columns_and_the_manifest_join(tmp_path):
    path = write_corpus(tmp_path, {"a": 2, "b": 1}, gsd={"a": "0.3"})
    records = load_records(path, require_masks=True)
    assert [(r.tile_source, r.gsd) for r in records] == [("a", 0.3), ("a", 0.3), ("b", None)]
    bare = write_corpus(tmp_path / "bare", {"a": 2, "b": 1}, columns=False)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("img_id,source_dataset,gsd_m\na_0,city,0.5 (spec)\na_1,city,\nb_0,drone,~0.02\n")
    joined = with_manifest(load_records(bare, require_masks=True), manifest)
    assert [(r.tile_source, r.gsd) for r in joined] == [("city", 0.5), ("city", None), ("drone", 0.02)]
    manifest.write_text("img_id,source_dataset\na_0,city\n")
    with pytest.raises(BuildsegError, match=r"2 training images are not in .*manifest.csv \(e.g. a_1\)"):
        with_manifest(load_records(bare, require_masks=True), manifest)


def test_an_rle_longer_than_the_csv_modules_default_field_limit_loads(tmp_path):
    """A 1024 px mask of alternating pixels: an RLE of over 1.5 million characters."""
    mask = np.zeros((1024, 1024), np.uint8)
    mask[:, ::2] = 1
    text = rle.encode(mask)
    assert len(text) > 131072
    (tmp_path / "train.csv").write_text(f"img_id,img_path,mask_rle\nx,x.png,{text}\n")
    Image.fromarray(np.zeros((1024, 1024, 3), np.uint8)).save(tmp_path / "x.png")
    (record,) = load_records(tmp_path / "train.csv", require_masks=True)
    assert np.array_equal(record.load_mask((1024, 1024)), mask)


@pytest.mark.parametrize("balance, alpha", [("none", 1.0), ("sqrt", 0.5), ("equal", 0.0)])
def test_sources_are_drawn_at_their_documented_shares(tmp_path, balance, alpha):
    """Share of source s = n_s ** alpha / sum(n ** alpha); 6,000 draws with a fixed seed land
    within 4 standard errors of it for every source."""
    sizes = {"big": 36, "mid": 9, "small": 1}
    records = load_records(write_corpus(tmp_path, sizes, size=32), require_masks=True)
    expected = {s: n**alpha / sum(m**alpha for m in sizes.values()) for s, n in sizes.items()}
    assert source_shares(records, balance) == pytest.approx(expected)
    weights = record_weights(records, balance)
    dataset = TrainCropDataset(records, crop_size=32, crops_per_image=1, augment=False, record_weights=weights)
    draws = 6000
    counts = Counter()
    for index in range(draws):
        r = _drawn_record(dataset, index)
        counts[records[r].tile_source] += 1
    for source, share in expected.items():
        se = np.sqrt(share * (1 - share) / draws)
        assert abs(counts[source] / draws - share) < 4 * se + 1e-9, (source, counts[source] / draws, share)


def _drawn_record(dataset: TrainCropDataset, index: int) -> int:
    """Which record sample ``index`` of epoch 0 crops from (the dataset's own rule)."""
    if dataset.record_weights is None:
        return index % len(dataset.records)
    seed = int(np.random.SeedSequence([dataset.seed, 0, index]).generate_state(1)[0])
    return int(np.random.default_rng([seed, 2]).choice(len(dataset.records), p=dataset.record_weights))


def test_the_crop_comes_from_the_drawn_record(tmp_path):
    """The helper above is the dataset's rule: each sample's mask is its drawn tile's."""
    path = write_corpus(tmp_path, {"a": 3, "b": 1}, size=32)
    records = load_records(path, require_masks=True)
    for k, r in enumerate(records):  # tell the tiles apart by their building's brightness
        image = np.asarray(Image.open(r.image_path)).copy()
        image[image == 200] = 100 + 40 * k
        Image.fromarray(image).save(r.image_path)
    dataset = TrainCropDataset(records, crop_size=32, crops_per_image=1, augment=False,
                               record_weights=record_weights(records, "equal"))
    for index in range(40):
        image, _, _ = dataset.crop((0, index))
        assert image.max() == 100 + 40 * _drawn_record(dataset, index)


def test_one_source_or_no_balance_keeps_the_plain_order(tmp_path):
    records = load_records(write_corpus(tmp_path, {"a": 3}, size=32), require_masks=True)
    assert record_weights(records, "sqrt") is None
    assert record_weights(records + records, "none") is None


@pytest.mark.parametrize("tile_gsd, side", [(0.25, 8), (0.5, 16), (1.0, 32)])
def test_crops_are_resampled_to_the_models_gsd(tmp_path, tile_gsd, side):
    """A 16 px building of a 128 px tile seen at 0.5 m: 8 px from a 0.25 m tile, 16 px from a
    0.5 m one, 32 px from a 1 m one; validation tiles are resampled alike."""
    path = write_corpus(tmp_path, {"s": 1}, size=128, gsd={"s": str(tile_gsd)}, building=16)
    records = load_records(path, require_masks=True)
    dataset = TrainCropDataset(records, crop_size=64, crops_per_image=1, augment=False, target_gsd=0.5, gsd_jitter=0.15)
    assert dataset.gsd_jitter == 0.0  # no jitter without augmentation
    widths = []
    for index in range(40):
        _, mask, _ = dataset.crop((0, index))
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        if len(cols) and 0 < cols[0] and cols[-1] < 63 and 0 < rows[0] and rows[-1] < 63:
            widths.append(cols[-1] - cols[0] + 1)
    assert widths and all(abs(w - side) <= 1 for w in widths), widths
    grid = GridTileDataset(records, tile=128, target_gsd=0.5)
    resampled = round(128 * tile_gsd / 0.5)
    assert len(grid) == max(1, resampled // 128) ** 2
    area = sum(int(grid[i][1].sum()) for i in range(len(grid)))
    assert abs(area - side**2) <= 2 * side + 1


def test_unknown_gsd_is_taken_as_it_is(tmp_path):
    records = load_records(write_corpus(tmp_path, {"s": 1}, size=64), require_masks=True)
    dataset = TrainCropDataset(records, crop_size=64, crops_per_image=1, augment=False, target_gsd=0.5)
    _, mask, _ = dataset.crop((0, 0))
    assert int(mask.any(axis=0).sum()) == 32  # the tile's own 32 px building, not resampled


def test_validation_reports_the_dice_of_each_source(tmp_path):
    from buildseg.training.validate import dice_by_source

    records = load_records(write_corpus(tmp_path, {"a": 2, "b": 1}, size=32), require_masks=True)
    grid = GridTileDataset(records, tile=32)
    counts = np.zeros((3, 7))
    counts[:, :3] = [[10, 0, 0], [10, 10, 0], [0, 5, 5]]  # tp fp fn per tile: a, a, b
    scores = dice_by_source(counts, grid)
    assert scores == pytest.approx({"a": (1.0 + 20 / 30) / 2, "b": 0.0}, abs=1e-6)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_empty_crops_are_sought_at_their_documented_share(tmp_path, share):
    """data.empty_crops: that share of crops tries EMPTY_TRIES windows for building-free ground.
    With a 64 px building centred in a 128 px tile, a random 32 px window is empty with
    probability p = 1 - (1 - 2/97)^2, so an empty crop comes out with (1-s) p + s (1 - (1-p)^10)."""
    from buildseg.data.datasets import EMPTY_TRIES

    records = load_records(write_corpus(tmp_path, {"s": 1}, size=128, building=64), require_masks=True)
    dataset = TrainCropDataset(records, crop_size=32, crops_per_image=1, augment=False, empty_crops=share)
    draws = 3000
    empty = sum(not dataset.crop((0, index))[1].any() for index in range(draws)) / draws
    p = 1 - (1 - 2 / 97) ** 2
    expected = (1 - share) * p + share * (1 - (1 - p) ** EMPTY_TRIES)
    assert abs(empty - expected) < 4 * np.sqrt(expected * (1 - expected) / draws), (empty, expected)
