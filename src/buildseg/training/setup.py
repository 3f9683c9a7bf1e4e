"""Everything a run needs before its first step: data, model, losses, run metadata.

Kept apart from the loop (training/loop.py) so that the loop reads on one screen.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from buildseg import __version__
from buildseg.config import Config, config_from_dict
from buildseg.data.corpus import describe_sources, record_weights, with_manifest
from buildseg.data.datasets import EpochSampler, GridTileDataset, TrainCropDataset, split_records
from buildseg.data.store import open_store
from buildseg.distributed import DistInfo
from buildseg.errors import BuildsegError
from buildseg.formats.tables import load_records
from buildseg.losses import DeepSupervisionLoss, TargetsLoss, parse_loss
from buildseg.models.factory import ModelCard, SegmentationModel, build_model
from buildseg.runtime.device import default_workers
from buildseg.training.init import few_label_schedule, load_init_weights
from buildseg.training.signals import ignore_stop_signals

log = logging.getLogger("buildseg")


def card_from_config(config: Config) -> ModelCard:
    """The model card of the configured model (config-only keys such as ``weights`` dropped)."""
    return ModelCard.from_dict(asdict(config.model))


@dataclass
class TrainingData:
    train_set: Dataset  # TrainCropDataset or GeoWindowDataset
    val_set: Dataset  # GridTileDataset or GeoGridDataset: items (image, mask, valid)
    sampler: EpochSampler
    loader: DataLoader
    scenes: list[dict] | None = None  # GeoTIFF scenes: grid, stretch, footprints (written to RUN/scenes.json)


def input_bands(config: Config) -> list[int]:
    """The raster bands the model reads: ``data.bands``, else 1..in_chans."""
    return list(config.data.bands) if config.data.bands else list(range(1, config.model.in_chans + 1))


def check_bands_config(config: Config) -> None:
    """``in_chans`` follows ``--bands``; a contradiction between the two is an error."""
    bands = config.data.bands
    if not bands or len(bands) == config.model.in_chans:
        return
    if config.model.in_chans != 3:
        raise BuildsegError(f"--bands {','.join(map(str, bands))} gives {len(bands)} channels but --in-chans is "
                            f"{config.model.in_chans}; drop --in-chans (it follows --bands)")
    config.model.in_chans = len(bands)
    log.info("in_chans = %d (from --bands %s)", len(bands), ",".join(map(str, bands)))


def check_service_input(config: Config) -> bool:
    """True when ``--data`` is an imagery service, after checking that its flags come with it
    (no file read, nothing written)."""
    from buildseg.formats.tile_services import service_kind

    d = config.data
    if not service_kind(d.train or ""):
        if d.aoi:
            raise BuildsegError(f"--aoi applies to an imagery service (--data https://host/{{z}}/{{x}}/{{y}}.png, a WMTS "
                                f"or a WMS); --data {d.train} is not one")
        return False
    if not d.labels or not d.aoi:
        raise BuildsegError(f"--data {d.train} is an imagery service: give the buildings to learn with --labels FILE "
                            "(e.g. OpenStreetMap buildings of the area) and the area with --aoi FILE")
    return True


def service_scene(config: Config) -> str | None:
    """With ``--data`` an imagery service: the AOI's VRT of it (``data/service_area.py``,
    written under ``OUT/service/``), read like a GeoTIFF scene; None otherwise."""
    d = config.data
    if not check_service_input(config):
        return None
    from buildseg.data.service_area import ServiceOptions, prepare_area

    return str(prepare_area(d.train, d.aoi, Path(config.train.out) / "service", gsd=d.gsd,
                            options=ServiceOptions.of(d)).vrt)


def _datasets(config: Config, dist: DistInfo):
    """(train_set, val_set, description): GeoTIFF scenes + footprints, or the competition records."""
    d, t = config.data, config.train
    fresh = not Path(t.out).exists()
    scenes = service_scene(config) or d.train
    if d.labels:
        from buildseg.data.geo import GeoGridDataset, GeoWindowDataset, prepare_geo_data

        bands = input_bands(config)
        try:
            geo = prepare_geo_data(scenes, d.labels, bands, d.gsd, d.labels_layer, d.val, d.val_region, d.val_fraction,
                                   d.val_tile, t.seed)
        except BuildsegError:
            if fresh and scenes != d.train and dist.is_main:  # labels elsewhere: the area's files go with the refusal
                shutil.rmtree(t.out, ignore_errors=True)
            raise
        train_set = GeoWindowDataset(geo.scenes, bands, crop_size=d.crop_size,
                                     samples_per_epoch=d.crops_per_image * len(geo.scenes), augment=d.augment,
                                     seed=t.seed, positive_fraction=d.positive_fraction, max_nodata=d.max_nodata,
                                     all_touched=d.all_touched, targets=config.model.targets,
                                     augmentations=d.augmentations)
        val_set = GeoGridDataset(geo.scenes, bands, tile=d.val_tile, max_nodata=d.max_nodata, all_touched=d.all_touched)
        if len(val_set) == 0:
            raise BuildsegError(f"the validation area has no {d.val_tile}px tile with at most {d.max_nodata:.0%} nodata; "
                                "enlarge --val-region, lower --val-tile or raise --max-nodata")
        return train_set, val_set, geo.describe()
    if d.bands:
        raise BuildsegError("--bands selects raster bands of GeoTIFF scenes (with --labels); for PNG/CSV data use --in-chans")
    records = load_records(d.train, require_masks=True)
    records = with_manifest(records, d.manifest) if d.manifest else records
    if d.val:
        val_records = load_records(d.val, require_masks=True)
        train_records = records
        val_records = with_manifest(val_records, d.manifest, require_all=False) if d.manifest else val_records
    elif few_label_schedule(config, len(records)):
        train_records, val_records = records, records
    else:
        train_records, val_records = split_records(records, d.val_fraction, t.seed)
        if len(records) < 2:
            log.warning("only one training image: validating on the training image itself")
    in_chans = config.model.in_chans
    store = open_store(train_records, in_chans, d.cache, d.cache_dir, d.cache_ram_fraction,
                       progress=dist.is_main and t.progress)
    train_set = TrainCropDataset(train_records, crop_size=d.crop_size, crops_per_image=d.crops_per_image,
                                 augment=d.augment, seed=t.seed, in_chans=in_chans, store=store,
                                 targets=config.model.targets, augmentations=d.augmentations, scale_range=d.scale_range,
                                 record_weights=record_weights(train_records, d.source_balance), target_gsd=d.gsd,
                                 gsd_jitter=d.gsd_jitter, empty_crops=d.empty_crops)
    if dist.is_main:
        log.info("crops from %s", f"the {store.mode} store" if store else "decoding each image per crop")
        if len({r.tile_source for r in train_records}) > 1 or any(r.gsd for r in train_records):
            for line in describe_sources(train_records, d.source_balance):
                log.info("source %s%s", line, "" if d.gsd else " (no data.gsd: pixels taken as they are)")
    return train_set, GridTileDataset(val_records, tile=d.val_tile, in_chans=in_chans, target_gsd=d.gsd), None


def build_data(config: Config, dist: DistInfo, device: torch.device) -> TrainingData:
    """Training samples (sharded over ranks) and the validation grid of held-out images."""
    d, t = config.data, config.train
    train_set, val_set, scenes = _datasets(config, dist)
    sampler = EpochSampler(train_set, t.seed, dist.rank, dist.world_size)
    workers = default_workers(d.num_workers)
    prefetch = 4 if workers else None
    loader = DataLoader(
        train_set, batch_size=t.batch_size, sampler=sampler, num_workers=workers, prefetch_factor=prefetch,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda", drop_last=len(sampler) >= t.batch_size,
        generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG (dropout) independent of loader restarts
        worker_init_fn=ignore_stop_signals if workers else None,
    )
    if dist.is_main:
        log.info("loader: %d workers (of %d cores), prefetch %s batches each, pin_memory %s",
                 workers, os.cpu_count() or 1, prefetch or 0, device.type == "cuda")
    if len(loader) == 0:
        raise BuildsegError(f"the training set yields no batch ({len(train_set)} samples, batch size {t.batch_size})")
    return TrainingData(train_set, val_set, sampler, loader, scenes)


def build_training_model(config: Config, card: ModelCard, dist: DistInfo, device: torch.device, *,
                         resumed: dict | None = None, init: dict | None = None) -> SegmentationModel:
    """The model on its device: channels_last, and SyncBatchNorm through timm's converter.

    timm's ``convert_sync_batchnorm`` turns ``BatchNormAct2d`` into ``SyncBatchNormAct`` and
    keeps the fused activation; torch's own converter would drop it, and efficientnet would
    train a different network than it predicts with. The state-dict keys stay those of the
    plain model, so checkpoints load for prediction unchanged.
    """
    t = config.train
    model = build_model(card, "none" if resumed or init else config.model.weights)
    if init is not None:  # train --init: every tensor of the init (its weights replace ImageNet's)
        load_init_weights(model, init, t.init)
    model = model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if t.sync_bn:
        if device.type != "cuda" or not dist.enabled:
            raise BuildsegError("--sync-bn synchronises batch norm across GPUs under torchrun (NCCL); "
                                f"this run is on {device.type} in {'one process' if not dist.enabled else 'gloo'}: drop --sync-bn")
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    return model


def freeze_encoder_norms(model: nn.Module, *, everywhere: bool = False) -> list[nn.Module]:
    """Freeze the encoder's batch norms (statistics and affine), or with ``everywhere`` every
    batch norm of the network: small batches on a new domain (or crops of one tile, in a
    few-label fine-tune) then cannot drag the learnt statistics around. Returns the frozen
    modules, which the loop puts back in eval mode after every ``train()``."""
    encoder = getattr(getattr(model, "net", None), "encoder", None)
    if encoder is None and not everywhere:
        raise BuildsegError("train.freeze_encoder_norms needs a model with a separate encoder (unet or seed_unet)")
    frozen = [m for m in (model if everywhere else encoder).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in frozen:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return frozen


def wrap_for_training(model: nn.Module, dist: DistInfo, device: torch.device) -> nn.Module:
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def loss_schedule(config: Config) -> list[torch.nn.Module]:
    """[loss] or [loss, switch_loss]; both parsed now, so a typo fails before training."""
    t = config.train
    def criterion(spec) -> torch.nn.Module:
        loss = DeepSupervisionLoss(parse_loss(spec), config.model.ds_weights)
        targets = config.model.targets
        if len(targets) == 1:
            return loss
        return TargetsLoss(loss, DeepSupervisionLoss(parse_loss(spec), config.model.ds_weights), len(targets))

    criteria = [criterion(config.loss)]
    if (t.switch_loss is None) != (t.switch_loss_epoch is None):
        raise BuildsegError("a loss switch needs both --switch-loss LOSS and --switch-loss-epoch N")
    if t.switch_loss is not None:
        if t.switch_loss_epoch < 0:
            raise BuildsegError(f"--switch-loss-epoch must be >= 0, got {t.switch_loss_epoch}")
        criteria.append(criterion(t.switch_loss))
    return criteria


def environment_info() -> dict[str, Any]:
    import albumentations
    import numpy
    import timm

    commit = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "buildseg": __version__, "git_commit": commit, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "timm": timm.__version__, "albumentations": albumentations.__version__,
        "numpy": numpy.__version__, "argv": sys.argv,
    }


def resume_config(run_dir: str | Path) -> Config:
    """The config a run was started with (its ``config.yaml``), for ``--resume``."""
    import yaml

    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise BuildsegError(f"cannot resume: {saved} does not exist (is {run_dir} a buildseg run folder?)")
    try:
        data = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BuildsegError(f"cannot resume: {saved} is not a readable config ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise BuildsegError(f"cannot resume: {saved} is not a mapping of config sections")
    return config_from_dict(data, source=str(saved))  # migrates a config.yaml of an older version
