"""The names and defaults of prediction's options, in a module that imports nothing heavy.

The command line builds its parser from these, so ``buildseg --help``, a mistyped flag and
the Ray driver's start (which goes before the driver's own torch import, to overlap with
it) do not wait seconds for torch; the modules that act on an option import its names from
here, so each is declared once.
"""

from __future__ import annotations

ENGINES = ("auto", "torch", "openvino", "onnxruntime")
OPENVINO_MODES = ("auto", "latency", "throughput")
TTA_MODES = ("none", "flip", "d4")
WINDOW = 1024  # the sliding window buildseg predicts large images with (predict --window)
OVERLAP = 0.25  # its overlap, a fraction of the window (predict --overlap)
MAX_DROP = 0.005  # the competition Dice int8 may lose against fp32 and still be accepted
LAYER_FORMATS = {"gpkg": ".gpkg", "parquet": ".parquet", "fgb": ".fgb", "geojson": ".geojson"}  # many scenes' layers
