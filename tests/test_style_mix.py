"""Style mixing is training-only: identical at eval and absent from the exported graph."""

from __future__ import annotations

import pytest
import torch

from buildseg.models import ModelCard, build_model
from buildseg.models.style_mix import StyleMix


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    plain = build_model(ModelCard(encoder="resnet18", decoder_channels=[16, 16, 8, 8, 8]))
    torch.manual_seed(seed)
    mixed = build_model(ModelCard(encoder="resnet18", decoder_channels=[16, 16, 8, 8, 8], style_mix=1.0))
    mixed.load_state_dict(plain.state_dict())
    return plain, mixed


def test_style_mix_is_the_identity_at_eval_and_mixes_in_training():
    plain, mixed = _pair()
    x = torch.rand(4, 3, 64, 64) * 255
    plain.eval(), mixed.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), mixed(x))
    plain.train(), mixed.train()
    torch.manual_seed(1)
    with torch.no_grad():
        a = plain(x)[0] if isinstance(plain(x), (list, tuple)) else plain(x)
        b = mixed(x)[0] if isinstance(mixed(x), (list, tuple)) else mixed(x)
    assert not torch.allclose(a, b)


def test_mixing_swaps_statistics_between_images(monkeypatch):
    """With lambda 0 and the images swapped, each image takes its partner's per-channel mean
    and deviation exactly, and keeps its own normalised pattern; lambda 1 changes nothing."""
    x = torch.randn(2, 3, 8, 8) * torch.tensor([1.0, 5.0]).view(2, 1, 1, 1) + torch.tensor([0.0, 10.0]).view(2, 1, 1, 1)
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: torch.tensor([1, 0]))
    mixer = StyleMix(p=1.0)
    for lam in (0.0, 1.0):
        monkeypatch.setattr(mixer, "beta", type("Fixed", (), {"sample": lambda self, shape, lam=lam: torch.full(shape, lam)})())
        out = mixer.mix(x)
        source = x[[1, 0]] if lam == 0.0 else x
        assert torch.allclose(out.mean(dim=(2, 3)), source.mean(dim=(2, 3)), atol=1e-4)
        assert torch.allclose(out.std(dim=(2, 3), unbiased=False), source.std(dim=(2, 3), unbiased=False), atol=1e-3)
        pattern = (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)
        assert torch.allclose((out - out.mean(dim=(2, 3), keepdim=True)) / out.std(dim=(2, 3), keepdim=True), pattern, atol=1e-4)


@pytest.mark.slow
def test_style_mix_is_absent_from_the_exported_onnx_graph(tmp_path):
    pytest.importorskip("onnx")
    import onnx

    from buildseg.inference.core.onnx_graph import export_model_onnx

    plain, mixed = _pair()
    graphs = []
    for name, model in (("plain", plain), ("mixed", mixed)):
        path = tmp_path / f"{name}.onnx"
        export_model_onnx(model.eval(), path)
        graphs.append([node.op_type for node in onnx.load(str(path)).graph.node])
    assert graphs[0] == graphs[1]
