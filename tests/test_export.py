import pytest

from buildseg.cli import main
from buildseg.models import ModelCard, build_model
from buildseg.runtime.checkpoint import FORMAT, save_atomic

pytest.importorskip("onnxruntime")  # installed by `make test` (the onnx extra)


@pytest.mark.slow
def test_onnx_export_parity_dynamic_batch_and_size(tmp_path, capsys):
    card = ModelCard(encoder="resnet18", decoder_channels=[32, 16, 16, 16, 8], deep_supervision=True, ds_ensemble=False)
    model = build_model(card)
    save_atomic({"format": FORMAT, "model_card": card.to_dict(), "model": model.state_dict()}, tmp_path / "m.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    diff = float(out.rsplit("max |logit diff| ", 1)[1].split()[0])
    assert diff < 1e-3 and (tmp_path / "m.onnx").stat().st_size > 1000
