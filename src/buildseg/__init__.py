"""buildseg: building footprint segmentation in overhead imagery.

Pipeline: competition CSV / folder data -> UNet on a timm encoder -> training with the
competition Dice -> prediction -> submission CSV -> evaluation.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Segmenter":  # lazy: importing buildseg should not import torch
        from buildseg.inference.core.segmenter import Segmenter

        return Segmenter
    raise AttributeError(name)


__all__ = ["Segmenter", "__version__"]
