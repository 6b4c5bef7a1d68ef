"""The one driver loop shared by every solver.

It owns stopping, per-sample freezing, best-iterate tracking, traces and non-finite and
divergence detection, so each solver only implements its update rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._result import Status
from ._base import AbstractSolver, SolverState

#: Evaluates f on flat iterates; ``idx`` selects the samples the rows of ``z`` belong to
#: (``None`` means all of them, in order).
FlatMap = Callable[[Tensor, "Tensor | None"], Tensor]

_SUCCESS, _NONFINITE, _DIVERGED = int(Status.SUCCESS), int(Status.NONFINITE), int(Status.DIVERGED)
_MAX_ITER, _BREAKDOWN = int(Status.MAX_ITER), int(Status.BREAKDOWN)

#: Device types whose tensors can be read on the host without a synchronisation.
_HOST_FREE = ("cpu",)


def default_host_reads(device: torch.device, check_every: int) -> bool:
    """Whether a solve on ``device`` reads the host every iteration when ``host_reads`` is
    ``None``: where reads are free (no synchronisation), and with ``check_every=1``, where the
    chunked path reads the host every iteration too but runs two to four times as many
    operations (kernel launches) per iteration."""
    return device.type in _HOST_FREE or check_every == 1


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


def _l2_atol(solver: AbstractSolver, n: int) -> float:
    r"""``atol`` in l2 units for ``n`` features: the loop measures in l2 and compares
    :math:`\|f(z) - z\|_2 \le \mathrm{atol}\sqrt{n} + \mathrm{rtol}\|f(z)\|_2` for
    ``norm="rms"``, which is the rms test multiplied by :math:`\sqrt{n}`; computed once."""
    return solver.atol * math.sqrt(n) if solver.norm == "rms" else solver.atol


def _in_norm(solver: AbstractSolver, n: int, values: Tensor) -> Tensor:
    """l2 residuals ``values`` in the solver's norm (one operation, once per solve)."""
    if solver.norm == "rms" and n > 0:
        return values / math.sqrt(n)
    return values


def _measure(solver: AbstractSolver, z: Tensor, fz: Tensor, atol: float) -> tuple[Tensor, Tensor]:
    r"""Per-row residual norms :math:`\|f(z) - z\|_2` and bounds ``atol + rtol * ||f(z)||_2``,
    with ``atol`` from :func:`_l2_atol`.

    Every path of the loop measures through here, so the paths agree to the last bit.
    """
    res = torch.linalg.vector_norm(fz - z, dim=1)
    bound = torch.linalg.vector_norm(fz, dim=1).mul_(solver.rtol)
    if atol:
        bound.add_(atol)
    return res, bound


def _residual(
    solver: AbstractSolver, z: Tensor, fz: Tensor, atol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row residual norms, which are finite, and which meet the tolerance."""
    res, bound = _measure(solver, z, fz, atol)
    finite = torch.isfinite(res)
    return res, finite, finite & (res <= bound)


def _secant_rate(z: Tensor, fz: Tensor, prev: tuple[Tensor, Tensor]) -> Tensor:
    r"""Per row :math:`\|f(z_k) - f(z_{k-1})\| / \|z_k - z_{k-1}\|`; NaN where the step is 0.

    A lower estimate of the Lipschitz constant of ``f`` along the last step, from ``prev``,
    the previous iterate and its image.
    """
    prev_z, prev_fz = prev
    num = torch.linalg.vector_norm(fz - prev_fz, dim=1)
    den = torch.linalg.vector_norm(z - prev_z, dim=1)
    return torch.where(den > 0, num / den, float("nan"))


class _Carry:
    """The dense loop's state between iterations: the batch, the solver's memory and the
    per-sample bookkeeping. Mutated in place by the iteration functions below."""

    def __init__(self, solver: AbstractSolver, z0: Tensor) -> None:
        batch, device, dtype = z0.shape[0], z0.device, z0.dtype
        self.z = z0
        self.fz = z0  # f(z) of the batch last evaluated (set before first use)
        self.atol = _l2_atol(solver, z0.shape[1])
        self.state: SolverState = solver.init(z0)
        # Known on the host: every sample is still running (so nothing needs freezing), and
        # some sample may still be running (False once the loop has read that none is).
        self.all_active = True
        self.any_active = True
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.status = torch.full((batch,), _MAX_ITER, dtype=torch.long, device=device)
        self.n_steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.best_z = z0
        self.best_res = torch.full((batch,), float("inf"), dtype=dtype, device=device)
        # Rows whose best iterate is their row of the batch last evaluated (None: every row).
        self.best_is_current: Tensor | None = None
        self.first_res = self.best_res
        self.last_res = self.best_res
        self.rate = torch.full((batch,), float("nan"), dtype=dtype, device=device)
        self.prev: tuple[Tensor, Tensor] | None = None  # the previous iterate and f of it
        self.broke: Tensor | None = None


def _check_state(solver: AbstractSolver, state: SolverState, batch: int) -> None:
    """With ``independent_samples`` the loop drops stopped rows from every state tensor, so
    each needs the batch as its leading dimension; checked once, on what ``init`` returned
    (shapes are host metadata: no synchronisation)."""
    name = type(solver).__name__
    if not isinstance(state, dict):
        raise TypeError(
            f"{name}.init must return a dict of tensors (a SolverState), got {type(state).__name__}"
        )
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{name}.init returned state[{key!r}] of type {type(value).__name__}; every "
                "state entry must be a tensor with the batch as its leading dimension (keep "
                "hyperparameters on the solver, not in its state)"
            )
        if value.dim() == 0 or value.shape[0] != batch:
            raise ValueError(
                f"{name}.init returned state[{key!r}] of shape {tuple(value.shape)}; with "
                f"independent_samples=True every state tensor needs the batch ({batch}) as "
                "its leading dimension, so that the loop can drop the rows of samples that "
                f"stopped: give it shape ({batch}, ...) (a per-solve constant c can be "
                f"c.expand({batch}, ...), which costs no memory)"
            )


def _check_step(solver: AbstractSolver, z: Tensor, z_next: object, breakdown: object) -> None:
    """What the first :meth:`~AbstractSolver.step` of a solve returned must fit the loop:
    ``z_next`` shaped like ``z``, ``breakdown`` a ``(B,)`` bool tensor or ``None``. Checked
    once per solve, on host metadata only (no synchronisation, no tensor operation)."""
    name = type(solver).__name__
    if not isinstance(z_next, Tensor):
        raise TypeError(
            f"{name}.step must return (z_next, state, breakdown) with z_next a tensor, got "
            f"z_next of type {type(z_next).__name__}"
        )
    if z_next.shape != z.shape:
        raise ValueError(
            f"{name}.step returned z_next of shape {tuple(z_next.shape)}; expected {tuple(z.shape)}"
        )
    if breakdown is None:
        return
    batch = (z.shape[0],)
    if (
        not isinstance(breakdown, Tensor)
        or breakdown.dtype != torch.bool
        or tuple(breakdown.shape) != batch
    ):
        got = (
            f"a {breakdown.dtype} tensor of shape {tuple(breakdown.shape)}"
            if isinstance(breakdown, Tensor)
            else f"{breakdown!r} ({type(breakdown).__name__})"
        )
        raise TypeError(
            f"{name}.step returned breakdown as {got}; it must be a {batch} bool tensor "
            "marking the samples whose internal system broke down this step, or None for a "
            "solver that cannot break down (e.g. breakdown = denominator.abs() <= tiny)"
        )


def _advance(c: _Carry, solver: AbstractSolver, k: int) -> None:
    """Take the solver's step from iteration ``k``'s batch; frozen samples keep their iterate."""
    z = c.z
    # Kept for the rate estimate (references only: z and f(z) are never modified in place).
    c.prev = (z, c.fz)
    z_next, c.state, breakdown = solver.step(c.state, z, c.fz, k)
    if k == 0:
        _check_step(solver, z, z_next, breakdown)
    if z_next.dtype != z.dtype:
        z_next = z_next.to(z.dtype)
    if not c.all_active:
        z_next = torch.where(c.active[:, None], z_next, z)
        if breakdown is not None:
            breakdown = c.active & breakdown
    c.z = z_next
    if breakdown is not None:
        c.broke = breakdown if c.broke is None else c.broke | breakdown


def _evaluate(c: _Carry, f: FlatMap, solver: AbstractSolver) -> tuple[Tensor, Tensor]:
    """Evaluate ``f`` at the batch; its residuals and tolerance bounds."""
    fz = f(c.z, None)
    if fz.dtype != c.z.dtype:
        fz = fz.to(c.z.dtype)
    c.fz = fz
    return _measure(solver, c.z, fz, c.atol)


def _record(c: _Carry) -> Tensor:
    """The batch as ``states`` keeps it: stopped samples give their returned iterate."""
    return c.z if c.all_active else torch.where(c.active[:, None], c.z, c.best_z)


class _Test(NamedTuple):
    """One iteration's stopping test, row by row."""

    finite: Tensor
    converged: Tensor
    stop: Tensor
    better: Tensor  # improves on the row's best residual, or converges
    first_res: Tensor


def _test(c: _Carry, solver: AbstractSolver, k: int, res: Tensor, bound: Tensor) -> _Test:
    """A row converges when its residual is at most its bound; it stops when it converged, is
    not finite, or (after the first iteration) exceeds ``divergence_ratio`` times its first
    residual, which is set at ``k == 0``."""
    finite = torch.isfinite(res)
    converged = finite & (res <= bound)
    stop = ~finite | converged
    first_res = c.first_res
    if k == 0:
        first_res = torch.where(finite, res, 0.0)
    elif solver.divergence_ratio is not None:
        # (A non-finite residual that compares greater stops anyway.)
        stop = stop | (res > solver.divergence_ratio * first_res)
    # Track the best iterate; a converging iterate always wins (a residual below the best is
    # finite).
    better = (res < c.best_res) | converged
    return _Test(finite, converged, stop, better, first_res)


def _masked(c: _Carry, res: Tensor, test: _Test, reads: bool) -> bool:
    """The general iteration: revivals, statuses and best iterates, every row through
    ``where``. With ``reads``, two host reads (the rate only when a row stops; which samples
    still run); without, none. Returns whether a sample may still run."""
    z = c.z
    finite, converged, stop, better, first_res = test
    active, status, best_res = c.active, c.status, c.best_res
    if not c.all_active:
        # A frozen sample that had converged but fails the test at this batch (f couples the
        # samples) runs again; one that still passes has its residual measured here.
        frozen_ok = status == _SUCCESS  # a sample that converged is frozen
        revived = frozen_ok & ~converged
        active = active | revived
        status = torch.where(revived, _MAX_ITER, status)
        # Its divergence test restarts from here (its first residual may be 0).
        first_res = torch.where(revived, res, first_res)
        stop = torch.where(revived, ~finite, stop)
        best_res = torch.where(frozen_ok & converged, res, best_res)
    c.first_res = first_res
    stopping = active & stop
    if c.prev is not None and (not reads or bool(stopping.any())):
        # _secant_rate, kept where it is a number (NaN != NaN), in fewer operations.
        prev_z, prev_fz = c.prev
        num = torch.linalg.vector_norm(c.fz - prev_fz, dim=1)
        den = torch.linalg.vector_norm(z - prev_z, dim=1)
        estimate = num / den
        keep = stopping & (den > 0) & (estimate == estimate)
        c.rate = torch.where(keep, estimate, c.rate)
    better = better & active
    c.best_res = torch.where(better, res, best_res)
    current = torch.ones_like(better) if c.best_is_current is None else c.best_is_current
    c.best_is_current = torch.where(active, better, current)
    c.n_steps = c.n_steps + active
    c.last_res = torch.where(active, res, c.last_res)
    code = torch.where(converged, _SUCCESS, torch.where(finite, _DIVERGED, _NONFINITE))
    c.status = status = torch.where(stopping, code, status)
    c.active = active = active & ~stop
    any_active, best_is_z = True, False
    if reads:
        # Samples whose best iterate is their current one: those that improved, and those
        # that stopped by converging earlier (frozen since).
        flags = torch.stack((active.any(), active.all(), (better | (status == _SUCCESS)).all()))
        any_active, c.all_active, best_is_z = flags.tolist()
    else:
        c.all_active = False
    c.best_z = z if best_is_z else torch.where(better[:, None], z, c.best_z)
    return any_active


def _chunk(
    c: _Carry,
    f: FlatMap,
    solver: AbstractSolver,
    start: int,
    end: int,
    record_at: tuple[int, ...],
) -> tuple[list[Tensor], dict[int, Tensor]]:
    """Iterations ``start .. end - 1`` without a single host read.

    A function of its own so that ``torch.compile`` captures the chunk, ``f`` included, as
    one graph (the reads between chunks break the graph of :func:`run_loop` instead).
    Returns the chunk's trace entries and recorded states.
    """
    trace: list[Tensor] = []
    recorded: dict[int, Tensor] = {}
    for k in range(start, end):
        if k:
            _advance(c, solver, k - 1)
        if k in record_at:
            # Inline (not _record): a frame that names no torch global and takes no tensor
            # argument is not even offered to torch.compile.
            recorded[k] = c.z if c.all_active else torch.where(c.active[:, None], c.z, c.best_z)
        res, bound = _evaluate(c, f, solver)
        _masked(c, res, _test(c, solver, k, res, bound), reads=False)
        if solver.trace:
            trace.append(c.last_res)
    return trace, recorded


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

    ``host_reads`` (default: :func:`default_host_reads`) chooses between two paths that give
    the same results to the last bit:

    - with host reads, an iteration where every sample runs, none meets the tolerance and
      every residual improves costs one flag read and touches full states only to measure
      the residual; any other iteration takes the masked path (:func:`_masked`), which freezes
      stopped samples and keeps best iterates with ``where``;
    - without, the loop runs chunks of ``check_every`` masked iterations with no host read
      (:func:`_chunk`) and reads the host once between chunks, to stop when no sample runs.

    ``z`` is never modified in place, so the best iterate can alias it.

    ``record_at`` lists iterations :math:`k` whose batch :math:`z_k` (the iterate ``f`` is
    evaluated on at iteration :math:`k`, :math:`z_0` the start) is kept in ``states``; a sample
    that stopped before :math:`k`, or a :math:`k` the solve did not reach, contributes the
    sample's returned iterate. Memory: one state per entry, whatever ``max_iter`` is.
    """
    if independent_samples:
        return _run_compacted(f, z0, solver, record_at)
    if host_reads is None:
        host_reads = default_host_reads(z0.device, solver.check_every)
    c = _Carry(solver, z0)
    if host_reads:
        trace, recorded, n_f_evals, quiet_steps = _run_with_reads(c, f, solver, record_at)
    else:
        trace, recorded, n_f_evals, quiet_steps = _run_chunked(c, f, solver, record_at)
    return _finish(c, f, solver, z0, trace, recorded, n_f_evals, quiet_steps, record_at)


def _run_with_reads(
    c: _Carry, f: FlatMap, solver: AbstractSolver, record_at: tuple[int, ...]
) -> tuple[list[Tensor], dict[int, Tensor], int, int]:
    """The loop where host reads are free: one flag read per quiet iteration."""
    trace: list[Tensor] = []
    recorded: dict[int, Tensor] = {}
    max_iter, check_every = solver.max_iter, solver.check_every
    n_f_evals = quiet_steps = 0
    for k in range(max_iter):
        if k:
            _advance(c, solver, k - 1)
        if record_at and k in record_at:
            recorded[k] = _record(c)
        res, bound = _evaluate(c, f, solver)
        n_f_evals += 1
        any_active = True
        # Every row improves on its best residual without meeting the tolerance: none
        # converges, is non-finite (the comparison fails) or diverges (its best residual is at
        # most its first), so nothing needs freezing and every best iterate is this batch.
        if c.all_active and bool(((res > bound) & (res < c.best_res)).all()):
            if k == 0:
                c.first_res = res
            c.best_res = c.last_res = res
            c.best_z = c.z
            c.best_is_current = None
            quiet_steps += 1
        else:
            test = _test(c, solver, k, res, bound)
            if c.all_active and not bool(test.stop.any()):
                # No row stops, but some do not improve (else the test above had held): those
                # keep their best iterate.
                c.first_res = test.first_res
                c.best_res = torch.where(test.better, res, c.best_res)
                c.last_res = res
                c.best_z = torch.where(test.better[:, None], c.z, c.best_z)
                c.best_is_current = test.better
                quiet_steps += 1
            else:
                any_active = _masked(c, res, test, reads=True)
        if solver.trace:
            trace.append(c.last_res)
        if k == max_iter - 1 or ((k + 1) % check_every == 0 and not any_active):
            break
    c.any_active = any_active
    return trace, recorded, n_f_evals, quiet_steps


def _run_chunked(
    c: _Carry, f: FlatMap, solver: AbstractSolver, record_at: tuple[int, ...]
) -> tuple[list[Tensor], dict[int, Tensor], int, int]:
    """The loop without host reads inside chunks of ``check_every`` iterations."""
    trace: list[Tensor] = []
    recorded: dict[int, Tensor] = {}
    max_iter, check_every = solver.max_iter, solver.check_every
    start = 0
    while start < max_iter:
        end = min(start + check_every, max_iter)
        entries, states = _chunk(c, f, solver, start, end, record_at)
        trace += entries
        recorded.update(states)
        start = end
        if end == max_iter:
            break
        # The one host read per chunk: stop once no sample runs.
        c.any_active, c.all_active = torch.stack((c.active.any(), c.active.all())).tolist()
        if not c.any_active:
            break
    return trace, recorded, start, 0


def _finish(
    c: _Carry,
    f: FlatMap,
    solver: AbstractSolver,
    z0: Tensor,
    trace: list[Tensor],
    recorded: dict[int, Tensor],
    n_f_evals: int,
    quiet_steps: int,
    record_at: tuple[int, ...],
) -> LoopOutput:
    """Rates of the samples still running, the evaluation at a mixed batch, statuses."""
    n_steps, status, best_res, best_z, rate = c.n_steps, c.status, c.best_res, c.best_z, c.rate
    if quiet_steps:
        n_steps = n_steps + quiet_steps
    if c.prev is not None and c.any_active:  # (two full-state passes: skipped if none runs)
        estimate = _secant_rate(c.z, c.fz, c.prev)
        rate = torch.where(c.active & ~torch.isnan(estimate), estimate, rate)
    if c.best_is_current is not None and not bool(c.best_is_current.all()):
        # Some samples return an earlier iterate, so the returned batch was never evaluated:
        # for an f that couples samples, every residual may differ there. Measure them, with
        # the loop's iterates and the solver's memory released first (they would add a state
        # or more to the solve's peak).
        c.state, c.prev, c.z, c.fz = {}, None, best_z, best_z
        fz = f(best_z, None)
        res, _, converged = _residual(solver, best_z, fz.to(best_z.dtype), c.atol)
        n_f_evals += 1
        running = (status == _SUCCESS) | (status == _MAX_ITER)
        status = torch.where(running, torch.where(converged, _SUCCESS, _MAX_ITER), status)
        best_res = res
    if c.broke is not None:
        status = torch.where((status == _MAX_ITER) & c.broke, _BREAKDOWN, status)
    returned = best_z.clone() if best_z is z0 else best_z
    n = z0.shape[1]
    return LoopOutput(
        z=returned,
        status=status,
        n_steps=n_steps,
        residual=_in_norm(solver, n, best_res),
        n_f_evals=n_f_evals,
        trace=_in_norm(solver, n, torch.stack(trace)) if trace else None,
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
    status = torch.full((batch,), _MAX_ITER, dtype=torch.long, device=device)
    n_steps = torch.zeros(batch, dtype=torch.long, device=device)
    best_z = torch.empty_like(z0)  # every row is written when it stops or at the end
    inf = torch.full((batch,), float("inf"), dtype=z0.dtype, device=device)
    best_res, last_res = inf.clone(), inf
    broke = torch.zeros(batch, dtype=torch.bool, device=device)
    # The compact set: sample indices, iterates, best iterates and per-row bookkeeping.
    idx = torch.arange(batch, device=device)
    z = z0
    state = solver.init(z)
    _check_state(solver, state, batch)
    row_best_z, row_best_res, row_first_res = z, inf, inf
    row_broke = torch.zeros_like(broke)
    rate = torch.full((batch,), float("nan"), dtype=z0.dtype, device=device)
    prev: tuple[Tensor, Tensor] | None = None
    trace: list[Tensor] = []
    recorded: dict[int, Tensor] = {}
    n_f_evals = 0
    ratio = solver.divergence_ratio
    atol = _l2_atol(solver, z0.shape[1])
    for k in range(solver.max_iter):
        if k in record_at:
            # Stopped rows hold their returned iterate in best_z already.
            recorded[k] = z if len(idx) == batch else best_z.index_put((idx,), z)
        fz = f(z, None if len(idx) == batch else idx)
        if fz.dtype != z.dtype:
            fz = fz.to(z.dtype)
        n_f_evals += 1
        res, finite, converged = _residual(solver, z, fz, atol)
        stop = ~finite | converged
        if k == 0:
            row_first_res = torch.where(finite, res, 0.0)
        elif ratio is not None:
            stop |= finite & (res > ratio * row_first_res)
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
            if prev is not None:
                rate[rows] = _secant_rate(z, fz, prev)[done]
            code = torch.where(converged, _SUCCESS, torch.where(finite, _DIVERGED, _NONFINITE))
            status[rows] = torch.where(stop, code, _MAX_ITER)[done]
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
        prev = (z, fz)
        z_next, state, breakdown = solver.step(state, z, fz, k)
        if k == 0:
            _check_step(solver, z, z_next, breakdown)
        z = z_next if z_next.dtype == z.dtype else z_next.to(z.dtype)
        del z_next
        if breakdown is not None:
            row_broke = row_broke | breakdown
    status = torch.where((status == _MAX_ITER) & broke, _BREAKDOWN, status)
    n = z0.shape[1]
    return LoopOutput(
        z=best_z,
        status=status,
        n_steps=n_steps,
        residual=_in_norm(solver, n, best_res),
        n_f_evals=n_f_evals,
        trace=_in_norm(solver, n, torch.stack(trace)) if trace else None,
        rate=rate,
        states=tuple(recorded.get(k, best_z) for k in record_at),
    )
