"""Device, precision and reproducibility choices.

bf16 autocast is the default wherever the hardware runs it natively: CUDA GPUs with bf16,
and CPUs with AVX512-BF16 or AMX (about 4x faster convolutions than fp32 on this
project's CPUs, together with channels_last). fp16 needs a gradient scaler and is offered
on CUDA only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from buildseg.errors import BuildsegError
from buildseg.runtime.precisions import PRECISIONS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BuildsegError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise BuildsegError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in PRECISIONS:
        raise BuildsegError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type != "cuda":
        raise BuildsegError("fp16 needs a CUDA GPU (with a gradient scaler); on CPU use bf16 or fp32")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(requested: int) -> int:
    """Loader workers: as asked, else the cores this process may use (all of them, shared by
    the processes torchrun starts on this node) minus one for the main process, at most 16."""
    if requested >= 0:
        return requested
    per_process = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(16, per_process - 1))


def cpu_predict_workers(requested: int) -> int:
    """Decode workers for prediction on the CPU: as asked, else 0 on 1-2 cores and 1 above.

    The engine already uses every core; a worker process that decodes at the same time
    takes a core from it, and each parallel region then waits for the thread that lost its
    core. Measured on 2 cores (benchmarks/README.md, "threads study"): decoding in the main
    thread ran 1.14x faster end to end than one worker. One worker decodes 224 px tiles far
    faster than any CPU engine consumes them, so more never help.
    """
    if requested >= 0:
        return requested
    return 0 if usable_cores() <= 2 else 1


def cpu_signature() -> str:
    """What makes one CPU's timings another's: model name, flags, usable cores."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256(("\n".join(lines) + f"\ncores={usable_cores()}").encode()).hexdigest()[:16]
