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


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGINT/SIGTERM to the main process.

    Ctrl-C and schedulers signal the whole process group. A worker that died of the signal
    would end the run with "DataLoader worker killed" before the main process could finish
    its step and save ``last.pt``; ignoring it there lets the main process stop cleanly and
    shut the workers down itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shut_down_workers(loader) -> None:
    """Stop a DataLoader's persistent workers now, through its queue.

    Workers ignore SIGTERM (:func:`ignore_stop_signals`), so the interpreter's exit, which
    terminates leftover daemonic children with SIGTERM and then joins them, would wait on
    them forever if the loader were still alive then (the process printed its results and
    never exited). The loader's own shutdown asks them to leave instead."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if hasattr(loader, "_iterator"):
        loader._iterator = None
