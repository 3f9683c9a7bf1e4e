"""The numeric precisions training and prediction accept, in a module that imports nothing
heavy: ``runtime.device`` acts on them, and the command line builds its ``--precision``
choices from them without waiting for torch."""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
