"""``buildseg train --nproc N``: the same command again under torchrun, N processes (DDP).
Torch-free: the parent only starts torchrun and waits for it."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence


def without_nproc(argv: Sequence[str]) -> list[str]:
    """argv with ``--nproc N`` / ``--nproc=N`` removed (torchrun starts the processes instead)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def needs_relaunch(nproc: int) -> bool:
    return nproc > 1 and "WORLD_SIZE" not in os.environ


def relaunch_with_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Run ``buildseg ARGV`` (``--nproc`` dropped) as ``nproc`` torchrun processes; their exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "buildseg", *without_nproc(argv)]
    return subprocess.call(cmd)
