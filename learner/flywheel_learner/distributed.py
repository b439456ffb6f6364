"""Data parallelism for the learner's steps under torchrun (gloo on CPU, NCCL on GPU).

Every rank draws the same global batch (same seed), works on its own contiguous shard, and
scales its gradients by its share before an all-reduce SUM: the result is the gradient of the
global-batch mean, so every rank takes the same optimiser step as a single process would.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T], rank: int, size: int) -> list[T]:
    """This rank's contiguous part of a global batch (sizes differ by at most one)."""
    if len(items) < size:
        raise ValueError(f"a global batch of {len(items)} cannot be split over {size} processes")
    base, extra = divmod(len(items), size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (1 if rank < extra else 0)])


def average_gradients(params: Iterable[torch.nn.Parameter], share: float) -> None:
    """Scale local gradients by this rank's share of the global batch, then sum over ranks."""
    _, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(share)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
