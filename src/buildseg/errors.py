"""User-facing errors.

Every problem a user can fix (a missing file, a bad RLE string, an unknown config key)
is raised as a :class:`BuildsegError` whose message names the input and the fix. The
CLI prints these as one line and exits with status 2 instead of showing a traceback.
``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class BuildsegError(Exception):
    """An error caused by the user's input, with a message that says what to change."""


class RleError(BuildsegError, ValueError):
    """A run-length string that does not describe a valid mask."""


def one_line(exc: BaseException) -> str:
    """The user's message of ``exc`` on one line.

    A DataLoader worker re-raises a dataset's exception in the main process with the
    worker's whole traceback folded into the message ("Caught BuildsegError in DataLoader
    worker process 0. Original Traceback ..."); the original message is its last line.
    """
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        for cut in (prefix, f"{type(exc).__name__}: "):
            if last.startswith(cut):
                last = last[len(cut):]
                break
        text = last
    return " ".join(text.split())
