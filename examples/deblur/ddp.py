"""``torchrun`` / DistributedDataParallel set-up; in one process every helper is a no-op.

``torchrun --nproc_per_node=N examples/deblur_celeba.py ...`` sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``: :func:`setup` then joins the process group (NCCL on CUDA, gloo on the
CPU) and each process takes GPU ``LOCAL_RANK``. Rank 0 alone writes logs and checkpoints.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cli import SettingsError


@dataclass(frozen=True)
class Context(AbstractContextManager["Context"]):
    """This process's rank, the number of processes and the device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this process writes logs, checkpoints and progress bars."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over the processes (unchanged in one process)."""
        if self.world == 1:
            return values
        on = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=on)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def mean(self, rows: dict[str, list[float]]) -> dict[str, float]:
        """Each list's mean over the entries of every process."""
        sums = self.sum([float(len(v)) for v in rows.values()] + [sum(v) for v in rows.values()])
        counts, totals = sums[: len(rows)], sums[len(rows) :]
        return {k: t / max(n, 1) for k, n, t in zip(rows, counts, totals, strict=True)}

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process, so that all stop at the same step."""
        return self.sum([float(flag)])[0] > 0

    def __exit__(self, *error: object) -> None:
        """Leave the process group after a final barrier."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def pick_device(device: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when available), ``cpu``, or ``cuda`` (GPU ``LOCAL_RANK``)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda was given but no CUDA device is available; use cpu")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda", torch.cuda.current_device())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA with bf16 support, or a CPU with
    AVX512-BF16 or AMX (elsewhere oneDNN emulates it: a DnCNN step measured 12 to 38 times
    slower than float32 on an AVX2 CPU)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    cpu = torch.cpu  # these probes are not public API: absent ones count as no support
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in _CPU_BF16)


_CPU_BF16 = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


#: Solves under bf16 stop at this relative tolerance at the tightest: every evaluation of a
#: bf16 f is rounded at 2**-8, a floor under the residual (the library warns below 2**-7).
BF16_RTOL = 1e-2


def bf16(kind: str, device: torch.device) -> bool:
    """``--autocast``: ``bf16``, ``off``, or ``auto`` (bf16 where :func:`native_bf16`)."""
    return kind == "bf16" or (kind == "auto" and native_bf16(device))


def autocast(kind: str, device: torch.device) -> torch.autocast:
    """bf16 autocast for ``f`` as ``--autocast`` asks (the library keeps the solver's residuals
    and the adjoint in float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16(kind, device))


def setup(device: str) -> Context:
    """Join the process group when started by ``torchrun``, and pick the device."""
    world, chosen = int(os.environ.get("WORLD_SIZE", "1")), pick_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Context(dist.get_rank() if world > 1 else 0, world, chosen)
