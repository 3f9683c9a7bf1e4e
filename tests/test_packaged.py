"""Packaged models: the shipped file matches its card's sha256 and predicts on every engine;
``--model NAME`` works where a checkpoint is taken; ``train --init`` loads every tensor; bad
use is one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from buildseg.cli import main
from buildseg.errors import BuildsegError
from buildseg.runtime import packaged
from buildseg.runtime.checkpoint import load_checkpoint
from conftest import tiny_config, write_tiny_checkpoint


@pytest.fixture()
def zoo(tmp_path, monkeypatch) -> Path:
    """A private zoo holding one tiny packaged model, ``tiny``."""
    folder = tmp_path / "zoo"
    monkeypatch.setattr(packaged, "ZOO", folder)
    payload = load_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt"))
    payload["input"] = {"gsd": 0.5, "bands": None}
    packaged.write_model(payload, name="tiny", version="0.1", sources=[{"name": "synthetic", "tiles": 1, "terms": "none"}],
                         quality={"headline": "untrained"}, recipe="tests", code_version="test")
    return folder


def test_the_shipped_models_match_their_sha256_and_fit_the_size_limit():
    models = packaged.available()
    assert packaged.DEFAULT_MODEL in [m.name for m in models], "the default packaged model must ship"
    for model in models:
        assert hashlib.sha256(model.weights.read_bytes()).hexdigest() == model.sha256
        assert model.weights.stat().st_size <= 16 * 2**20
        assert all(s.get("terms") for s in model.sources), "every training source names its terms"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "onnxruntime", "openvino"])
def test_the_default_model_loads_and_predicts_on_every_engine(engine):
    from buildseg.inference.core.segmenter import Segmenter

    pytest.importorskip({"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}[engine])
    reference = Segmenter.from_checkpoint(f"model:{packaged.DEFAULT_MODEL}", engine="torch", precision="fp32")
    segmenter = Segmenter.from_checkpoint(f"model:{packaged.DEFAULT_MODEL}", engine=engine, precision="fp32")
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 255, (2, 3, 224, 224), dtype=np.uint8))
    expected = reference.probabilities(images).mean
    assert np.abs(segmenter.probabilities(images).mean - expected).max() < 1e-3


def test_packaged_weights_load_as_a_checkpoint_in_fp32(zoo, tmp_path):
    payload = load_checkpoint("model:tiny")
    original = load_checkpoint(tmp_path / "tiny.pt")
    assert payload["packaged"] == {"name": "tiny", "version": "0.1"} and payload["input"]["gsd"] == 0.5
    for key, tensor in original["model"].items():
        assert payload["model"][key].dtype == tensor.dtype
        assert torch.allclose(payload["model"][key], tensor, atol=1e-3, rtol=1e-3)


def test_a_damaged_weight_file_is_refused_in_one_line(zoo, tmp_path, capsys, synth_data):
    weights = zoo / "tiny.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "sub.csv"
    assert main(["predict", "--model", "tiny", "--data", str(synth_data / "test.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the sha256" in err[0] and "reinstall" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["predict", "--model", "nope", "--data", "D", "--out", "O.csv"], "unknown packaged model 'nope' (known: tiny)"),
    (["predict", "--model", "tiny", "--checkpoint", "x.pt", "--data", "D", "--out", "O.csv"], "not both"),
    (["export", "--onnx", "O.onnx"], "needs --checkpoint"),
    (["tune", "--model", "tiny", "--data", "D"], "read-only; add --out DIR"),
    (["models", "--name", "nope"], "unknown packaged model"),
])
def test_bad_use_of_a_packaged_model_is_one_line(zoo, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_models_lists_the_zoo_and_one_card(zoo, capsys):
    assert main(["models"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["name", "version", "arch"] and table[1].startswith("tiny")
    assert main(["models", "--name", "tiny", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["sources"][0]["terms"] == "none" and card["sha256"] == hashlib.sha256(
        (zoo / "tiny.safetensors").read_bytes()).hexdigest()


def test_predict_with_model_equals_predict_with_the_checkpoint(zoo, tmp_path, synth_data):
    """--model NAME is the same network as the checkpoint it was packaged from (fp16 storage:
    masks equal up to pixels at the threshold)."""
    from buildseg.formats.tables import read_rle_table

    args = ["--data", str(synth_data / "test.csv"), "--engine", "torch", "--precision", "fp32"]
    assert main(["predict", "--model", "tiny", *args, "--out", str(tmp_path / "a.csv")]) == 0
    assert main(["predict", "--checkpoint", str(tmp_path / "tiny.pt"), *args, "--out", str(tmp_path / "b.csv")]) == 0
    a, b = read_rle_table(tmp_path / "a.csv"), read_rle_table(tmp_path / "b.csv")
    assert list(a) == list(b)
    assert a == b or sum(x != y for x, y in zip(a.values(), b.values())) <= 1


@pytest.mark.slow
def test_init_loads_every_tensor_of_a_run_and_of_a_packaged_model(zoo, tmp_path, synth_data, trained_run):
    from buildseg.distributed import SINGLE_PROCESS
    from buildseg.training.init import apply_init
    from buildseg.training.setup import build_training_model, card_from_config

    for spec, source in ((str(trained_run), load_checkpoint(trained_run)), ("tiny", load_checkpoint("model:tiny"))):
        config = tiny_config(synth_data, tmp_path / "run")
        config.model.decoder_channels = None  # a default (not the user's choice): the init's card replaces it
        config.model.encoder = "efficientnet_lite0"
        config.train.init = spec
        init = apply_init(config)
        model = build_training_model(config, card_from_config(config), SINGLE_PROCESS, torch.device("cpu"), init=init)
        state = model.state_dict()
        assert set(state) == set(source["model"])
        for key, tensor in source["model"].items():
            assert torch.equal(state[key], tensor), key
        assert config.data.gsd == (0.5 if spec == "tiny" else None)


def test_init_refuses_other_bands_or_a_conflicting_architecture(zoo, tmp_path, synth_data):
    from buildseg.training.init import apply_init

    config = tiny_config(synth_data, tmp_path / "run")
    config.train.init = "tiny"
    config.model.in_chans = 4
    with pytest.raises(BuildsegError, match="trained with in_chans 3 but this run has 4"):
        apply_init(config)
    config = tiny_config(synth_data, tmp_path / "run")
    config.train.init = "tiny"
    config.model.encoder = "resnet34"
    with pytest.raises(BuildsegError, match="drop the encoder setting"):
        apply_init(config)
    config.train.init = "runs/none/best.pt"
    with pytest.raises(BuildsegError, match="no such run folder or checkpoint"):
        apply_init(config)


@pytest.mark.slow
def test_train_init_from_a_packaged_model_runs_end_to_end(zoo, tmp_path, synth_data):
    out = tmp_path / "ft"
    code = main(["train", "--init", "tiny", "--data", str(synth_data / "train.csv"), "--out", str(out), "--epochs", "1",
                 "--crop-size", "64", "--val-tile", "64", "--num-workers", "0", "--batch-size", "4", "--precision", "fp32",
                 "--no-progress", "--no-quantize-at-end", "--no-tune-at-end", "--few-steps", "3"])
    assert code == 0
    saved = load_checkpoint(out / "best.pt")
    assert saved["model_card"]["encoder"] == "resnet18" and saved["input"]["gsd"] == 0.5
    shutil.rmtree(out)


def test_tune_out_gives_a_packaged_model_the_places_rule_in_a_new_run(zoo, tmp_path, synth_data, capsys):
    """A few labelled tiles of a place tune the packaged model into a run; the package is untouched."""
    before = (zoo / "tiny.safetensors").read_bytes()
    out = tmp_path / "mine"
    assert main(["tune", "--model", "tiny", "--data", str(synth_data / "test_truth.csv"), "--tile", "64", "--out",
                 str(out), "--engine", "torch"]) == 0
    assert f"predict with --checkpoint {out}" in capsys.readouterr().out
    tuned = load_checkpoint(out / "best.pt")
    assert main(["tune", "--model", "tiny", "--data", str(synth_data / "test_truth.csv"), "--tile", "64", "--no-save",
                 "--json", str(tmp_path / "rows.json"), "--engine", "torch"]) == 0
    best = json.loads((tmp_path / "rows.json").read_text())[0]  # the search's winner, best first
    assert {k: tuned["postprocess"][k] for k in ("threshold", "min_area", "empty_max_prob")} == \
        {k: best[k] for k in ("threshold", "min_area", "empty_max_prob")}
    assert (zoo / "tiny.safetensors").read_bytes() == before
    for key, tensor in load_checkpoint("model:tiny")["model"].items():
        assert torch.equal(tuned["model"][key], tensor)


def test_an_archived_version_reuses_the_network_it_shares(zoo, tmp_path):
    """archive(reuse=...): an older version kept by name stores only the tensors it does not share
    with the named version, and loads back whole (the way buildings@1.1 keeps its scale head)."""
    original = load_checkpoint("model:tiny")
    packaged.archive("tiny")  # tiny@0.1: a full copy
    changed = dict(original["model"])
    key = next(k for k, v in changed.items() if v.is_floating_point() and v.numel() > 1)
    changed[key] = changed[key] + 1.0
    packaged.write_model({**original, "model": changed}, name="tiny", version="0.2", sources=[], recipe="tests")
    packaged.archive("tiny", reuse="tiny@0.1")  # tiny@0.2: only the changed tensor
    packaged.write_model(original, name="tiny", version="0.3", sources=[], recipe="tests")
    from safetensors.torch import load_file

    assert list(load_file(str(zoo / "tiny@0.2.safetensors"))) == [key]
    kept = load_checkpoint("model:tiny@0.2")
    assert kept["packaged"] == {"name": "tiny@0.2", "version": "0.2"}
    assert set(kept["model"]) == set(changed)
    for name, tensor in changed.items():
        assert torch.equal(kept["model"][name], tensor.half().float() if tensor.is_floating_point() else tensor), name
    assert torch.equal(load_checkpoint("model:tiny@0.1")["model"][key], original["model"][key])
