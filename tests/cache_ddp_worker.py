"""Worker for the two-process test of one FixedPointCache per rank (importable by spawned
children)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from zoo import Affine, AffineModule

import implicitlayers as il

F64 = torch.float64
#: The dataset indices each rank trains on, the same every epoch.
SHARD = {0: range(0, 6), 1: range(6, 12)}


def run_ranks(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cache = il.FixedPointCache()
        solver = il.Anderson(max_iter=200, rtol=1e-10, atol=0.0)
        deq = il.DEQ(
            AffineModule(Affine.make(n=6, d=3, contraction=0.8)), solver=solver, cache=cache
        )
        model = torch.nn.parallel.DistributedDataParallel(deq)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        cache.count_steps(optimizer)
        data = torch.randn(12, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
        indices = torch.tensor(list(SHARD[rank]))
        hits = []
        for _epoch in range(2):
            before = cache.stats.hits
            for batch in indices.split(3):
                z, _ = model(data[batch], z0=torch.zeros(len(batch), 6, dtype=F64), keys=batch)
                optimizer.zero_grad()
                z.pow(2).mean().backward()
                optimizer.step()
            hits.append(cache.stats.hits - before)
        path = os.path.join(out, f"cache{rank}.pt")
        torch.save(cache.state_dict(), path)
        restored = il.FixedPointCache()
        restored.load_state_dict(torch.load(path, weights_only=True))
        probe = torch.zeros(len(indices), 6, dtype=F64)
        equal = torch.equal(restored.initial(indices, probe)[0], cache.initial(indices, probe)[0])
        report = {"keys": cache.keys(), "hits_second_epoch": hits[1], "reloaded_equal": equal}
        torch.save(report, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
