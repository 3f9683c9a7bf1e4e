"""Atomic file writes: a temporary file beside the target, fsync, rename, fsync the folder.

A crash or SIGKILL at any moment leaves either the old file or the new one, never a torn
one. Every output buildseg writes goes through here: :func:`atomic_open` for what Python
writes itself (CSVs, checkpoints, HTML, PNGs), :func:`atomic_path` for what a library
writes to a path (GDAL rasters and vectors, ONNX, OpenVINO). The result gets the mode any
other tool's file would (0666 minus the umask), not ``mkstemp``'s owner-only 0600, so a
teammate, a web server or a GIS running as another user can read it.
"""

from __future__ import annotations

import functools
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_open", "atomic_path", "default_file_mode"]


@functools.lru_cache(maxsize=1)
def default_file_mode() -> int:
    """0666 minus this process's umask: the mode ``open(path, "w")`` would give. Read once,
    at the first write (reading the umask means setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, companions: tuple[str, ...] = (),
                scratch: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary path beside ``path`` for a library to write; renamed onto ``path`` when the
    block ends without error, removed otherwise.

    ``suffix`` (default: the target's) ends the temporary name, for writers that pick the
    format from the extension. ``companions`` are suffixes of files the writer puts beside
    it (OpenVINO's ``.bin`` next to the ``.xml``): renamed alike, or removed. ``scratch`` are
    suffixes of side files that are always removed (ONNX's external ``.data``).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; a file was expected")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()  # the writer creates it (some refuse to overwrite); the unique name stays reserved enough
    extras = [(tmp.with_suffix(c), path.with_suffix(c)) for c in companions]
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer produced no file for {path}")
        for temp, _ in [(tmp, path), *extras]:
            if temp.is_file():
                os.chmod(temp, default_file_mode())
        for temp, final in extras:
            if temp.is_file():
                os.replace(temp, final)
        os.replace(tmp, path)
    finally:
        for temp in [tmp, *(t for t, _ in extras), *(tmp.with_name(tmp.name + s) for s in scratch)]:
            temp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` that only replaces ``path`` once the block has written it all."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; a file was expected")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
