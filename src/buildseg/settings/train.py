"""``buildseg train``: the flags beside the config's keys, and names the config (``config.py``)
and the data pipeline share."""

from __future__ import annotations

from dataclasses import dataclass

from buildseg.settings.fields import Settings, setting

# data.augmentations: what data/augment.py builds for each name
# data.source_balance: a source's share of the crops is n ** alpha (data/corpus.py)
SOURCE_BALANCES = ("none", "sqrt", "equal")

AUGMENTATIONS = ("d4", "colour", "hsv", "gamma", "clahe", "blur", "jpeg", "histmatch", "scale", "cutmix")


@dataclass(frozen=True)
class TrainRun(Settings):
    """``buildseg train``'s flags beside the config's own keys (``config.py``)."""

    COMMAND = "train"

    config: str | None = setting(None, "YAML config (sections data, model, train, loss); flags override it")
    resume: str | None = setting(None, "continue the run in RUN_DIR from its last.pt", metavar="RUN_DIR")
    nproc: int = setting(1, "launch N processes with torchrun (DDP)", low=1)
