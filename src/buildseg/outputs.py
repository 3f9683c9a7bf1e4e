"""Output paths checked before the work: every command calls :func:`check_outputs` on the
paths it will write, before it loads a model or reads a dataset, so a wrong ``--out`` fails
in a second with one line instead of after the whole prediction or training.

Nothing is created here (a failed command leaves no empty folders behind); the writers
create parents themselves (``atomic.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from buildseg.errors import BuildsegError

FILE, FOLDER = "file", "folder"


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(".")


def check_output(path: str | os.PathLike | None, flag: str, kind: str = FILE) -> Path | None:
    """``path`` if a ``kind`` (file or folder) can be written there; a one-line
    :class:`BuildsegError` naming ``flag``, the path and the fix otherwise. None passes."""
    if path is None:
        return None
    path = Path(path)
    if kind == FILE and path.is_dir():
        raise BuildsegError(f"{flag} {path} is an existing folder, and a file is written there; give a file path "
                            f"(e.g. {path / 'out'}{path.suffix or ''}) or remove the folder")
    if kind == FOLDER and path.exists() and not path.is_dir():
        raise BuildsegError(f"{flag} {path} is an existing file, and a folder is written there; give another path")
    if path.exists() and not os.access(path, os.W_OK):
        raise BuildsegError(f"{flag} {path} is not writable by this user; choose a writable location")
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise BuildsegError(f"{flag} {path}: {parent} is a file, so no folder can be made there; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BuildsegError(f"{flag} {path}: cannot create it in {parent} (not writable by this user); choose a "
                            "writable location")
    return path


def check_outputs(*specs: tuple[str | os.PathLike | None, str, str]) -> None:
    """:func:`check_output` for each ``(path, flag, kind)``; two flags naming one path is an error too."""
    seen: dict[Path, str] = {}
    for path, flag, kind in specs:
        checked = check_output(path, flag, kind)
        if checked is None:
            continue
        key = checked.resolve()
        if key in seen:
            raise BuildsegError(f"{seen[key]} and {flag} both name {checked}; give each output its own path")
        seen[key] = flag
