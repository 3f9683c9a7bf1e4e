"""Per-image heads (models/image_heads.py, training/image_heads.py): they leave the pixels alone,
travel through every engine and export, decide tiles in ``predict``, and the fitted heads learn
what they are for on synthetic tiles of known content and scale."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from buildseg import extras
from buildseg.cli import main
from buildseg.config import Config
from buildseg.formats import rle
from buildseg.formats.tables import load_records, read_rle_table
from buildseg.inference.core import engines
from buildseg.inference.core.postprocess import PostProcess
from buildseg.inference.core.segmenter import MaskRules, Segmenter
from buildseg.models import ModelCard, build_model
from buildseg.models.image_heads import pool, run_head
from buildseg.runtime.checkpoint import FORMAT, load_model, save_atomic
from buildseg.training.image_heads import draw_crops, fit_heads, heads_payload, pooled_vectors, with_heads

# the documented error of the scale estimate on synthetic tiles (docs/prediction.md): median |log2 error|
SYNTHETIC_SCALE_ERROR = 0.25  # 0.13 measured (32 crops per tile)


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    card = ModelCard(encoder="resnet18", decoder_channels=[16, 16, 8, 8, 8], deep_supervision=True, ds_ensemble=True)
    return build_model(card).eval()


def _randomise_heads(model, seed: int, tile_bias: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    heads = model.net.image_heads
    for name in heads.names:
        tensors = {k: torch.randn(v.shape, generator=generator) * (0.05 if k == "w1" else 0.5)
                   for k, v in heads.head(name).items() if k not in ("mean", "std")}
        tensors["std"] = torch.full_like(heads.head(name)["std"], 10.0)
        if name == "tile":
            tensors["b2"] = torch.tensor([tile_bias])
        heads.set_head(name, tensors)
    return model


def _write(model, path, **post):
    payload = {"format": FORMAT, "model_card": model.card.to_dict(), "model": model.state_dict(),
               "postprocess": {"threshold": 0.5, "min_area": 0, **post}}
    return save_atomic(payload, path)


def test_heads_add_constant_channels_and_leave_the_pixels_alone():
    base = _tiny()
    model = _randomise_heads(with_heads(base, ["scale", "tile"]), seed=3)
    assert model.output_names == ["footprint", "tile", "scale"]  # a fixed order, whatever the order asked
    x = torch.randint(0, 256, (2, 3, 45, 70)).float()
    with torch.no_grad():
        out, pixels = model(x), base(x)
        features = model.net.encoder(model._pad(model._standardise(x)))
        final = model.net(model._pad(model._standardise(x)))[0]
        expected = model.net.image_heads(pool(features, final))
    assert out.shape == (2, 3, 45, 70)
    torch.testing.assert_close(out[:, :1], pixels)
    for c in (1, 2):
        assert torch.all(out[:, c] == out[:, c, :1, :1])  # one value per image
        torch.testing.assert_close(out[:, c, 0, 0], expected[:, c - 1])
    assert model.net.image_heads.head("tile")["w1"].requires_grad is False  # buffers: no optimiser touches them


def test_the_tile_gate_empties_a_tile_below_its_threshold():
    footprint = np.zeros((32, 32), dtype=np.float32)
    footprint[8:20, 8:20] = 0.9
    rules = MaskRules(PostProcess(threshold=0.5, tile_threshold=0.6), ["footprint", "tile"])
    for tile_probability, expected in ((0.59, 0), (0.61, 144)):
        maps = np.stack([footprint, np.full_like(footprint, tile_probability)])
        assert int(rules(maps).sum()) == expected
    assert int(MaskRules(PostProcess(threshold=0.5), ["footprint", "tile"])(maps).sum()) == 144  # 0: off
    assert int(MaskRules(PostProcess(threshold=0.5, tile_threshold=0.6), ["footprint"])(footprint).sum()) == 144


AVAILABLE = [name for name, (module, _) in engines.EXTRAS.items() if extras.installed(module)]


@pytest.mark.slow
def test_exported_graphs_give_the_tile_decisions_of_torch(tmp_path):
    """ONNX Runtime and OpenVINO, from one ONNX graph (the engine cache exports it once)."""
    pytest.importorskip("onnx")
    if not AVAILABLE:
        pytest.skip("no ONNX engine installed")
    model = _randomise_heads(with_heads(_tiny(1), ["tile", "scale"]), seed=5, tile_bias=0.0)
    rng = np.random.default_rng(0)
    images = [(rng.integers(0, 256, (64, 64, 3)) * rng.uniform(0.2, 1.0)).astype(np.uint8)
              for k in range(12)]
    with torch.no_grad():  # the bias that puts the decision in the middle of these images
        logits = [float(model(torch.from_numpy(im).permute(2, 0, 1)[None].float())[0, 1, 0, 0]) for im in images]
    model.net.image_heads.set_head("tile", {"b2": torch.tensor([-float(np.median(logits)) + 1e-3])})
    checkpoint = _write(model, tmp_path / "heads.pt", tile_threshold=0.5)
    kwargs = dict(device="cpu", precision="fp32")
    reference = Segmenter.from_checkpoint(checkpoint, engine="torch", **kwargs)
    want_tiles = []
    for image in images:
        want_tiles.append(float(reference.probabilities(image).mean[0][1, 0, 0]))
    decided = np.array(want_tiles) >= 0.5
    assert 0 < decided.sum() < len(decided), "the heads should decide both ways on these images"
    for engine in AVAILABLE:
        compiled = Segmenter.from_checkpoint(checkpoint, engine=engine, **kwargs)
        assert compiled.targets == ["footprint", "tile", "scale"]
        got_tiles = []
        for image in images:
            want, got = reference.probabilities(image).mean[0], compiled.probabilities(image).mean[0]
            np.testing.assert_allclose(got[1:], want[1:], atol=1e-4, err_msg=engine)
            got_tiles.append(float(got[1, 0, 0]))
            np.testing.assert_array_equal(compiled.predict(image), reference.predict(image), err_msg=engine)
        np.testing.assert_array_equal(np.array(got_tiles) >= 0.5, decided, err_msg=engine)


@pytest.mark.slow
def test_predict_applies_the_stored_tile_decision(trained_run, synth_data, tmp_path):
    model, payload = load_model(trained_run / "best.pt")
    for name, bias in (("refuses", -30.0), ("accepts", 30.0)):
        heads = with_heads(model, ["tile"])
        heads.net.image_heads.set_head("tile", {"b2": torch.tensor([bias])})
        checkpoint = save_atomic(heads_payload(heads, payload, tile_threshold=0.5), tmp_path / f"{name}.pt")
        out = tmp_path / f"{name}.csv"
        assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(synth_data / "test.csv"),
                     "--out", str(out), "--engine", "torch", "--precision", "fp32", "--threshold", "0.05"]) == 0
        masks = read_rle_table(out)
        if name == "refuses":
            assert all(rle.is_empty_rle(m) for m in masks.values())
        else:
            assert not all(rle.is_empty_rle(m) for m in masks.values())


def _held_out_auc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


@pytest.mark.slow
def test_fitted_heads_tell_buildings_and_scale_on_held_out_tiles(synth_data):
    model, _ = load_model("model:buildings")  # a network that sees buildings: the heads read its features
    records = [dataclasses.replace(r, gsd=0.5) for r in load_records(synth_data / "train.csv")]
    train = draw_crops(records[:4], model_gsd=0.5, per_tile=32, seed=0, crop=64)
    fitted = fit_heads(model, train, ["tile", "scale"])
    test = draw_crops(records[4:], model_gsd=0.5, per_tile=32, seed=1, crop=64)
    vectors = torch.from_numpy(pooled_vectors(fitted, test.images))
    heads = fitted.net.image_heads
    tile = run_head(heads.head("tile"), vectors)[:, 0].numpy()
    assert 0 < test.has_building.sum() < len(test.has_building)
    auc = _held_out_auc(tile, test.has_building)
    assert auc > 0.8  # 0.95 measured
    scale = run_head(heads.head("scale"), vectors)[:, 0].numpy()
    assert np.ptp(test.log2_scale) > 1.0  # the crops span more than a factor of 2
    error = np.median(np.abs(scale - test.log2_scale))
    assert error < SYNTHETIC_SCALE_ERROR


@pytest.mark.slow
def test_a_network_trained_further_starts_without_the_heads_and_a_refused_one_keeps_them(trained_run, tmp_path):
    from buildseg.few_check import keep_init
    from buildseg.training.init import apply_init, load_init_weights
    from buildseg.training.setup import card_from_config

    model, payload = load_model(trained_run / "best.pt")
    heads = _randomise_heads(with_heads(model, ["tile"]), seed=2)
    init = save_atomic(heads_payload(heads, payload, tile_threshold=0.5), tmp_path / "init.pt")
    config = Config()
    config.train.init = str(init)
    loaded = apply_init(config)
    fresh = build_model(card_from_config(config))
    load_init_weights(fresh, loaded, str(init))  # strict for the network, the heads left behind
    assert fresh.card.image_outputs == [] and fresh.net.image_heads is None
    run = tmp_path / "run"
    run.mkdir()
    save_atomic({**payload, "model_card": fresh.card.to_dict(), "model": fresh.state_dict()}, run / "best.pt")
    keep_init(run, str(init))  # the few-label check refused the fine-tune: the init comes back whole
    kept, _ = load_model(run / "best.pt")
    assert kept.output_names == ["footprint", "tile"]


@pytest.mark.slow
def test_tiles_without_a_gsd_are_predicted_at_the_estimated_size(synth_data, tmp_path, capsys):
    """With --gsd-estimate, a scale head that says "2.4x the model's pixel size" gives what --gsd
    2.4x gives; without it, or with a known GSD, the tiles are predicted as they are."""
    model, payload = load_model("model:buildings@1.0")  # finds the synthetic buildings, at 0.5 m; no heads
    plain = save_atomic({**payload, "model_card": model.card.to_dict(), "model": model.state_dict()},
                        tmp_path / "plain.pt")

    def with_scale(log2_scale: float, name: str):
        heads = with_heads(model, ["scale"])
        heads.net.image_heads.set_head("scale", {"b2": torch.tensor([log2_scale])})  # zero weights: a constant
        return save_atomic(heads_payload(heads, payload), tmp_path / name)

    def run(checkpoint, name, *extra) -> dict[str, str]:
        out = tmp_path / f"{name}.csv"
        assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(synth_data / "test.csv"), "--out",
                     str(out), "--engine", "torch", "--precision", "fp32", "--threshold", "0.5", "--no-progress",
                     *extra]) == 0
        return read_rle_table(out)

    coarse = with_scale(1.25, "coarse.pt")  # 2.38x the model's 0.5 m: 1.19 m
    assert run(coarse, "estimated", "--gsd-estimate") == run(plain, "told", "--gsd", "1.1892")
    assert "the model estimates 1.2 m/px" in capsys.readouterr().out
    as_they_are = run(plain, "as_they_are")
    assert as_they_are != run(plain, "told_again", "--gsd", "1.1892")  # the resampling changes something here
    assert run(coarse, "reported") == as_they_are  # without --gsd-estimate the estimate is only reported ...
    printed = capsys.readouterr().out
    assert "the model estimates 1.2 m/px" in printed and "--gsd-estimate to resample" in printed
    assert run(coarse, "known", "--gsd-estimate", "--gsd", "0.5") == as_they_are  # ... and a known GSD wins


@pytest.mark.slow
def test_the_packaged_model_adds_a_scale_head_to_the_previous_version_s_network():
    from buildseg.runtime import packaged

    current, previous = packaged.find("buildings"), packaged.find("buildings@1.0")
    assert previous.version == "1.0" and "image_outputs" not in previous.model_card
    assert current.model_card["image_outputs"] == ["scale"]
    new, _ = load_model("model:buildings")
    old, _ = load_model("model:buildings@1.0")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 96, 96))).float()
    with torch.no_grad():
        out_new, out_old = new(x), old(x)
    assert new.output_names == ["footprint", "scale"] and out_new.shape[1] == 2
    torch.testing.assert_close(out_new[:, :1], out_old)  # the same network: the pixels do not change


@pytest.mark.parametrize("case", ["no scale head", "not tiles"])
def test_gsd_estimate_where_it_cannot_apply_is_one_line(case, synth_data, tmp_path, capsys):
    if case == "no scale head":
        args = ["--model", "buildings@1.0", "--data", str(synth_data / "test.csv"), "--out", str(tmp_path / "o.csv")]
        message = "--gsd-estimate needs a model with a scale head"
    else:
        (tmp_path / "scene.tif").write_bytes(b"")
        args = ["--model", "buildings", "--data", str(tmp_path / "scene.tif"), "--out", str(tmp_path / "o.tif")]
        message = "--gsd-estimate applies to CSV/folder tiles"
    assert main(["predict", *args, "--gsd-estimate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o.csv").exists()
