"""Models: timm encoders, the UNet decoder with deep supervision, the notes' seed_unet."""

from buildseg.models.factory import ModelCard, SegmentationModel, build_model

__all__ = ["ModelCard", "SegmentationModel", "build_model"]
