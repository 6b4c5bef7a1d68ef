"""The one driver loop shared by every solver.

It owns stopping, per-sample freezing, best-iterate tracking, traces and non-finite and
divergence detection, so each solver only implements its update rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._result import Status
from ._base import AbstractSolver

#: Evaluates f on flat iterates; ``idx`` selects the samples the rows of ``z`` belong to
#: (``None`` means all of them, in order).
FlatMap = Callable[[Tensor, "Tensor | None"], Tensor]

_SUCCESS, _NONFINITE, _DIVERGED = int(Status.SUCCESS), int(Status.NONFINITE), int(Status.DIVERGED)

#: Device types whose tensors can be read on the host without a synchronisation.
_HOST_FREE = ("cpu",)


@dataclass
class LoopOutput:
    """Flat outcome of :func:`run_loop`."""

    z: Tensor
    status: Tensor
    n_steps: Tensor
    residual: Tensor
    n_f_evals: int
    trace: Tensor | None


class _Check(NamedTuple):
    """One iteration's residuals and stopping test, row by row."""

    res: Tensor
    finite: Tensor
    converged: Tensor
    stop: Tensor
    first_res: Tensor

    def code(self) -> Tensor:
        """The status of a stopping row: converged, else non-finite, else diverged."""
        return torch.where(
            self.converged, _SUCCESS, torch.where(self.finite, _DIVERGED, _NONFINITE)
        )


def _check(solver: AbstractSolver, k: int, z: Tensor, fz: Tensor, first_res: Tensor) -> _Check:
    r"""Residuals :math:`\|f(z) - z\|` and which rows stop at iteration ``k``.

    A row converges when its residual is at most ``atol + rtol * ||f(z)||``; it stops when it
    converged, is not finite, or (after the first iteration) exceeds ``divergence_ratio``
    times its first residual. ``first_res`` is set at ``k == 0`` and passed through after.
    """
    res = torch.linalg.vector_norm(fz - z, dim=1)
    finite = torch.isfinite(res)
    bound = torch.linalg.vector_norm(fz, dim=1).mul_(solver.rtol).add_(solver.atol)
    converged = finite & (res <= bound)
    stop = ~finite | converged
    if k == 0:
        first_res = torch.where(finite, res, 0.0)
    elif solver.divergence_ratio is not None:
        stop |= finite & (res > solver.divergence_ratio * first_res)
    return _Check(res, finite, converged, stop, first_res)


def run_loop(
    f: FlatMap, z0: Tensor, solver: AbstractSolver, *, independent_samples: bool = False
) -> LoopOutput:
    """Iterate ``solver`` on the flat map ``f`` from ``z0`` of shape ``(B, n)``.

    With ``independent_samples`` each evaluation of ``f`` (and each solver update) sees only
    the samples still running (:func:`_run_compacted`); otherwise the whole batch is evaluated
    and stopped samples are frozen, which is valid for any ``f``.

    Per iteration the loop touches full states only to measure the residual, unless some
    samples have stopped: then it freezes them and keeps their best iterate with ``where``.
    Which case holds is read on the host, where that is free (CPU) or on the iterations that
    synchronise anyway (every ``check_every``); otherwise the masked path runs. ``z`` is never
    modified in place, so the best iterate can alias it.
    """
    if independent_samples:
        return _run_compacted(f, z0, solver)
    batch = z0.shape[0]
    device = z0.device
    host_free = device.type in _HOST_FREE
    # z0 is not modified; the result is copied if it is still z0 at the end.
    z = z0
    state = solver.init(z)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    # Known on the host: every sample is still running (so nothing needs freezing).
    all_active = True
    status = torch.full((batch,), int(Status.MAX_ITER), dtype=torch.long, device=device)
    n_steps = torch.zeros(batch, dtype=torch.long, device=device)
    best_z = z
    best_res = torch.full((batch,), float("inf"), dtype=z.dtype, device=device)
    first_res = best_res
    last_res = best_res
    broke = torch.zeros(batch, dtype=torch.bool, device=device)
    trace: list[Tensor] = []
    n_f_evals = 0
    for k in range(solver.max_iter):
        fz = f(z, None).to(z.dtype)
        n_f_evals += 1
        test = _check(solver, k, z, fz, first_res)
        res, finite, converged, stop, first_res = test
        # Track the best iterate; a converging iterate always wins.
        better = finite & ((res < best_res) | converged)
        synced = (k + 1) % solver.check_every == 0
        any_active, quiet = True, False
        if all_active and (host_free or synced):
            # Every sample ran this iteration: if none stops, nothing needs freezing.
            any_stop, all_better = torch.stack((stop.any(), better.all())).tolist()
            quiet = not any_stop
        if quiet:
            best_res = res if all_better else torch.where(better, res, best_res)
            best_z = z if all_better else torch.where(better[:, None], z, best_z)
            n_steps += 1
            last_res = res
        else:
            better &= active
            best_res = torch.where(better, res, best_res)
            n_steps += active
            last_res = torch.where(active, res, last_res)
            status = torch.where(active & stop, test.code(), status)
            active = active & ~stop
            if host_free or synced:
                # Samples whose best iterate is their current one: those that improved, and
                # those that stopped by converging earlier (frozen since).
                flags = torch.stack(
                    (active.any(), active.all(), (better | (status == _SUCCESS)).all())
                ).tolist()
                any_active, all_active, best_is_z = flags
            else:
                all_active, best_is_z = False, False
            best_z = z if best_is_z else torch.where(better[:, None], z, best_z)
        if solver.trace:
            trace.append(last_res)
        if k == solver.max_iter - 1 or (synced and not any_active):
            break
        z_next, state, breakdown = solver.step_at(k, state, z, fz)
        del fz
        z_next = z_next.to(z.dtype)
        if all_active:
            z = z_next
            broke |= breakdown
        else:
            z = torch.where(active[:, None], z_next, z)
            broke |= active & breakdown
        del z_next
    status = torch.where((status == int(Status.MAX_ITER)) & broke, int(Status.BREAKDOWN), status)
    return LoopOutput(
        z=best_z.clone() if best_z is z0 else best_z,
        status=status,
        n_steps=n_steps,
        residual=best_res,
        n_f_evals=n_f_evals,
        trace=torch.stack(trace) if trace else None,
    )


def _run_compacted(f: FlatMap, z0: Tensor, solver: AbstractSolver) -> LoopOutput:
    """:func:`run_loop` with ``independent_samples``: only the running rows are kept.

    ``f``, the residuals, the best-iterate tracking and the solver's state all live on the
    rows still running, compacted; a row's results are written to the full batch when it
    stops, and the compact set shrinks only then. The number of rows left is read on the host
    every iteration (it sizes the next call of ``f``), so ``check_every`` does not apply.
    """
    batch, device = z0.shape[0], z0.device
    status = torch.full((batch,), int(Status.MAX_ITER), dtype=torch.long, device=device)
    n_steps = torch.zeros(batch, dtype=torch.long, device=device)
    best_z = torch.empty_like(z0)  # every row is written when it stops or at the end
    inf = torch.full((batch,), float("inf"), dtype=z0.dtype, device=device)
    best_res, last_res = inf.clone(), inf
    broke = torch.zeros(batch, dtype=torch.bool, device=device)
    # The compact set: sample indices, iterates, best iterates and per-row bookkeeping.
    idx = torch.arange(batch, device=device)
    z = z0
    state = solver.init(z)
    row_best_z, row_best_res, row_first_res = z, inf, inf
    row_broke = torch.zeros_like(broke)
    trace: list[Tensor] = []
    n_f_evals = 0
    for k in range(solver.max_iter):
        fz = f(z, None if len(idx) == batch else idx).to(z.dtype)
        n_f_evals += 1
        test = _check(solver, k, z, fz, row_first_res)
        res, finite, converged, stop, row_first_res = test
        better = finite & ((res < row_best_res) | converged)
        row_best_res = torch.where(better, res, row_best_res)
        n_stopped, n_worse = torch.stack((stop.sum(), (~better).sum())).tolist()
        row_best_z = z if n_worse == 0 else torch.where(better[:, None], z, row_best_z)
        n_steps[idx] += 1
        last_res = last_res.index_put((idx,), res)
        if solver.trace:
            trace.append(last_res)
        last = k == solver.max_iter - 1
        if n_stopped or last:
            done = stop if not last else torch.ones_like(stop)
            rows = idx[done]
            status[rows] = torch.where(stop, test.code(), int(Status.MAX_ITER))[done]
            best_z[rows] = row_best_z[done]
            best_res[rows] = row_best_res[done]
            broke[rows] = row_broke[done]
        if last or n_stopped == len(idx):
            break
        if n_stopped:
            keep = ~stop
            idx, fz, row_first_res = idx[keep], fz[keep], row_first_res[keep]
            row_best_res, row_broke = row_best_res[keep], row_broke[keep]
            aliased = row_best_z is z
            z = z[keep]
            row_best_z = z if aliased else row_best_z[keep]
            state = {name: value[keep] for name, value in state.items()}
        z_next, state, breakdown = solver.step_at(k, state, z, fz)
        del fz
        z = z_next.to(z.dtype)
        del z_next
        row_broke = row_broke | breakdown
    status = torch.where((status == int(Status.MAX_ITER)) & broke, int(Status.BREAKDOWN), status)
    return LoopOutput(
        z=best_z,
        status=status,
        n_steps=n_steps,
        residual=best_res,
        n_f_evals=n_f_evals,
        trace=torch.stack(trace) if trace else None,
    )
