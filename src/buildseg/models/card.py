"""The model card: everything needed to rebuild a network, and the one home of its defaults.

The run config's ``model`` section (:class:`buildseg.config.ModelConfig`) is generated from
these fields, and every checkpoint stores a card, so the config, the checkpoint and the
builder cannot disagree on a default. Cards of older buildseg versions are brought up to
date by :func:`buildseg.schema.upgrade_card` when a checkpoint is read. No torch import:
the CLI and the config read this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ARCHS = ("unet", "seed_unet")
# not config keys: mean/std are filled in from the encoder when the model is built; image_outputs are heads fitted
# on a trained network (training/image_heads.py), so a new run never starts with them
CARD_ONLY = ("mean", "std", "image_outputs")


@dataclass
class ModelCard:
    """How to rebuild a network. Measured choices behind the defaults: benchmarks/README.md."""

    arch: str = "unet"  # unet | seed_unet | smp.<Name>
    encoder: str = "efficientnet_lite0"  # the ablation's winner on CPU
    in_chans: int = 3
    decoder_channels: list[int] | None = None  # one per block; default: 256,128,64,32,16 x decoder_width
    decoder_width: float = 0.5  # x the default widths (multiples of 8); ignored with decoder_channels
    norm: str = "batch"  # batch | group | none
    dropout: float = 0.0
    attention: str | None = None  # scse | none
    upsample: str = "nearest"  # nearest | bilinear
    deep_supervision: bool = True  # auxiliary heads on the coarser decoder stages
    ds_ensemble: bool = True  # predict with the mean sigmoid of all heads
    targets: list[str] = field(default_factory=lambda: ["footprint"])  # footprint[,contact]: one output channel each
    input_norm: str = "dataset"  # dataset: the encoder's (ImageNet) mean/std | image: each image's own per-channel
    # mean/std, so a sensor's or season's overall colour and contrast are gone before the encoder (in the graph: every
    # engine and export gets it; a sliding window or GeoTIFF block is standardised on its own pixels)
    style_mix: float = 0.0  # probability per batch of mixing early encoder feature statistics across images
    # (MixStyle; training only: identical network at eval and in exported graphs; models/style_mix.py)
    image_outputs: list[str] = field(default_factory=list)  # per-image heads: tile, scale (models/image_heads.py)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def out_channels(self) -> int:
        return len(self.targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        """A card from a current-version dict; keys that are not card fields are ignored.
        Old checkpoints' cards go through :func:`buildseg.schema.upgrade_card` first."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
