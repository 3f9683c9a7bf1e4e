"""Shared fixtures: a small synthetic competition-format dataset made on the fly, one
engine cache for the whole test run, and one torch thread per pytest-xdist worker."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from buildseg.config import Config
from buildseg.data.synth import write_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one thread each, no oversubscription
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the subprocesses the tests start
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _one_engine_cache(tmp_path_factory):
    """Every test's ONNX/OpenVINO graphs in one folder: a checkpoint with the same weights
    (write_tiny_checkpoint's seeds) is exported once per run, not once per test."""
    previous = os.environ.get("BUILDSEG_ENGINE_CACHE")
    os.environ["BUILDSEG_ENGINE_CACHE"] = str(tmp_path_factory.mktemp("engines"))
    yield
    if previous is None:
        os.environ.pop("BUILDSEG_ENGINE_CACHE", None)
    else:
        os.environ["BUILDSEG_ENGINE_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def _precision_by_rule():
    """``--precision auto`` by the flag rule, not by timing, so a test's precision (and its
    outputs) cannot depend on the machine's load; tests/test_precision_choice.py measures."""
    previous = os.environ.get("BUILDSEG_PRECISION_AUTO")
    os.environ["BUILDSEG_PRECISION_AUTO"] = "rule"
    yield
    if previous is None:
        os.environ.pop("BUILDSEG_PRECISION_AUTO", None)
    else:
        os.environ["BUILDSEG_PRECISION_AUTO"] = previous


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """6 training scenes of 256 px and 12 test tiles of 64 px, with truth."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n_train=6, train_size=256, n_test=12, test_size=64, seed=1, progress=False)
    return root


@pytest.fixture(scope="session")
def trained_run(synth_data, tmp_path_factory) -> Path:
    """One tiny trained run folder per test run (per xdist worker), for the tests that need
    *a* trained checkpoint. Read it; copy it (``copy_run``) before changing anything in it."""
    from buildseg.training.loop import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(synth_data, out, epochs=2, lr=3e-3))
    return out


def copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".buildseg-engines"))
    return dest


def tiny_config(data: Path, out: Path, **train) -> Config:
    """A fast configuration: resnet18, narrow decoder, 64 px crops, fp32, no workers."""
    config = Config()
    config.data.train = str(data / "train.csv")
    config.data.crop_size = 64
    config.data.val_tile = 64
    config.data.crops_per_image = 2
    config.data.num_workers = 0
    config.model.encoder = "resnet18"
    config.model.weights = "none"
    config.model.decoder_channels = [32, 16, 16, 16, 8]
    config.train.out = str(out)
    config.train.epochs = 1
    config.train.batch_size = 4
    config.train.precision = "fp32"
    config.train.progress = False
    config.train.warmup_steps = 1
    config.train.quantize_at_end = False  # the int8 step has its own tests (test_int8.py)
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


@pytest.fixture(autouse=True)
def _quiet_timm():
    logging.getLogger("timm").setLevel(logging.ERROR)


def random_mask(rng: np.random.Generator, shape, density: float | None = None) -> np.ndarray:
    density = rng.choice([0.0, 0.01, 0.3, 0.7, 1.0]) if density is None else density
    return (rng.random(shape) < density).astype(np.uint8)


def write_tiny_checkpoint(path: Path, in_chans: int = 3, seed: int = 0) -> Path:
    """A buildseg checkpoint of a small untrained UNet (no training: fast), for inference tests."""
    import torch

    from buildseg.models import ModelCard, build_model
    from buildseg.runtime.checkpoint import FORMAT, save_atomic

    torch.manual_seed(seed)
    card = ModelCard(encoder="resnet18", in_chans=in_chans, decoder_channels=[16, 16, 8, 8, 8], deep_supervision=False, ds_ensemble=False)
    model = build_model(card)
    payload = {"format": FORMAT, "model_card": card.to_dict(), "model": model.state_dict(),
               "postprocess": {"threshold": 0.5, "min_area": 0}}
    return save_atomic(payload, path)


class LocalModel(torch.nn.Module):
    """A stand-in model with a small receptive field (a fixed 5x5 conv, radius 2, zero
    padding): its prediction of a pixel depends only on the pixels within 2 px, so tiled
    and whole-image predictions can be compared exactly. ``bias`` shifts every logit."""

    def __init__(self, in_chans: int = 3, seed: int = 0, bias: float = 0.0) -> None:
        from buildseg.models import ModelCard

        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(in_chans, 1, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.2)
            self.conv.bias.fill_(bias)
        self.card = ModelCard(in_chans=in_chans, deep_supervision=False, ds_ensemble=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv((x.float() - 127.5) / 64.0)
