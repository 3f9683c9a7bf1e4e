"""Commands around data: ``synth`` (a synthetic competition-format dataset), ``demo`` (the
whole pipeline on it) and ``cache`` (decode a training set once)."""

from __future__ import annotations

from dataclasses import dataclass

from buildseg.settings.fields import Settings, setting


@dataclass(frozen=True)
class SynthSettings(Settings):
    COMMAND = "synth"

    out: str = setting(None, "folder to write train.csv, test.csv, test_truth.csv and the images to", required=True)
    n_train: int = setting(16, "training images", low=1)
    train_size: int = setting(1024, "training image side in pixels", low=32)
    n_test: int = setting(200, "test tiles", low=0)
    test_size: int = setting(224, "test tile side in pixels", low=32)
    seed: int = setting(0, "random seed")


@dataclass(frozen=True)
class DemoSettings(Settings):
    COMMAND = "demo"

    out: str = setting("demo_out", "folder for the data, the run, the submission and the overlays")
    minutes: float = setting(4.0, "training time budget", low=0, low_open=True)
    encoder: str = setting("resnet18", "timm encoder")


@dataclass(frozen=True)
class CacheSettings(Settings):
    COMMAND = "cache"

    data: str = setting(None, "training CSV or images/+masks/ folder", required=True)
    cache_dir: str | None = setting(None, "store folder (default ~/.cache/buildseg/decoded)")
    in_chans: int = setting(3, "channels the model will read", low=1)
