"""torchrun integration, shared by training and prediction.

``torchrun --nproc_per_node=N -m buildseg train|predict ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; :func:`init_distributed` then binds the process to its GPU (``cuda:LOCAL_RANK``)
and joins the process group: NCCL on GPUs, gloo on CPUs. Under torchrun a group is joined
even for a world of one, so a one-GPU run exercises every collective through NCCL.

Every collective goes through the helpers below, which move their tensor to the group's
device first: NCCL only takes CUDA tensors ("No backend type associated with device type
cpu"), gloo takes CPU ones, and a call site cannot pick the wrong one. Rank 0 alone writes
files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from buildseg.errors import BuildsegError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group exists, even for a world of one
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def enabled(self) -> bool:
        return self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0



SINGLE_PROCESS = DistInfo()  # the default of functions that also run under torchrun

def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join torchrun's process group (if launched by it) on this process's own device."""
    if not launched_by_torchrun():
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    device = torch.device("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise BuildsegError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, True, device)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """The process's compute device: its own GPU under torchrun."""
    if device.type == "cuda" and info.enabled:
        return info.device
    return device


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce(tensor: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over all ranks (a new tensor on ``tensor``'s device)."""
    if not info.enabled:
        return tensor
    moved = tensor.to(info.device)
    dist.all_reduce(moved, op=_OPS[op])
    return moved.to(tensor.device)


def any_true(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is true on any rank (stop requests, non-finite losses)."""
    if not info.enabled:
        return flag
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), info, "max").item() > 0)


def all_gather(tensor: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), on ``tensor``'s device."""
    if not info.enabled:
        return [tensor]
    moved = tensor.to(info.device)
    parts = [torch.zeros_like(moved) for _ in range(info.world_size)]
    dist.all_gather(parts, moved)
    return [p.to(tensor.device) for p in parts]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's picklable ``obj`` (NCCL uses the current device, set by init_distributed)."""
    if not info.enabled:
        return [obj]
    parts: list[Any] = [None] * info.world_size
    dist.all_gather_object(parts, obj)
    return parts


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier(device_ids=[info.device.index] if info.device.type == "cuda" else None)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
