"""The one driver loop shared by every solver.

It owns stopping, per-sample freezing, best-iterate tracking, traces and non-finite and
divergence detection, so each solver only implements its update rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._result import Status
from ._base import AbstractSolver

#: Evaluates f on flat iterates; ``idx`` selects the samples the rows of ``z`` belong to
#: (``None`` means all of them, in order).
FlatMap = Callable[[Tensor, "Tensor | None"], Tensor]


@dataclass
class LoopOutput:
    """Flat outcome of :func:`run_loop`."""

    z: Tensor
    status: Tensor
    n_steps: Tensor
    residual: Tensor
    n_f_evals: int
    trace: Tensor | None


def run_loop(
    f: FlatMap, z0: Tensor, solver: AbstractSolver, *, independent_samples: bool = False
) -> LoopOutput:
    """Iterate ``solver`` on the flat map ``f`` from ``z0`` of shape ``(B, n)``.

    With ``independent_samples`` each evaluation of ``f`` (and each solver update) sees only
    the samples still running; otherwise the whole batch is evaluated and stopped samples are
    frozen, which is valid for any ``f``.
    """
    batch = z0.shape[0]
    device = z0.device
    z = z0.clone()
    state = solver.init(z)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    status = torch.full((batch,), int(Status.MAX_ITER), dtype=torch.long, device=device)
    n_steps = torch.zeros(batch, dtype=torch.long, device=device)
    best_z = z.clone()
    best_res = torch.full((batch,), float("inf"), dtype=z.dtype, device=device)
    first_res = torch.zeros(batch, dtype=z.dtype, device=device)
    last_res = torch.full((batch,), float("inf"), dtype=z.dtype, device=device)
    broke = torch.zeros(batch, dtype=torch.bool, device=device)
    trace: list[Tensor] = []
    n_f_evals = 0
    for k in range(solver.max_iter):
        if independent_samples:
            idx = active.nonzero().squeeze(1)
            fz_sub = f(z[idx], idx).to(z.dtype)
            fz = z.clone()
            fz[idx] = fz_sub
        else:
            fz = f(z, None).to(z.dtype)
        n_f_evals += 1
        res = torch.linalg.vector_norm(fz - z, dim=1)
        finite = torch.isfinite(res)
        converged = finite & (
            res <= solver.atol + solver.rtol * torch.linalg.vector_norm(fz, dim=1)
        )
        if k == 0:
            first_res = torch.where(finite, res, first_res)
        stop = ~finite | converged
        diverged = torch.zeros_like(active)
        if solver.divergence_ratio is not None and k > 0:
            diverged = finite & ~converged & (res > solver.divergence_ratio * first_res)
            stop = stop | diverged
        # Track the best iterate; a converging iterate always wins.
        better = active & finite & ((res < best_res) | converged)
        best_z = torch.where(better[:, None], z, best_z)
        best_res = torch.where(better, res, best_res)
        n_steps = n_steps + active.long()
        last_res = torch.where(active, res, last_res)
        newly = active & stop
        status = torch.where(newly & converged, int(Status.SUCCESS), status)
        status = torch.where(newly & ~finite, int(Status.NONFINITE), status)
        status = torch.where(newly & diverged, int(Status.DIVERGED), status)
        active = active & ~stop
        if solver.trace:
            trace.append(last_res)
        if k == solver.max_iter - 1:
            break
        if (k + 1) % solver.check_every == 0 and not bool(active.any()):
            break
        if independent_samples:
            idx = active.nonzero().squeeze(1)
            sub = {name: value[idx] for name, value in state.items()}
            z_next, sub, breakdown = solver.step(sub, z[idx], fz[idx])
            for name, value in sub.items():
                state[name][idx] = value
            z = z.clone()
            z[idx] = z_next.to(z.dtype)
            broke[idx] = broke[idx] | breakdown
        else:
            z_next, state, breakdown = solver.step(state, z, fz)
            z = torch.where(active[:, None], z_next.to(z.dtype), z)
            broke = broke | (active & breakdown)
    failed = status == int(Status.MAX_ITER)
    status = torch.where(failed & broke, int(Status.BREAKDOWN), status)
    return LoopOutput(
        z=best_z,
        status=status,
        n_steps=n_steps,
        residual=best_res,
        n_f_evals=n_f_evals,
        trace=torch.stack(trace) if trace else None,
    )
