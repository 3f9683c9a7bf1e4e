"""SIGINT/SIGTERM during training: finish the step, save ``last.pt``, stop.

A second Ctrl-C gives up at once. Schedulers (SLURM, Kubernetes, spot instances) send
SIGTERM some seconds before SIGKILL; one optimizer step plus a checkpoint fits in that.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger("buildseg")


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between optimizer steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %s: finishing the current step, saving last.pt, then stopping", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
