"""Typed run configuration: defaults < YAML file < command-line flags.

The YAML has the sections below (every key optional); an unknown section or key is an
error that lists the valid names. ``loss`` is a string (``bce+dice``) or a mapping. The
resolved config is written to the run folder as ``config.yaml``;
``buildseg train --config RUN/config.yaml`` repeats the run.

Every value is coerced to its field's declared type when it is read, from YAML and from
flags alike (:func:`coerce`), and checked against the key's rule (:data:`RULES`), so a
wrong value fails at once with one line naming the key, the value and what is expected,
instead of deep inside torch. PyYAML reads ``1e-3`` as a string (YAML 1.1 needs a dot:
``1.0e-3``); numbers in scientific notation are accepted either way.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from buildseg.atomic import atomic_open
from buildseg.errors import BuildsegError
from buildseg.models.card import CARD_ONLY, ModelCard
from buildseg.runtime.precisions import PRECISIONS
from buildseg.schema import SCHEMA_VERSION, upgrade_config
from buildseg.settings.models import OBJECTIVES
from buildseg.settings.predict import MAX_CONNECTIONS, MAX_TILES
from buildseg.settings.train import AUGMENTATIONS, SOURCE_BALANCES


@dataclass
class DataConfig:
    train: str | None = None  # competition CSV or images/+masks/ folder
    val: str | None = None  # same; default: hold out val_fraction of the training images
    val_fraction: float = 0.1
    manifest: str | None = None  # CSV joined by img_id: source (or source_dataset) and gsd (or gsd_m) per tile
    source_balance: str = "sqrt"  # a source's share of the crops: none (its size) | sqrt (sqrt of its size) | equal
    gsd_jitter: float = 0.15  # tiles of known GSD are resampled to data.gsd x exp(u), u uniform in +-this
    crop_size: int = 224
    crops_per_image: int = 0  # random crops per training image per epoch; 0: image area / crop area
    empty_crops: float = 0.0  # share of tile crops placed on the tile's building-free ground (ten tries); each
    # source then gives its own negatives (fields, water, bare soil). 0: crops anywhere
    val_tile: int = 224
    augment: bool = True
    augmentations: list[str] = field(default_factory=lambda: ["d4", "colour"])  # see data/augment.py for the names
    scale_range: list[float] = field(default_factory=lambda: [0.6, 1.6])  # with "scale": crop x s, s log-uniform in it
    num_workers: int = -1  # -1: from the CPU count (per process under torchrun), at most 16
    cache: str = "auto"  # decoded-image store: auto (ram if it fits cache_ram_fraction, else disk) | disk | ram | none
    cache_dir: str | None = None  # default ~/.cache/buildseg/decoded ($XDG_CACHE_HOME)
    cache_ram_fraction: float = 0.25
    # GeoTIFF scenes + vector footprints (used when labels is set; data.train then lists the scenes)
    labels: list[str] | None = None  # footprint files: GeoJSON, GPKG, Shapefile, GeoParquet, ...
    labels_layer: str | None = None  # layer name in a multi-layer file (GeoPackage)
    all_touched: bool = False  # rasterise every pixel a polygon touches (default: pixel centres inside)
    gsd: float | None = None  # metres per pixel to resample scenes, and tiles of known GSD, to; default: as they are
    bands: list[int] | None = None  # 1-based raster bands to read; default 1..in_chans (in_chans follows bands)
    positive_fraction: float = 0.5  # share of training windows centred on a building (rest drawn building-free)
    max_nodata: float = 0.2  # windows with a larger nodata share are never used
    val_region: str | None = None  # "minx,miny,maxx,maxy" in the scenes' CRS, or a vector file: held out
    # an imagery service as the scene: data.train an XYZ/TMS URL template, a WMTS or a WMS URL (with labels)
    aoi: str | None = None  # the area to learn from (any vector file, any CRS); its box, snapped to tiles, is the scene
    zoom: int | None = None  # the service's zoom (default: the one closest to data.gsd, else 0.5 m)
    layer: str | None = None  # WMS (required) or WMTS (when it has several): the layer
    tms: bool = False  # XYZ template in TMS row order (same as {-y})
    tile_cache: str | None = None  # GDAL's tile cache (default ~/.cache/buildseg/tiles)
    max_connections: int = MAX_CONNECTIONS  # concurrent tile requests
    max_tiles: int = MAX_TILES  # the most 256 px tiles the AOI's window may cover (checked before any file or request)


def _model_config_fields() -> list[tuple[str, str, Any]]:
    """The ``model`` section: the model card's fields with the card's defaults (declared once,
    in models/card.py), plus what only training needs (initial weights, head weights)."""
    out: list[tuple[str, str, Any]] = []
    for f in fields(ModelCard):
        if f.name in CARD_ONLY:
            continue
        default = field(default=f.default) if f.default is not MISSING else field(default_factory=f.default_factory)
        out.append((f.name, str(f.type), default))
        if f.name == "encoder":
            out.append(("weights", "str", field(default="imagenet")))  # imagenet | none | path to .safetensors/.pth
        if f.name == "deep_supervision":
            out.append(("ds_weights", "list[float] | None", field(default=None)))  # default 1, 0.5, 0.25, ...
    return out


ModelConfig = make_dataclass("ModelConfig", _model_config_fields())
ModelConfig.__doc__ = "The YAML section 'model:': the ModelCard's keys and defaults, plus weights and ds_weights."
ModelConfig.__module__ = __name__


@dataclass
class TrainConfig:
    out: str | None = None
    init: str | None = None  # start the whole network (encoder, decoder, heads) from a packaged model NAME, a run or a .pt
    few_tiles: int = 20  # --init on at most this many tiles without --val-data: the few-label schedule (training/init.py)
    few_steps: int = 100  # few-label schedule: optimizer steps (the stopping rule: no tiles are set aside to validate)
    few_lr: float = 5e-5  # few-label schedule below few_many tiles: peak learning rate (one-cycle, few_steps // 10
    # warm-up; 2e-4 broke k=3)
    few_many: int = 10  # few-label schedule from this many tiles: peak rate few_lr_many, and the norms train (k=10
    # measured: benchmarks/README.md "buildings 2.0")
    few_lr_many: float = 1e-3
    few_freeze_norms: str = "auto"  # few-label schedule: every batch norm keeps the init's statistics and affine: auto
    # (below few_many tiles) | on | off
    few_check: bool = True  # few-label schedule: keep the fine-tune only if it beats the init on held-out halves of the
    # labels (two more half-runs first; few_check.py)
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    scheduler: str = "onecycle"  # onecycle | cosine | plateau | none (both follow the time limit); onecycle won the
    # generalisation ablation (benchmarks/README.md)
    encoder_lr_scale: float = 1.0  # the encoder's learning rate = lr x this (e.g. 0.1 for a pretrained encoder)
    warmup_steps: int = 50
    time_limit: float | None = None  # minutes, fractional allowed; validation included
    time_limit_clock: str = "wall"  # wall | cpu (CPU time of the training process, all threads: fair on a shared machine)
    save_every: float = 10.0  # minutes (wall clock) between mid-epoch last.pt checkpoints; 0: only per epoch
    val_every: int | None = None  # optimizer steps between validations (long epochs); default: once per epoch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    compile: bool = False
    switch_loss: str | None = None  # e.g. lovasz: the loss from switch_loss_epoch on (the Lovasz authors' advice)
    switch_loss_epoch: int | None = None  # 0-based epoch index at which switch_loss replaces loss
    grad_accum: int = 1
    grad_clip: float | None = 5.0
    ema: float | None = None  # decay, e.g. 0.999; validation and best.pt then use the EMA weights
    freeze_encoder_norms: bool = False  # keep the encoder's batch norms at their pretrained statistics and affine
    freeze_all_norms: bool = False  # ... every batch norm of the network (the few-label schedule sets it)
    progressive_crop: int | None = None  # side (px) of the first crops; grows to crop_size over the first half of the run
    early_stopping: int | None = None  # patience in validations on validation Dice
    seed: int = 0
    deterministic: bool = False
    max_nonfinite: int = 20  # abort after this many non-finite losses in a row
    threshold: float = 0.5  # for validation Dice
    monitor: str = "dice"  # dice | f1 (building F1 at IoU 0.5): what best.pt and early stopping follow
    keep_last: bool = False  # best.pt holds the last weights, not the best-scoring (the few-label schedule sets it)
    tune_at_end: bool = True  # search threshold x min-area x empty rule on the validation tiles; stored in best.pt
    quantize_at_end: bool = True  # int8 OpenVINO model of best.pt, kept if it holds the validation Dice (cpu extra)
    quantize_time_limit: float = 5.0  # minutes the end-of-training int8 step may take; past it the model is refused
    sync_bn: bool = False  # SyncBatchNorm across GPUs under torchrun (timm's converter keeps fused activations)
    progress: bool = True
    tensorboard: bool = True  # scalars in RUN/tensorboard when the tensorboard package is installed


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: Any = "bce+dice"

    def to_dict(self) -> dict[str, Any]:
        """Every key, with the schema version that :func:`config_from_dict` migrates from."""
        return {"version": SCHEMA_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> None:
        with atomic_open(path, "w") as handle:
            handle.write(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
TARGETS = ("footprint", "contact")
PATH_LISTS = {"data.labels"}  # lists of file paths: a string is one path, never split on commas


# -- value rules beyond the type: (check, what is expected) ----------------------------------
def _choice(*options: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), "one of " + ", ".join(options)


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low:g}"


def _between(low: float, high: float, closed_high: bool = False) -> tuple[Callable[[Any], bool], str]:
    if closed_high:
        return (lambda v: low <= v <= high), f"in [{low:g}, {high:g}]"
    return (lambda v: low <= v < high), f"in [{low:g}, {high:g})"


def _open_unit() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: 0 < v < 1), "strictly between 0 and 1"


def _device_ok(value: str) -> bool:
    if value in ("auto", "cpu", "cuda"):
        return True
    return value.startswith("cuda:") and value[5:].isdigit()


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.val_fraction": _between(0.0, 1.0),
    "data.source_balance": _choice(*SOURCE_BALANCES),
    "data.gsd_jitter": _between(0.0, 1.0),
    "data.crop_size": _at_least(16),
    "data.crops_per_image": _at_least(0),
    "data.empty_crops": _between(0.0, 1.0, closed_high=True),
    "data.val_tile": _at_least(16),
    "data.num_workers": _at_least(-1),
    "data.cache": _choice("auto", "disk", "ram", "none"),
    "data.cache_ram_fraction": _between(0.0, 1.0, closed_high=True),
    "data.augmentations": ((lambda v: set(v) <= set(AUGMENTATIONS)), "names from " + ", ".join(AUGMENTATIONS)),
    "data.scale_range": ((lambda v: len(v) == 2 and 0.25 <= v[0] <= v[1] <= 4.0), "two factors lo hi in [0.25, 4]"),
    "data.gsd": ((lambda v: v > 0), "> 0 metres per pixel"),
    "data.bands": ((lambda v: len(v) > 0 and all(b >= 1 for b in v)), "1-based band numbers, e.g. 1,2,3"),
    "data.positive_fraction": _between(0.0, 1.0, closed_high=True),
    "data.max_nodata": _between(0.0, 1.0),
    "data.zoom": ((lambda v: 0 <= v <= 23), "a zoom level 0..23"),
    "data.max_connections": ((lambda v: 1 <= v <= 32), "1..32 concurrent requests"),
    "data.max_tiles": ((lambda v: v >= 1), ">= 1 tiles"),
    "model.arch": ((lambda v: v in ("unet", "seed_unet") or v.startswith("smp.")), "unet, seed_unet or smp.<Name>"),
    "model.in_chans": _at_least(1),
    "model.style_mix": _between(0.0, 1.0, closed_high=True),
    "model.decoder_channels": ((lambda v: len(v) > 0 and all(c >= 1 for c in v)), "a non-empty list of positive ints"),
    "model.decoder_width": ((lambda v: 0 < v <= 4), "in (0, 4], e.g. 0.5 for half-width decoder convolutions"),
    "model.norm": _choice("batch", "group", "none"),
    "model.dropout": _between(0.0, 0.5, closed_high=True),
    "model.attention": _choice("scse", "none"),
    "model.upsample": _choice("nearest", "bilinear"),
    "model.input_norm": _choice("dataset", "image"),
    "model.targets": ((lambda v: len(v) == len(set(v)) and v[:1] == ["footprint"] and set(v) <= set(TARGETS)),
                      "footprint first, then optionally contact (e.g. footprint,contact)"),
    "model.ds_weights": ((lambda v: len(v) > 0 and all(w >= 0 for w in v)), "a non-empty list of weights >= 0"),
    "train.epochs": _at_least(1),
    "train.batch_size": _at_least(1),
    "train.lr": ((lambda v: v > 0), "> 0"),
    "train.few_lr": ((lambda v: v > 0), "> 0"),
    "train.few_lr_many": ((lambda v: v > 0), "> 0"),
    "train.few_many": _at_least(1),
    "train.few_freeze_norms": _choice("auto", "on", "off"),
    "train.few_tiles": _at_least(0),
    "train.few_steps": _at_least(1),
    "train.weight_decay": _at_least(0),
    "train.optimizer": _choice("adamw", "sgd"),
    "train.scheduler": _choice("cosine", "onecycle", "plateau", "none"),
    "train.warmup_steps": _at_least(0),
    "train.encoder_lr_scale": ((lambda v: 0 < v <= 10), "in (0, 10]"),
    "train.time_limit": ((lambda v: v > 0), "> 0 minutes"),
    "train.time_limit_clock": _choice("wall", "cpu"),
    "train.save_every": _at_least(0),
    "train.val_every": _at_least(1),
    "train.device": (_device_ok, "auto, cpu, cuda or cuda:N"),
    "train.precision": _choice(*PRECISIONS),
    "train.switch_loss_epoch": _at_least(0),
    "train.grad_accum": _at_least(1),
    "train.grad_clip": ((lambda v: v > 0), "> 0 (or none)"),
    "train.ema": _open_unit(),
    "train.progressive_crop": ((lambda v: v >= 32 and v % 32 == 0), "a multiple of 32, at least 32"),
    "train.early_stopping": _at_least(1),
    "train.max_nonfinite": _at_least(1),
    "train.threshold": _open_unit(),
    "train.monitor": _choice(*OBJECTIVES),
    "train.quantize_time_limit": ((lambda v: v > 0), "> 0 minutes"),
}

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


class _Invalid(Exception):
    """Internal: the value does not convert; the caller words the error."""


def _scalar(value: Any, kind: str) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Invalid
    if kind == "int":
        if isinstance(value, bool):
            raise _Invalid
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                value = float(value.strip())  # 1e3
            except ValueError:
                raise _Invalid from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Invalid
    if kind == "float":
        if isinstance(value, bool):
            raise _Invalid
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Invalid from None
        raise _Invalid
    if kind == "str":
        if isinstance(value, str):
            return value
        raise _Invalid
    return value  # Any


def _list_items(value: Any, item: str) -> list[Any]:
    """The items of a list value: YAML lists as they are; strings split on commas and spaces
    too (``--bands 1,2,3``, ``--targets footprint,contact``, ``decoder_channels: 32 16 8``),
    except for lists of file paths (``item == "path"``): a path may contain spaces or commas."""
    items = list(value) if isinstance(value, (list, tuple)) else [value] if isinstance(value, str) else None
    if items is None:
        raise _Invalid
    if item == "path":
        return items
    return [piece for v in items for piece in (v.replace(",", " ").split() if isinstance(v, str) else [v])]

def coerce(value: Any, annotation: str, key: str, source: str) -> Any:
    """``value`` converted to the declared type ``annotation`` (a dataclass field's), checked
    against the key's rule; a :class:`BuildsegError` naming source, key and value otherwise."""
    optional = annotation.endswith(" | None")
    kind = annotation.removesuffix(" | None")
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional or kind == "Any":
            return None
        raise BuildsegError(f"{source}: {key} must not be empty; expected {_TYPE_WORDS.get(kind, kind)}")
    try:
        if kind.startswith("list["):
            item = kind[5:-1]
            items = _list_items(value, item if key not in PATH_LISTS else "path")
            result: Any = [_scalar(v, item) for v in items]
        else:
            result = _scalar(value, kind)
    except _Invalid:
        expected = _TYPE_WORDS.get(kind, kind)
        if kind.startswith("list["):
            expected = f"a list of {_TYPE_WORDS.get(kind[5:-1], kind[5:-1])}s, e.g. [32, 16, 8]"
        raise BuildsegError(f"{source}: {key} = {value!r} is not {expected}{' (or none)' if optional else ''}") from None
    rule = RULES.get(key)
    if rule is not None and not rule[0](result):
        raise BuildsegError(f"{source}: {key} = {value!r} is out of range; expected {rule[1]}")
    return result


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_types(section: str) -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(SECTIONS[section])}


def config_from_dict(data: dict[str, Any] | None, source: str = "config") -> Config:
    """A Config from nested dicts; unknown sections or keys and wrong types raise with the valid names.

    Every reader of a config (``--config``, ``--resume``, a checkpoint's copy) comes through
    here, so a saved config of an older version is migrated (:func:`buildseg.schema.upgrade_config`).
    """
    config = Config()
    if data and not isinstance(data.get("version", 1), int):
        raise BuildsegError(f"{source}: version = {data['version']!r} is not an integer (the config schema version)")
    if data and int(data.get("version", 1)) > SCHEMA_VERSION:
        raise BuildsegError(f"{source}: written by a newer buildseg (config version {data['version']} > "
                            f"{SCHEMA_VERSION}); upgrade buildseg")
    for section, values in upgrade_config(data or {}).items():
        if section == "loss":
            config.loss = values
            continue
        if section not in SECTIONS:
            options = list(SECTIONS) + ["loss", "version"]
            raise BuildsegError(
                f"{source}: unknown section {section!r}{_suggest(str(section), options)}; valid: {', '.join(options)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise BuildsegError(f"{source}: section {section!r} must be a mapping of keys to values")
        target = getattr(config, section)
        types = _field_types(section)
        for key, value in values.items():
            if key not in types:
                raise BuildsegError(
                    f"{source}: unknown key {section}.{key}{_suggest(str(key), list(types))}; "
                    f"valid keys in {section}: {', '.join(types)}"
                )
            setattr(target, key, coerce(value, types[key], f"{section}.{key}", source))
    return config


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise BuildsegError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BuildsegError(f"{path} is not UTF-8 text; save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise BuildsegError(f"{path} is not valid YAML: {first}") from None
    if data is not None and not isinstance(data, dict):
        raise BuildsegError(f"{path}: expected a mapping with sections data/model/train/loss")
    return config_from_dict(data, source=str(path))


def apply_overrides(config: Config, overrides: dict[str, Any], flags: dict[str, str] | None = None) -> Config:
    """Set ``section.key`` values (from CLI flags, named in errors by ``flags``) on ``config``."""
    for dotted, value in overrides.items():
        if dotted == "loss":
            config.loss = value
            continue
        section, key = dotted.split(".", 1)
        source = (flags or {}).get(dotted, dotted)
        setattr(getattr(config, section), key, coerce(value, _field_types(section)[key], dotted, source))
    return config


# -- the command line of `buildseg train`: one flag per key --------------------------------
FLAG_NAMES = {"data.train": "--data", "data.val": "--val-data", "train.out": "--out"}  # flags named unlike their key


def flag_name(dotted: str) -> str:
    return FLAG_NAMES.get(dotted, "--" + dotted.split(".", 1)[1].replace("_", "-"))


def add_config_flags(parser) -> None:
    """One flag per config key (``model.deep_supervision`` -> ``--deep-supervision``), parsed
    by :func:`coerce` like YAML, so the YAML keys and the flags cannot drift apart."""
    import argparse

    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} (YAML section '{section}:')")
        for f in fields(cls):
            dotted = f"{section}.{f.name}"
            kind = str(f.type)
            shown = f.default if f.default is not MISSING else f.default_factory()
            common = dict(dest=dotted, default=argparse.SUPPRESS, help=f"{dotted} (default: {'none' if shown is None else shown})")
            if kind == "bool":
                group.add_argument(flag_name(dotted), action=argparse.BooleanOptionalAction, **common)
            else:
                group.add_argument(flag_name(dotted), nargs="+" if kind.startswith("list[") else None, **common)
    parser.add_argument("--loss", dest="loss", default=argparse.SUPPRESS,
                        help="loss sum, e.g. bce+dice, 'bce:0.5,dice:1,lovasz:0.5' (default: bce+dice)")


def overrides_from(args) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if "." in k or k == "loss"}
