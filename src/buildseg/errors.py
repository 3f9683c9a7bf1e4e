"""User-facing errors.

Every problem a user can fix (a missing file, a bad RLE string, an unknown config key)
is raised as a :class:`BuildsegError` whose message names the input and the fix. The
CLI prints these as one line and exits with status 2 instead of showing a traceback.
``assert`` is kept for internal invariants only.
"""


class BuildsegError(Exception):
    """An error caused by the user's input, with a message that says what to change."""


class RleError(BuildsegError, ValueError):
    """A run-length string that does not describe a valid mask."""
