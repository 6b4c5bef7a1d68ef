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


def run_fsdp(rank: int, world: int, port: int, out: str) -> None:
    """FSDP2 (``fully_shard``) around a model whose middle is a DEQ: two training steps on
    this rank's half of the batch; rank 0 saves the trained parameters, gathered."""
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_fsdp_model()
        fully_shard(model.deq)
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, target = make_data()
        shard = slice(rank * 4, rank * 4 + 4)
        for _ in range(2):
            optimizer.zero_grad()
            loss = ((model(x[shard]) - target[shard]) ** 2).mean()
            loss.backward()
            optimizer.step()
        state = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(state, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


class FSDPModel(torch.nn.Module):
    """An encoder, a DEQ and a head: the DEQ is one layer of a larger model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encode = torch.nn.Linear(3, 3, dtype=torch.float64)
        self.deq = make_deq()
        self.head = torch.nn.Linear(5, 5, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = self.deq(self.encode(x), z0=torch.zeros(x.shape[0], 5, dtype=torch.float64))
        return self.head(z)


def make_fsdp_model() -> FSDPModel:
    return FSDPModel()


def train_unsharded() -> dict[str, torch.Tensor]:
    """The same two steps on one process: the whole batch, mean loss (= the mean over the two
    ranks of their half-batch means, which FSDP's gradient reduction averages)."""
    model = make_fsdp_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = make_data()
    for _ in range(2):
        optimizer.zero_grad()
        ((model(x) - target) ** 2).mean().backward()
        optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters()}
