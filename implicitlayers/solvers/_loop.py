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
    rate: Tensor
    states: tuple[Tensor, ...] = ()


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
    res, finite, converged = _residual(solver, z, fz)
    stop = ~finite | converged
    if k == 0:
        first_res = torch.where(finite, res, 0.0)
    elif solver.divergence_ratio is not None:
        stop |= finite & (res > solver.divergence_ratio * first_res)
    return _Check(res, finite, converged, stop, first_res)


def _residual(solver: AbstractSolver, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row residual norms, which are finite, and which meet the tolerance."""
    res = torch.linalg.vector_norm(fz - z, dim=1)
    finite = torch.isfinite(res)
    bound = torch.linalg.vector_norm(fz, dim=1).mul_(solver.rtol).add_(solver.atol)
    return res, finite, finite & (res <= bound)


def _secant_rate(z: Tensor, fz: Tensor, prev_z: Tensor, prev_fz: Tensor) -> Tensor:
    r"""Per row :math:`\|f(z_k) - f(z_{k-1})\| / \|z_k - z_{k-1}\|`; NaN where the step is 0.

    A lower estimate of the Lipschitz constant of ``f`` along the last step.
    """
    num = torch.linalg.vector_norm(fz - prev_fz, dim=1)
    den = torch.linalg.vector_norm(z - prev_z, dim=1)
    return torch.where(den > 0, num / den, float("nan"))


def run_loop(
    f: FlatMap,
    z0: Tensor,
    solver: AbstractSolver,
    *,
    independent_samples: bool = False,
    host_reads: bool | None = None,
    record_at: tuple[int, ...] = (),
) -> LoopOutput:
    """Iterate ``solver`` on the flat map ``f`` from ``z0`` of shape ``(B, n)``.

    With ``independent_samples`` each evaluation of ``f`` (and each solver update) sees only
    the samples still running (:func:`_run_compacted`). Otherwise the whole batch is evaluated
    every iteration and stopped samples are frozen, which is valid for any ``f``, including
    maps that couple the samples (a batch mean, batch norm in training mode):

    - a frozen sample's residual is measured again at every evaluation (it costs nothing: the
      whole batch is evaluated), and a sample that had converged but no longer meets the
      tolerance at the current batch runs again;
    - a sample that ends without converging returns its best iterate; when that makes the
      returned batch differ from the last one evaluated, ``f`` is evaluated once more at the
      returned batch and every sample's residual and status are taken from there.

    So ``SUCCESS`` always means the residual is within tolerance at the batch returned.

    Per iteration the loop touches full states only to measure the residual, unless some
    samples have stopped: then it freezes them and keeps their best iterate with ``where``.
    Which case holds is read on the host where that is free (``host_reads``; default: on CPU)
    or on the iterations that synchronise anyway (every ``check_every``); otherwise the
    masked path runs. ``z`` is never modified in place, so the best iterate can alias it.

    ``record_at`` lists iterations :math:`k` whose batch :math:`z_k` (the iterate ``f`` is
    evaluated on at iteration :math:`k`, :math:`z_0` the start) is kept in ``states``; a sample
    that stopped before :math:`k`, or a :math:`k` the solve did not reach, contributes the
    sample's returned iterate. Memory: one state per entry, whatever ``max_iter`` is.
    """
    if independent_samples:
        return _run_compacted(f, z0, solver, record_at)
    batch = z0.shape[0]
    device = z0.device
    host_free = device.type in _HOST_FREE if host_reads is None else host_reads
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
    # Rows whose best iterate is their row of the batch last evaluated.
    best_is_current = torch.ones(batch, dtype=torch.bool, device=device)
    first_res = best_res
    last_res = best_res
    rate = torch.full((batch,), float("nan"), dtype=z.dtype, device=device)
    prev_z: Tensor | None = None
    prev_fz: Tensor | None = None
    broke = torch.zeros(batch, dtype=torch.bool, device=device)
    trace: list[Tensor] = []
    recorded: dict[int, Tensor] = {}
    n_f_evals = 0
    for k in range(solver.max_iter):
        if k in record_at:
            recorded[k] = z if all_active else torch.where(active[:, None], z, best_z)
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
            best_is_current = better
            n_steps += 1
            last_res = res
        else:
            if not all_active:
                # A frozen sample that had converged but fails the test at this batch (f
                # couples the samples) runs again; one that still passes has its residual
                # measured here.
                frozen_ok = ~active & (status == _SUCCESS)
                revived = frozen_ok & ~converged
                active = active | revived
                status = torch.where(revived, int(Status.MAX_ITER), status)
                # Its divergence test restarts from here (its first residual may be 0).
                first_res = torch.where(revived, res, first_res)
                stop = torch.where(revived, ~finite, stop)
                best_res = torch.where(frozen_ok & converged, res, best_res)
            stopping = active & stop
            if (
                prev_z is not None
                and prev_fz is not None
                and (not (host_free or synced) or bool(stopping.any()))
            ):
                estimate = _secant_rate(z, fz, prev_z, prev_fz)
                rate = torch.where(stopping & ~torch.isnan(estimate), estimate, rate)
            better &= active
            best_res = torch.where(better, res, best_res)
            best_is_current = torch.where(active, better, best_is_current)
            n_steps += active
            last_res = torch.where(active, res, last_res)
            status = torch.where(stopping, test.code(), status)
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
        # Kept for the rate estimate (references only: z and f(z) are never modified in place).
        prev_z, prev_fz = z, fz
        z_next, state, breakdown = solver.step_at(k, state, z, fz)
        z_next = z_next.to(z.dtype)
        if all_active:
            z = z_next
            broke |= breakdown
        else:
            z = torch.where(active[:, None], z_next, z)
            broke |= active & breakdown
        del z_next
    if prev_z is not None and prev_fz is not None:
        estimate = _secant_rate(z, fz, prev_z, prev_fz)
        rate = torch.where(active & ~torch.isnan(estimate), estimate, rate)
    del prev_z, prev_fz
    if not bool(best_is_current.all()):
        # Some samples return an earlier iterate, so the returned batch was never evaluated:
        # for an f that couples samples, every residual may differ there. Measure them.
        res, _, converged = _residual(solver, best_z, f(best_z, None).to(best_z.dtype))
        n_f_evals += 1
        running = (status == _SUCCESS) | (status == int(Status.MAX_ITER))
        status = torch.where(
            running, torch.where(converged, _SUCCESS, int(Status.MAX_ITER)), status
        )
        best_res = res
    status = torch.where((status == int(Status.MAX_ITER)) & broke, int(Status.BREAKDOWN), status)
    returned = best_z.clone() if best_z is z0 else best_z
    return LoopOutput(
        z=returned,
        status=status,
        n_steps=n_steps,
        residual=best_res,
        n_f_evals=n_f_evals,
        trace=torch.stack(trace) if trace else None,
        rate=rate,
        states=tuple(recorded.get(k, returned) for k in record_at),
    )


def _run_compacted(
    f: FlatMap, z0: Tensor, solver: AbstractSolver, record_at: tuple[int, ...] = ()
) -> LoopOutput:
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
    rate = torch.full((batch,), float("nan"), dtype=z0.dtype, device=device)
    prev_z: Tensor | None = None
    prev_fz: Tensor | None = None
    trace: list[Tensor] = []
    recorded: dict[int, Tensor] = {}
    n_f_evals = 0
    for k in range(solver.max_iter):
        if k in record_at:
            # Stopped rows hold their returned iterate in best_z already.
            recorded[k] = z if len(idx) == batch else best_z.index_put((idx,), z)
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
            if prev_z is not None and prev_fz is not None:
                rate[rows] = _secant_rate(z, fz, prev_z, prev_fz)[done]
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
        prev_z, prev_fz = z, fz
        z_next, state, breakdown = solver.step_at(k, state, z, fz)
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
        rate=rate,
        states=tuple(recorded.get(k, best_z) for k in record_at),
    )
