"""Data parallelism on `torch.distributed`, as launched by ``torchrun`` or ``accelerate launch``.

The launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a process without them is a world
of one and none of this does anything (no process group, no barrier). The process group is gloo on CPU and
NCCL when each rank has its own GPU. Collectives here are few and coarse: one before the shards are merged
and one after, so a rank that fails is heard by all the others instead of leaving them waiting at a barrier.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from saturation.core.errors import ToolkitError

T = TypeVar("T")


class RankFailed(ToolkitError):
    """Another rank failed and said so itself; this rank ends quietly (one line in all, from that rank).

    `cli.friendly` prints no line for it, only exits 1."""

    quiet = True


def world_size() -> int:
    """Processes in this run (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0, the only process that writes results, figures and progress bars."""
    return rank() == 0


def rank_device(device: str | None) -> str | None:
    """The device this rank runs on: under a launcher each rank takes GPU ``LOCAL_RANK`` when the run is on CUDA
    (``--device cuda`` or no --device on a machine with GPUs); CPU runs and single processes keep `device`."""
    if world_size() == 1:
        return device
    wants_cuda = device in (None, "cuda") and torch.cuda.is_available()
    return f"cuda:{local_rank()}" if wants_cuda else device


def init(device: str | None = None) -> bool:
    """Join the launcher's process group once (NCCL when `device` is a CUDA device, else gloo); False for a world
    of one. `device` is this rank's (`rank_device`); it is not validated here, so that even a bad --device is
    reported through `together` as one line."""
    if world_size() == 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = str(device or "").startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_destroy)
    if not is_main():  # one set of progress bars (rank 0's), not one per process
        from transformers.utils import logging

        logging.disable_progress_bar()
    return True


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def gather(value: T) -> list[T]:
    """`value` of every rank, in rank order (a barrier as well); ``[value]`` for a world of one."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def together(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank, then agree on the outcome: if any rank failed, every rank stops.

    The lowest failing rank raises its own error (a `ToolkitError` prints as one line; a bug keeps its traceback);
    the others raise `RankFailed`, which prints nothing, so a failure reads as one line however many ranks there are.
    Acts as a barrier: no rank goes on before all have finished `fn`.
    """
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
        error = err
    failed = gather(None if error is None else f"{type(error).__name__}: {error}")
    first = next(((r, m) for r, m in enumerate(failed) if m is not None), None)
    if first is None:
        return result
    if first[0] == rank():  # the lowest failing rank speaks; the same error on every rank is still one line
        raise error
    raise RankFailed(f"rank {first[0]} failed ({first[1]})")
