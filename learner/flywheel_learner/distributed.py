"""Data parallelism for the learner's steps under torchrun (gloo on CPU, NCCL on GPU).

Every rank draws the same global batch (same seed), works on its own contiguous shard, and
weights its loss by its share of the global batch before an all-reduce SUM of the gradients:
the result is the gradient of the global-batch mean, so every rank takes the same optimiser
step as a single process would. Outside a process group every function here is the identity.
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


def bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous part of n rows (sizes differ by at most one)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence[T], rank: int, size: int) -> list[T]:
    """This rank's contiguous part of a global batch."""
    if len(items) < size:
        raise ValueError(f"a global batch of {len(items)} cannot be split over {size} processes")
    start, stop = bounds(len(items), rank, size)
    return list(items[start:stop])


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks (a new tensor); `x` itself when run alone."""
    if world()[1] == 1:
        return x
    total = x.detach().to(_wire(x), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(x.device)


def global_mean(x: torch.Tensor) -> float:
    """Mean of the rows of `x` (N,) over every rank's rows."""
    sums = all_sum(
        torch.stack([x.double().sum(), x.new_tensor(float(x.numel()), dtype=torch.double)])
    )
    return float(sums[0] / sums[1])


def row_offset(rows: int) -> tuple[int, int]:
    """(index of this rank's first row, total rows) when ranks hold consecutive shards."""
    rank, size = world()
    counts = torch.zeros(size, dtype=torch.long)
    counts[rank] = rows
    counts = all_sum(counts)
    return int(counts[:rank].sum()), int(counts.sum())


def from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of `x` on every rank (in place); `x` when run alone."""
    if world()[1] > 1:
        sent = x.to(_wire(x))
        dist.broadcast(sent, src=0)
        x.copy_(sent)
    return x


def _wire(x: torch.Tensor) -> torch.device:
    """Where a collective can take `x`: NCCL takes CUDA tensors only, so a CPU tensor (a count,
    a metric, a permutation) travels through this rank's GPU; gloo takes it where it is."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def average_gradients(params: Iterable[torch.nn.Parameter], share: float = 1.0) -> None:
    """Scale local gradients by this rank's share of the global batch, then sum over ranks.

    A rank whose shard had no rows in this step contributes zeros, so every rank joins every
    all-reduce in the same order. share=1 when the losses were already weighted globally.
    """
    if world()[1] == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.mul_(share)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
