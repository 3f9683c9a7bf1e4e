"""Typed run configuration: defaults < YAML file < command-line flags.

The YAML has the sections below (every key optional); an unknown section or key is an
error that lists the valid names. ``loss`` is a string (``bce+dice``) or a mapping. The
resolved config is written to the run folder as ``config.yaml``;
``buildseg train --config RUN/config.yaml`` repeats the run.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from buildseg.errors import BuildsegError


@dataclass
class DataConfig:
    train: str | None = None  # competition CSV or images/+masks/ folder
    val: str | None = None  # same; default: hold out val_fraction of the training images
    val_fraction: float = 0.1
    crop_size: int = 224
    crops_per_image: int = 0  # random crops per training image per epoch; 0: image area / crop area
    val_tile: int = 224
    augment: bool = True
    num_workers: int = -1  # -1: min(4, CPU count - 1)


@dataclass
class ModelConfig:
    arch: str = "unet"  # unet | seed_unet | smp.<Name>
    encoder: str = "efficientnet_lite0"  # the ablation's winner on CPU (benchmarks/README.md)
    weights: str = "imagenet"  # imagenet | none | path to .safetensors/.pth
    in_chans: int = 3
    decoder_channels: list[int] | None = None  # default: 256,128,64,32,16 (one per block)
    norm: str = "batch"  # batch | group | none
    dropout: float = 0.0
    attention: str | None = None  # scse | none
    upsample: str = "nearest"  # nearest | bilinear
    deep_supervision: bool = True  # with ds_ensemble: 0.539 vs 0.504 without, in the ablation (benchmarks/README.md)
    ds_weights: list[float] | None = None  # default 1, 0.5, 0.25, ...
    ds_ensemble: bool = True


@dataclass
class TrainConfig:
    out: str | None = None
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    scheduler: str = "cosine"  # cosine | onecycle | plateau | none
    warmup_steps: int = 50
    time_limit: float | None = None  # minutes, fractional allowed; validation included
    time_limit_clock: str = "wall"  # wall | cpu (CPU time of the training process, all threads: fair on a shared machine)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    compile: bool = False
    switch_loss: str | None = None  # e.g. lovasz: the loss from switch_loss_epoch on (the Lovasz authors' advice)
    switch_loss_epoch: int | None = None  # 0-based epoch index at which switch_loss replaces loss
    grad_accum: int = 1
    grad_clip: float | None = 5.0
    ema: float | None = None  # decay, e.g. 0.999; validation and best.pt then use the EMA weights
    early_stopping: int | None = None  # patience in epochs on validation Dice
    seed: int = 0
    deterministic: bool = False
    max_nonfinite: int = 20  # abort after this many non-finite losses in a row
    threshold: float = 0.5  # for validation Dice
    sync_bn: bool = False
    progress: bool = True
    tensorboard: bool = True  # scalars in RUN/tensorboard when the tensorboard package is installed


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: Any = "bce+dice"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_from_dict(data: dict[str, Any] | None, source: str = "config") -> Config:
    """A Config from nested dicts; unknown sections or keys raise with the valid names."""
    config = Config()
    for section, values in (data or {}).items():
        if section == "loss":
            config.loss = values
            continue
        if section not in SECTIONS:
            options = list(SECTIONS) + ["loss"]
            raise BuildsegError(
                f"{source}: unknown section {section!r}{_suggest(section, options)}; valid: {', '.join(options)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise BuildsegError(f"{source}: section {section!r} must be a mapping of keys to values")
        target = getattr(config, section)
        names = [f.name for f in fields(target)]
        for key, value in values.items():
            if key not in names:
                raise BuildsegError(
                    f"{source}: unknown key {section}.{key}{_suggest(key, names)}; valid keys in {section}: {', '.join(names)}"
                )
            setattr(target, key, value)
    return config


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise BuildsegError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BuildsegError(f"{path} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise BuildsegError(f"{path}: expected a mapping with sections data/model/train/loss")
    return config_from_dict(data, source=str(path))


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Set ``section.key`` values (from CLI flags) on ``config``."""
    for dotted, value in overrides.items():
        if dotted == "loss":
            config.loss = value
            continue
        section, key = dotted.split(".", 1)
        setattr(getattr(config, section), key, value)
    return config
