"""The versions of what buildseg saves, and the one migration from each old version.

Three things outlive a buildseg version: the model card (how to rebuild a network), the
run config (``RUN/config.yaml``) and the checkpoint around them. Every reader goes through
the functions here (resume, ``--config RUN/config.yaml``, predict, export, tune), so an old
run rebuilds *the network it trained*, not the one today's defaults would build.

Version history (bump :data:`SCHEMA_VERSION` and add a step when a saved default changes):

1. Before ``decoder_width`` (and before the version was written down): the decoder had the
   full default widths (256-128-64-32-16), a bare model card defaulted to resnet34 without
   deep supervision, and the checkpoint's monitored score was stored as ``best_dice``.
2. ``decoder_width`` (default 0.5), one set of model defaults shared by the config and the
   card, ``best_score`` + ``monitor`` in checkpoints, a ``version`` key in ``config.yaml``.

Pure dict transforms with no imports from buildseg, so any layer may use them.
"""

from __future__ import annotations

import copy
from typing import Any

SCHEMA_VERSION = 2
FORMAT = "buildseg-checkpoint-v1"  # a checkpoint file's marker; the content's version is payload["schema"]

# What a version-1 card meant for a key it did not write: the v1 ModelCard defaults.
_V1_CARD = {"arch": "unet", "encoder": "resnet34", "in_chans": 3, "decoder_channels": None, "decoder_width": 1.0,
            "norm": "batch", "dropout": 0.0, "attention": None, "upsample": "nearest", "deep_supervision": False,
            "ds_ensemble": False, "targets": ["footprint"]}
# The model keys every version-1 config.yaml holds (a full dump of the v1 ModelConfig).
_V1_MODEL_KEYS = {"arch", "encoder", "weights", "in_chans", "decoder_channels", "norm", "dropout", "attention",
                  "deep_supervision", "ds_weights", "ds_ensemble"}


def upgrade_card(card: dict[str, Any], version: int | None) -> dict[str, Any]:
    """A model card dict of ``version`` (None: not written, i.e. 1) in today's terms."""
    card = dict(card)
    if (version or 1) < 2:
        for key, value in _V1_CARD.items():
            card.setdefault(key, copy.deepcopy(value))
    return card


def checkpoint_version(payload: dict[str, Any]) -> int:
    return int(payload.get("schema", 1))


def upgrade_checkpoint(payload: dict[str, Any]) -> dict[str, Any]:
    """A loaded checkpoint dict in today's terms (a shallow copy; tensors are shared)."""
    version = checkpoint_version(payload)
    payload = dict(payload)
    if "model_card" in payload:
        payload["model_card"] = upgrade_card(payload["model_card"], version)
    if version < 2 and "best_dice" in payload:
        payload["best_score"] = payload.pop("best_dice")
        config = payload.get("config") or {}
        payload.setdefault("monitor", (config.get("train") or {}).get("monitor", "dice"))
    if version < 2 and "optimizer" in payload:  # a v1 last.pt from before these counters were saved
        payload.setdefault("bad_epochs", 0)
        payload.setdefault("epoch_loss", [0.0, 0])
    if version < 2 and isinstance(payload.get("config"), dict):
        payload["config"] = upgrade_config(payload["config"])
    payload["schema"] = SCHEMA_VERSION
    return payload


def is_saved_v1_config(data: dict[str, Any]) -> bool:
    """A version-less YAML that is a run's saved ``config.yaml`` (a full dump of every key),
    not a hand-written partial config, whose missing keys take today's defaults."""
    model = data.get("model")
    return (isinstance(model, dict) and _V1_MODEL_KEYS <= set(model)
            and all(isinstance(data.get(s), dict) for s in ("data", "train")))


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict (as read from YAML) in today's terms; ``version`` is removed.

    A hand-written YAML without ``version`` is taken as written (missing keys: today's
    defaults); a saved version-1 run config keeps the network it trained.
    """
    data = copy.deepcopy(data)
    version = data.pop("version", None)
    if version is None and is_saved_v1_config(data):
        version = 1
    if version is not None and int(version) < 2:
        data["model"].setdefault("decoder_width", 1.0)
    return data
