"""``predict --gsd M`` on CSV/folder tiles (which carry no GSD): the tiles are resampled to the
model's GSD for prediction and the masks come back at the tiles' own size; a tile seen at
twice the resolution predicts what the original tile predicts."""

from __future__ import annotations

import numpy as np
import torch

from buildseg.cli import main
from buildseg.formats import rle
from buildseg.formats.images import read_rgb, write_png
from buildseg.formats.tables import load_records, read_rle_table
from buildseg.inference.core.segmenter import Segmenter
from buildseg.metrics import dice_per_image
from buildseg.runtime.checkpoint import load_checkpoint, save_atomic
from conftest import copy_run


def _with_gsd(run, dest, gsd: float | None):
    run = copy_run(run, dest)
    payload = load_checkpoint(run / "best.pt")
    payload["input"] = {"gsd": gsd, "bands": None}
    save_atomic({k: v for k, v in payload.items() if k not in ("format", "schema")}, run / "best.pt")
    return run


def test_gsd_on_tiles_resamples_to_the_models_gsd_and_restores_the_masks_size(trained_run, synth_data, tmp_path,
                                                                               monkeypatch):
    run = _with_gsd(trained_run, tmp_path / "run", 0.5)
    records = load_records(synth_data / "test.csv")[:4]
    (tmp_path / "fine" / "images").mkdir(parents=True)
    for record in records:  # each tile at twice the resolution: 0.25 m where the model learnt 0.5 m
        image = read_rgb(record.image_path)
        write_png(tmp_path / "fine" / "images" / f"{record.img_id}.png", image.repeat(2, axis=0).repeat(2, axis=1))
    seen = []
    real = Segmenter.probabilities
    monkeypatch.setattr(Segmenter, "probabilities", lambda self, images: seen.append(tuple(images.shape[-2:]))
                        or real(self, images))
    common = ["--checkpoint", str(run), "--engine", "torch", "--precision", "fp32", "--device", "cpu", "--no-progress"]
    assert main(["predict", *common, "--data", str(tmp_path / "fine"), "--gsd", "0.25",
                 "--out", str(tmp_path / "fine.csv")]) == 0
    assert set(seen) == {(64, 64)}  # the model saw the tiles at its own 0.5 m: 128 px -> 64 px
    seen.clear()
    csv = tmp_path / "native.csv"
    csv.write_text("img_id,img_path\n" + "".join(f"{r.img_id},{r.image_path}\n" for r in records))
    assert main(["predict", *common, "--data", str(csv), "--out", str(tmp_path / "native.csv.out")]) == 0
    assert set(seen) == {(64, 64)}
    fine, native = read_rle_table(tmp_path / "fine.csv"), read_rle_table(tmp_path / "native.csv.out")
    for record in records:
        mask = rle.decode(fine[record.img_id], (128, 128)).astype(bool)  # the tile's own size
        expected = rle.decode(native[record.img_id], (64, 64)).repeat(2, axis=0).repeat(2, axis=1).astype(bool)
        tp, fp, fn = (mask & expected).sum(), (mask & ~expected).sum(), (~mask & expected).sum()
        assert mask.shape == (128, 128) and (not (tp + fp + fn) or dice_per_image(tp, fp, fn) > 0.9)


def test_gsd_on_tiles_needs_a_model_that_records_its_gsd(trained_run, synth_data, tmp_path, capsys):
    run = _with_gsd(trained_run, tmp_path / "run", None)
    code = main(["predict", "--checkpoint", str(run), "--data", str(synth_data / "test.csv"), "--gsd", "0.3",
                 "--out", str(tmp_path / "o.csv"), "--engine", "torch", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not record one" in err[0], err
    assert not (tmp_path / "o.csv").exists()


def test_a_tile_is_resampled_by_area_and_restored_bilinear():
    from buildseg.inference.jobs.tiles import _restored, resample

    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, axis=2)
    assert resample(image, (2, 2))[..., 0].tolist() == [[3, 5], [11, 13]]  # 2x2 means (2.5 -> 3 ...)
    maps = np.random.default_rng(0).random((2, 8, 8), dtype=np.float32)
    first = maps[0]
    assert _restored(maps, (16, 12)).shape == (2, 16, 12) and _restored(first, (8, 8)) is first  # no copy at size
    assert torch.allclose(torch.from_numpy(_restored(np.full((4, 4), 0.3, np.float32), (9, 7))),
                          torch.full((9, 7), 0.3))
