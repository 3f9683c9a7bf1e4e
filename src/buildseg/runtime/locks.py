"""One process at a time in a shared cache folder.

Caches on a shared disk (the decoded-image store, the ONNX export and OpenVINO's compiled
blobs beside a checkpoint) are filled by whichever process needs them first: torchrun's
ranks, Ray workers or two users' jobs start together. OpenVINO writes its blob straight to
the final path and makes it read-only afterwards, so two processes compiling the same model
at once can read a torn blob or fail to overwrite it. The builders hold this lock; the
next one in finds the entry done and only reads it.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"


@contextmanager
def folder_lock(folder: Path, *, required: bool = True) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder/.lock`` (created with the folder): released when
    the block ends, or by the kernel when the process dies, so a crash never leaves it held.
    ``required=False`` runs the block unlocked where the folder cannot hold a lock file (a
    read-only shared cache: nothing will be written there either); otherwise OSError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a+")
    except OSError:
        if required:
            raise
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
