"""Models: timm encoders, the UNet decoder with deep supervision, the notes' seed_unet.

``ModelCard`` (models/card.py) imports without torch; the builders load torch on first use.
"""

from buildseg.models.card import ModelCard

__all__ = ["ModelCard", "SegmentationModel", "build_model"]


def __getattr__(name: str):
    if name in ("SegmentationModel", "build_model"):
        from buildseg.models import factory

        return getattr(factory, name)
    raise AttributeError(name)
