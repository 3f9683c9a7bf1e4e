"""``train --init NAME|RUN|CHECKPOINT``: start the whole network (encoder, decoder, heads) from
a packaged model or another run, not only the encoder from ImageNet.

**The few-label schedule.** ``--init`` on at most ``train.few_tiles`` (20) labelled tiles and no
``--val-data``: no tiles are set aside (each is worth more for training than for choosing a
checkpoint), the stopping rule is a fixed ``train.few_steps`` optimizer steps at a peak rate of
``train.few_lr`` (one-cycle with a tenth of them as warm-up), in one epoch of crops drawn from all
tiles, every batch norm frozen at the init's; from ``train.few_many`` (10) tiles on, the peak rate
is ``train.few_lr_many`` and the norms train (:func:`few_regime`); best.pt holds the last weights (``keep_last``), the validation line scores the training
tiles (a sanity check, not a held-out score) and the init's tuned post-processing is kept; no
int8 model is made at the end (the first ``predict --precision auto`` makes one from its input,
``inference/jobs/first_int8.py``). The general ``lr``, ``epochs``, ``warmup_steps`` and
``crops_per_image`` are replaced, and logged.
Defaults chosen by measurement: benchmarks/README.md "Few labels".

The network is the init's: its model card replaces the config's architecture keys, so
``train --init buildings --data FEW.csv`` needs no architecture flags. A key the user set to
something else (``--encoder resnet34 --init buildings``) cannot be honoured and is an error;
so are other bands or targets than the init was trained on. The init's training GSD becomes
``data.gsd`` when the run sets none, so tiles of known GSD are seen at the scale the weights
learnt.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from buildseg.config import Config, ModelConfig
from buildseg.errors import BuildsegError
from buildseg.models.card import CARD_ONLY
from buildseg.runtime import packaged
from buildseg.runtime.checkpoint import load_checkpoint
from buildseg.runtime.packaged import PACKAGED_PREFIX

log = logging.getLogger("buildseg")
FOLLOWS_DATA = ("in_chans", "targets")  # what the data decides: must equal the init's


def init_spec(text: str) -> str:
    """A checkpoint spec for ``--init``: a path when one exists, else a packaged model name."""
    if Path(text).exists() or text.startswith(PACKAGED_PREFIX):
        return text
    if "/" in text or text.endswith(".pt"):
        raise BuildsegError(f"--init {text}: no such run folder or checkpoint (or give a packaged model's name: "
                            "`buildseg models` lists them)")
    packaged.find(text)  # an unknown name is one line naming the known ones
    return PACKAGED_PREFIX + text


def apply_init(config: Config) -> dict[str, Any] | None:
    """Load ``train.init`` and make ``config.model`` its card; the payload (for its weights)."""
    if not config.train.init:
        return None
    spec = init_spec(config.train.init)
    payload = load_checkpoint(spec)
    card = payload["model_card"]
    defaults = ModelConfig()
    for f in fields(ModelConfig):
        if f.name not in card or f.name in CARD_ONLY:
            continue
        mine, default, theirs = getattr(config.model, f.name), getattr(defaults, f.name), card[f.name]
        if mine == theirs:
            continue
        if f.name in FOLLOWS_DATA:
            raise BuildsegError(f"--init {config.train.init} was trained with {f.name} {theirs} but this run has "
                                f"{mine}: start from a model with the same bands and targets, or drop --init")
        if mine != default and f.name not in ("dropout",):
            raise BuildsegError(f"--init {config.train.init} is a {card.get('arch')}/{card.get('encoder')} network with "
                                f"{f.name} {theirs}; drop the {f.name} setting ({mine}) or drop --init")
        setattr(config.model, f.name, theirs)
    gsd = (payload.get("input") or {}).get("gsd")
    if config.data.gsd is None and gsd:
        config.data.gsd = float(gsd)
        log.info("data.gsd = %g m (the GSD --init %s was trained at)", gsd, config.train.init)
    log.info("network from --init %s: %s/%s", config.train.init, card.get("arch"), card.get("encoder"))
    return payload


def load_init_weights(model, payload: dict[str, Any], source: str) -> None:
    """Every tensor of the init into ``model`` (strict: a missing or extra one is an error),
    except the init's fitted per-image heads: they describe the features they were fitted on,
    which this run changes (models/image_heads.py), so the new network starts without them."""
    state = {k: v for k, v in payload["model"].items() if ".image_heads." not in k}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BuildsegError(f"--init {source}: its weights do not fit this network ({str(exc).splitlines()[0][:200]})") from None


def few_label_applies(config: Config, n_tiles: int) -> bool:
    """``--init`` on at most ``train.few_tiles`` labelled tiles and no ``--val-data``."""
    return bool(config.train.init) and not config.data.val and n_tiles <= config.train.few_tiles


def few_regime(config: Config, n_tiles: int) -> tuple[float, bool]:
    """(peak learning rate, norms frozen) of the few-label schedule on ``n_tiles`` labelled tiles.
    Measured: 1-3 tiles need a gentle rate with the init's norms (2e-4 broke k=3); with 10 tiles of
    a new place, 1e-3 with trainable norms beat it in every place (benchmarks/README.md)."""
    t = config.train
    many = n_tiles >= t.few_many
    frozen = not many if t.few_freeze_norms == "auto" else t.few_freeze_norms == "on"
    return (t.few_lr_many if many else t.few_lr), frozen


def few_label_schedule(config: Config, n_tiles: int) -> bool:
    """Switch ``config`` to the few-label schedule when it applies (see the module); True then."""
    t, d = config.train, config.data
    if not few_label_applies(config, n_tiles):
        return False
    d.crops_per_image = max(1, -(-t.few_steps * t.batch_size // n_tiles))
    lr, frozen = few_regime(config, n_tiles)
    t.epochs, t.lr, t.warmup_steps = 1, lr, max(1, t.few_steps // 10)
    t.keep_last, t.tune_at_end, t.early_stopping = True, False, None
    t.quantize_at_end = False  # judged on its own training tiles, int8 would say little: predict makes one at first use
    t.freeze_all_norms = frozen  # batch statistics of crops of a few tiles would replace the learnt ones
    log.info("few-label schedule: %d tiles (<= train.few_tiles %d) and no --val-data: all of them train, %d steps at lr "
             "%g, norms %s, best.pt = the last weights, the init's post-processing kept; the validation line scores the "
             "training tiles", n_tiles, t.few_tiles, t.few_steps, lr, "frozen" if frozen else "trained")
    return True
