"""Worker for the two-process DistributedDataParallel test (importable by spawned children)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from zoo import TanhCell

import implicitlayers as il


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(
        8, 5, generator=g, dtype=torch.float64
    )


def make_deq() -> il.DEQ:
    rule = il.ImplicitDifferentiation(solver=il.Anderson(max_iter=100, atol=1e-13, rtol=1e-12))
    return il.DEQ(
        TanhCell(), solver=il.Anderson(max_iter=100, atol=1e-13, rtol=1e-12), backward=rule
    )


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_deq())
        x, target = make_data()
        shard = slice(rank * 4, rank * 4 + 4)
        z, _ = model(x[shard], z0=torch.zeros(4, 5, dtype=torch.float64))
        ((z - target[shard]) ** 2).mean().backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, out)
        # Without it, a rank that finishes first tears down gloo while the other still
        # talks to it, and its process can abort at exit (SIGABRT, about one run in three).
        dist.barrier()
    finally:
        dist.destroy_process_group()
