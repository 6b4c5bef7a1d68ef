"""Multi-process training with ``torchrun`` and DistributedDataParallel.

``torchrun --nproc_per_node=N examples/deblur_celeba.py ...`` sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on CUDA, gloo on CPU)
and each process takes GPU ``LOCAL_RANK``. Without those variables everything runs in one
process and the helpers below are no-ops. Rank 0 alone writes logs and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "all_reduce_sum", "any_rank", "barrier", "setup", "teardown"]


@dataclass(frozen=True)
class Context:
    """Where this process stands.

    Attributes:
        rank: Global rank (0 in a single process).
        world_size: Number of processes.
        device: This process's device.
        distributed: Whether a process group is active.
    """

    rank: int
    world_size: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, checkpoints and progress bars."""
        return self.rank == 0


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was given but no CUDA device is available; use cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: str = "auto") -> Context:
    """Join the process group when launched by ``torchrun`` and pick this process's device.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world_size <= 1:
        return Context(rank=0, world_size=1, device=dev, distributed=False)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Context(
        rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev, distributed=True
    )


def teardown(ctx: Context) -> None:
    """Leave the process group (after a final barrier)."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    """Wait for every process (no-op in one process)."""
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(ctx: Context, values: list[float]) -> list[float]:
    """Sum a list of numbers over processes (returned unchanged in one process)."""
    if not ctx.distributed:
        return values
    backend = dist.get_backend()
    device = ctx.device if backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


def any_rank(ctx: Context, flag: bool) -> bool:
    """Whether ``flag`` is set on any process, so every process stops at the same step."""
    if not ctx.distributed:
        return flag
    return all_reduce_sum(ctx, [float(flag)])[0] > 0
