"""Every inference engine gives the torch result on random inputs; the ONNX cache works."""


import numpy as np
import pytest
import torch

from buildseg import extras
from buildseg.errors import BuildsegError
from buildseg.inference.core import engines
from buildseg.inference.core.segmenter import Segmenter
from conftest import write_tiny_checkpoint

pytest.importorskip("onnx")
AVAILABLE = [name for name, (module, _) in engines.EXTRAS.items() if extras.installed(module)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    return write_tiny_checkpoint(root / "a.pt", seed=1), write_tiny_checkpoint(root / "b.pt", seed=2)


@pytest.mark.parametrize("engine", AVAILABLE)
@pytest.mark.slow
def test_engine_matches_torch_on_random_inputs(engine, checkpoints):
    a, b = checkpoints
    kwargs = dict(device="cpu", precision="fp32", tta="flip")
    reference = Segmenter.from_checkpoint([a, b], engine="torch", **kwargs)
    compiled = Segmenter.from_checkpoint([a, b], engine=engine, **kwargs)
    rng = np.random.default_rng(0)
    for shape in ((64, 64), (97, 45), (20, 23), (130, 70)):  # odd sizes, below the stride, above the window
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        # 130x70 goes through the sliding window; members are kept
        got = compiled.with_settings(window=64, empty_vote=1).probabilities(image)
        want = reference.with_settings(window=64, empty_vote=1).probabilities(image)
        np.testing.assert_allclose(got.mean[0, 0], want.mean[0, 0], atol=1e-4)
        for got_member, want_member in zip(got.members, want.members, strict=True):
            np.testing.assert_allclose(got_member, want_member, atol=1e-4)
    batch = torch.from_numpy(rng.integers(0, 256, (3, 3, 48, 80), dtype=np.uint8))
    torch.testing.assert_close(torch.from_numpy(compiled.probabilities(batch).mean[:, 0]), torch.from_numpy(reference.probabilities(batch).mean[:, 0]), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif("openvino" not in AVAILABLE, reason="openvino not installed")
@pytest.mark.parametrize("max_shapes", [0, 2])
def test_openvino_static_and_dynamic_compiles_agree(checkpoints, monkeypatch, max_shapes):
    """Static compiles for stride-multiple shapes (least recently used out past max_shapes), the
    dynamic graph for the others: the same probabilities as torch either way."""
    monkeypatch.setattr(engines, "MAX_STATIC_SHAPES", max_shapes)
    reference = Segmenter.from_checkpoint(checkpoints[0], device="cpu", precision="fp32", engine="torch")
    compiled = Segmenter.from_checkpoint(checkpoints[0], device="cpu", precision="fp32", engine="openvino")
    rng = np.random.default_rng(1)
    for shape in ((2, 3, 64, 64), (1, 3, 64, 64), (2, 3, 64, 96), (2, 3, 64, 64), (3, 3, 33, 65)):
        batch = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
        torch.testing.assert_close(torch.from_numpy(compiled.probabilities(batch).mean[:, 0]), torch.from_numpy(reference.probabilities(batch).mean[:, 0]),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", AVAILABLE[:1])  # the cache (engines.cached_onnx) is the same for every engine
@pytest.mark.slow
def test_the_onnx_cache_is_reused_and_rebuilt_when_the_checkpoint_changes(engine, tmp_path, monkeypatch):
    monkeypatch.delenv("BUILDSEG_ENGINE_CACHE", raising=False)  # the folder beside the checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt", seed=3)
    exports = []
    from buildseg.inference.core import onnx_graph

    original = onnx_graph.export_model_onnx

    def counting(model, out, **kwargs):
        exports.append(out)
        return original(model, out, **kwargs)

    monkeypatch.setattr(onnx_graph, "export_model_onnx", counting)
    Segmenter.from_checkpoint(ckpt, device="cpu", precision="fp32", engine=engine)
    Segmenter.from_checkpoint(ckpt, device="cpu", precision="fp32", engine=engine)
    assert len(exports) == 1  # the second run reuses the cached graph
    cached = list((tmp_path / ".buildseg-engines").glob("*.onnx"))
    assert len(cached) == 1
    write_tiny_checkpoint(ckpt, seed=4)  # new weights in the same file
    Segmenter.from_checkpoint(ckpt, device="cpu", precision="fp32", engine=engine)
    assert len(exports) == 2 and len(list((tmp_path / ".buildseg-engines").glob("*.onnx"))) == 2
    shared = tmp_path / "shared"  # one folder for every checkpoint, when the environment names one
    monkeypatch.setenv("BUILDSEG_ENGINE_CACHE", str(shared))
    Segmenter.from_checkpoint(ckpt, device="cpu", precision="fp32", engine=engine)
    assert len(exports) == 3 and len(list(shared.glob("*.onnx"))) == 1


def test_an_engine_that_is_not_installed_names_its_extra(monkeypatch, checkpoints):
    monkeypatch.setattr("buildseg.extras.installed", lambda module: False)
    with pytest.raises(BuildsegError, match=r"buildseg\[cpu\]"):
        Segmenter.from_checkpoint(checkpoints[0], device="cpu", engine="openvino")
    with pytest.raises(BuildsegError, match=r"buildseg\[onnx\]"):
        Segmenter.from_checkpoint(checkpoints[0], device="cpu", engine="onnxruntime")
    assert engines.resolve_engine("auto", torch.device("cpu")) == "torch"  # auto falls back


def test_fp16_is_refused_off_torch():
    with pytest.raises(BuildsegError, match="fp16"):
        engines.build_engine("openvino", None, torch.device("cpu"), "fp16", False)


def test_auto_falls_back_to_torch_when_the_engine_fails(checkpoints, monkeypatch, caplog):
    monkeypatch.setattr(engines, "resolve_engine", lambda name, device: "onnxruntime" if name != "torch" else "torch")
    monkeypatch.setattr("buildseg.inference.core.segmenter.resolve_engine",
                        lambda name, device: "onnxruntime" if name != "torch" else "torch")

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator Foo")

    monkeypatch.setattr(engines, "onnxruntime_engine", broken)
    seg = Segmenter.from_checkpoint(checkpoints[0], device="cpu", precision="fp32", engine="auto")
    assert seg.engine == "torch" and "unsupported operator Foo" in caplog.text
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert seg.probabilities(image).mean[0, 0].shape == (64, 64)
    with pytest.raises(RuntimeError, match="Foo"):  # asked for by name: the failure is the answer
        Segmenter.from_checkpoint(checkpoints[0], device="cpu", precision="fp32", engine="onnxruntime")
