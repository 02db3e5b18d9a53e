"""Data-parallel training over processes started by `torchrun`: the process group, and the few
collectives the one training loop needs (torch.distributed; gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[int, int]]:
    """Join torchrun's process group for the block (gloo on CPU, NCCL on CUDA); (rank, world size).
    Outside torchrun: nothing, (0, 1)."""
    if not launched() or active():
        yield rank_and_world()
        return
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield rank_and_world()
    finally:
        dist.destroy_process_group()


def sum_over_processes(tensors: list[torch.Tensor]) -> None:
    """In place: every tensor summed over the processes (each sample's entries are non-zero in the
    one process that trained it, so the sum is that process's value, exactly)."""
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def from_rank_zero(obj):
    """Rank 0's `obj` on every process."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
