"""torch.distributed, wrapped so every job shards the same way.

Under ``torchrun`` the environment carries RANK/WORLD_SIZE/LOCAL_RANK; without it everything
here degrades to a single process. Sharding is contiguous and exact (no padding, unlike
DistributedSampler), so no item is counted twice or dropped, and concatenating the ranks'
results in rank order restores the input order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from verydeep.core.defaults import default_device
from verydeep.errors import VerydeepError


@dataclass(frozen=True)
class Context:
    """This process's place in the job: its rank among ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | None = None) -> Context:
    """Join the process group if launched by torchrun (NCCL for CUDA devices, gloo otherwise)."""
    if not launched_by_torchrun():
        return Context()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not dist.is_initialized():
        cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Context(rank, world, local)


def device_for(ctx: Context, device: str | None) -> str:
    """The device this rank uses: ``cuda:<local_rank>`` under torchrun on GPUs."""
    device = default_device(device)
    if device == "cuda" and ctx.distributed:
        return f"cuda:{ctx.local_rank}"
    return device


def shard(n: int, ctx: Context) -> range:
    """This rank's contiguous slice of ``range(n)``; slices cover it exactly once."""
    per, extra = divmod(n, ctx.world_size)
    start = ctx.rank * per + min(ctx.rank, extra)
    return range(start, start + per + (1 if ctx.rank < extra else 0))


def gather_objects(obj: Any, ctx: Context) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere); [obj] when single."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ctx: Context) -> None:
    """Wait for every rank. A rank started on its own (a shard run by hand: a ``Context``
    without a process group) has nobody to wait for."""
    if ctx.distributed and dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, ctx: Context) -> Any:
    """Rank 0's ``obj`` on every rank; ``obj`` itself without a process group."""
    if not (ctx.distributed and dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_rank_first(ctx: Context) -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks.

    For work whose result every rank then reads from disk: fetching and converting weights into
    the cache (:func:`verydeep.hub.loader.load`, which every job calls inside this), creating an
    output folder. The other ranks then find the verified cache entry and download nothing; the
    cache's own lock keeps it so for processes of separate jobs too. A single process just runs
    the body.
    """
    if not ctx.is_main:
        barrier(ctx)
    try:
        yield
    finally:
        if ctx.is_main:
            barrier(ctx)


@contextmanager
def held_by_main_rank(lock: Callable[[], AbstractContextManager[None]], ctx: Context) -> Iterator[None]:
    """Rank 0 holds ``lock()`` for the body (a job's output lock: one lock per job, not per
    rank); when rank 0 cannot take it, every rank raises rank 0's one-line error."""
    with ExitStack() as stack:
        refused = None
        if ctx.is_main:
            try:
                stack.enter_context(lock())
            except VerydeepError as e:
                refused = str(e)
        refused = broadcast_object(refused, ctx)
        if refused is not None:
            raise VerydeepError(refused)
        yield


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def finish(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
