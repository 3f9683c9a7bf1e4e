"""What training and inference share and neither owns: the device and precision choice
(``device.py``, names in ``precisions.py``), checkpoint I/O (``checkpoint.py``) and the user cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/buildseg/<name>`` (default ``~/.cache/buildseg/<name>``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "buildseg" / name
