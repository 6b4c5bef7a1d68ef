"""The one driver loop shared by every solver.

It owns stopping, per-sample freezing, best-iterate tracking, traces and non-finite and
divergence detection, so each solver only implements its update rule. There is one stopping
rule (:func:`_test` says which rows stop, :func:`_update` applies it) and two ways of choosing
the rows that ``f`` sees:

- **all rows** (the default): the whole batch is evaluated every iteration and stopped rows
  are frozen, which is valid for any ``f``, including maps that couple the samples;
- **running rows** (``independent_samples=True``): a row leaves the batch when it stops
  (:func:`_retire`), so ``f`` sees only the rows still running.

and two read schedules for the host: every iteration (where reads are free, the CPU), or once
every ``check_every`` iterations with no read in between (:func:`_chunk`, which
``torch.compile`` can capture as one graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._flat import FlatMap
from .._result import Status
from ._base import AbstractSolver, SolverState

_SUCCESS, _NONFINITE, _DIVERGED = int(Status.SUCCESS), int(Status.NONFINITE), int(Status.DIVERGED)
_MAX_ITER, _BREAKDOWN, _UNSETTLED = (
    int(Status.MAX_ITER),
    int(Status.BREAKDOWN),
    int(Status.UNSETTLED),
)

#: Device types whose tensors can be read on the host without a synchronisation.
_HOST_FREE = ("cpu",)


def _read(flags: Tensor) -> Any:
    """Flags on the host, a list of them or one (one synchronisation on an accelerator)."""
    return flags.tolist()


_read_traced = torch.compiler.disable(_read)  # type: ignore[no-untyped-call]


def _tracing() -> bool:
    """Whether torch.compile (dynamo) is tracing this call."""
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


def default_host_reads(device: torch.device, check_every: int) -> bool:
    """Whether a solve on ``device`` reads the host every iteration when ``host_reads`` is
    ``None``: where reads are free (no synchronisation), and with ``check_every=1``, where the
    chunked path reads the host every iteration too but runs two to four times as many
    operations (kernel launches) per iteration."""
    return device.type in _HOST_FREE or check_every == 1


@dataclass
class LoopOutput:
    """Flat outcome of :func:`run_loop`.

    ``fz`` is ``f`` at the returned batch when the loop evaluated exactly that batch last
    (every path that evaluates the whole batch), else ``None``. ``solver_state``: with
    ``keep_state``, the entries :attr:`~AbstractSolver.estimate_keys` of the solver's memory,
    each sample's as it stopped (its last iteration's for a sample that ran out), else
    ``None``.
    """

    z: Tensor
    status: Tensor
    n_steps: Tensor
    residual: Tensor
    n_f_evals: int
    trace: Tensor | None
    rate: Tensor
    states: tuple[Tensor, ...] = ()
    fz: Tensor | None = None
    solver_state: SolverState | None = None


class _Rows:
    """The rows being iterated, the solver's memory and the per-row bookkeeping. Mutated in
    place by the functions below; with running-row selection the rows are a shrinking subset
    of the batch (``idx``), otherwise the whole batch."""

    def __init__(self, solver: AbstractSolver, z0: Tensor) -> None:
        batch, device, dtype = z0.shape[0], z0.device, z0.dtype
        self.z = z0
        self.fz = z0  # f(z) of the batch last evaluated (set before first use)
        self.atol = l2_atol(solver, z0.shape[1])
        self.state: SolverState = solver.init(z0)
        self.idx: Tensor | None = None  # the samples of the rows (None: all, in order)
        # None: every row runs, which the host knows (nothing to freeze or mask).
        self.active: Tensor | None = None
        self.status = torch.full((batch,), _MAX_ITER, dtype=torch.long, device=device)
        self.n_steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.pending = 0  # iterations in which every row ran, not yet added to n_steps
        self.best_z = z0
        self.best_res = torch.full((batch,), float("inf"), dtype=dtype, device=device)
        # A running row diverges once its residual exceeds this (divergence_ratio times its
        # first residual); before the first residual, and without a ratio, the largest
        # finite value, so that the one comparison also stops an infinite residual.
        self.limit: Tensor | float = torch.finfo(dtype).max
        self.last_res = self.best_res
        self.rate = torch.full((batch,), float("nan"), dtype=dtype, device=device)
        self.prev: tuple[Tensor, Tensor] | None = None  # the previous iterate and f of it
        self.broke: Tensor | None = None
        # Rows whose best iterate is their row of the batch last evaluated (None: every row).
        self.current: Tensor | None = None
        self.any_active = True  # False once the host has read that no row runs
        # Rows that met the tolerance and lost it at a later batch (f couples the samples).
        self.reopened: Tensor | None = None
        # Reads flags on the host; under torch.compile through a function dynamo does not
        # trace, so that a read breaks the graph without a warning about it.
        self.read = _read_traced if _tracing() else _read
        # The entries of the solver's memory kept per sample as it stops (keep_state), and
        # the copy (None until a sample stops).
        self.keep_keys: tuple[str, ...] = ()
        self.kept: SolverState | None = None


def run_loop(
    f: FlatMap,
    z0: Tensor,
    solver: AbstractSolver,
    *,
    independent_samples: bool = False,
    host_reads: bool | None = None,
    record_at: tuple[int, ...] = (),
    keep_state: bool = False,
) -> LoopOutput:
    """Iterate ``solver`` on the flat map ``f`` from ``z0`` of shape ``(B, n)``.

    A row converges when :math:`\\|f(z) - z\\| \\le` its bound, and stops when it converges,
    when its residual is not finite, or (after the first iteration) when it exceeds
    ``divergence_ratio`` times its first residual. Stopped rows return their best iterate (the
    one with the smallest residual; a converging iterate always).

    With all rows evaluated (the default), which is valid for any ``f``, including maps that
    couple the samples (a batch mean, batch norm in training mode):

    - a stopped row is frozen; a row that had converged but no longer meets the tolerance at
      the current batch (``f`` couples the samples) runs again;
    - when the returned batch differs from the last one evaluated (some row returns an earlier
      iterate), ``f`` is evaluated once more at the returned batch and every row's residual
      and status are taken from there.

    So ``SUCCESS`` always means the residual is within tolerance at the batch returned. With
    ``independent_samples`` a row leaves the batch ``f`` sees when it stops, and one
    evaluation of the whole returned batch at the end checks that ``f`` really treats the
    samples independently (it raises otherwise).

    ``host_reads`` (default: :func:`default_host_reads`) chooses how often the host reads
    per-row flags; the results are the same to the last bit:

    - every iteration: an iteration where no row stops skips the masks (frozen rows, revivals)
      and, when every row improved, the best-iterate update;
    - once every ``check_every`` iterations: the iterations in between read nothing
      (:func:`_chunk`), the read between chunks stops the loop when no row runs.

    ``z`` is never modified in place, so the best iterate can alias it.

    ``record_at`` lists iterations :math:`k` whose batch :math:`z_k` (the iterate ``f`` is
    evaluated on at iteration :math:`k`, :math:`z_0` the start) is kept in ``states``; a row
    that stopped before :math:`k`, or a :math:`k` the solve did not reach, contributes its
    returned iterate. Memory: one state per entry, whatever ``max_iter`` is.

    ``keep_state`` keeps the entries :attr:`~AbstractSolver.estimate_keys` of the solver's
    memory of each sample as it stops (``LoopOutput.solver_state``), for the solver's
    :meth:`~AbstractSolver.inverse_estimate`: a frozen sample is still stepped with the
    others, which would overwrite its memory. It costs one copy of those entries and, in an
    iteration where samples stop (every iteration on the sync-free path), one merge; nothing
    without it.
    """
    r = _Rows(solver, z0)
    if keep_state:
        r.keep_keys = tuple(solver.estimate_keys)
    if independent_samples:
        _check_solver_state(solver, r.state, z0.shape[0])
        return _run_running_rows(r, f, solver, record_at)
    if host_reads is None:
        host_reads = default_host_reads(z0.device, solver.check_every)
    if host_reads:
        trace, recorded, n_f_evals = _run_with_reads(r, f, solver, record_at)
    else:
        trace, recorded, n_f_evals = _run_chunked(r, f, solver, record_at)
    if r.keep_keys:  # the samples still running keep their last memory
        _keep_state(r, r.active, final=True)
    # One chunk of the whole budget reads nothing on the host, and its end reads nothing
    # either: it evaluates the returned batch whether or not it was evaluated last.
    read = host_reads or solver.check_every < solver.max_iter
    n_f_evals += _evaluate_returned(r, f, solver, read)
    return _output(r, solver, z0, r.best_z, trace, recorded, n_f_evals, record_at, fz=r.fz)


# --- The stopping rule ------------------------------------------------------------------


def _test(r: _Rows, solver: AbstractSolver, k: int, res: Tensor, bound: Tensor) -> Tensor:
    """The stopping rule: ``(B,)`` rows that run on after this evaluation.

    A running row runs on while its residual is above its bound (``NaN`` is not) and at most
    its divergence limit (an infinite residual is not). The first residual (``k == 0``) sets
    each row's limit.
    """
    running = (res > bound) & (res <= r.limit)
    if k == 0 and solver.divergence_ratio is not None:
        r.limit = res.mul(solver.divergence_ratio).clamp(max=torch.finfo(res.dtype).max)
    return running


def _update(
    r: _Rows,
    solver: AbstractSolver,
    res: Tensor,
    bound: Tensor,
    running: Tensor,
    better: Tensor,
    reads: bool,
) -> bool:
    """Apply the rule row by row, with masks: freezing, revivals, statuses, best iterates.

    ``better``: the rows whose residual is below their best. With ``reads``, at most two host
    reads (the rate only when a row stops; which rows still run); without, none. Returns
    whether a row may still run.
    """
    z = r.z
    finite = res <= torch.finfo(res.dtype).max  # NaN and Inf compare False
    converged = finite & (res <= bound)
    status, best_res = r.status, r.best_res
    if r.active is None:
        active = torch.ones_like(running)
        r.n_steps = r.n_steps + r.pending
        r.pending = 0
    else:
        active = r.active
        # A frozen row that had converged but fails the test at this batch (f couples the
        # samples) runs again, its divergence test restarted from here; one that still
        # passes has its residual measured here.
        held = status == _SUCCESS
        revived = held & ~converged
        r.reopened = revived if r.reopened is None else r.reopened | revived
        active = active | revived
        status = torch.where(revived, _MAX_ITER, status)
        running = torch.where(revived, finite, running)
        if solver.divergence_ratio is not None:
            limit = res.mul(solver.divergence_ratio).clamp(max=torch.finfo(res.dtype).max)
            r.limit = torch.where(revived, limit, r.limit)
        best_res = torch.where(held & converged, res, best_res)
    stopping = active & ~running
    if r.keep_keys:
        _keep_state(r, stopping)
    if r.prev is not None and (not reads or r.read(stopping.any())):
        prev_z, prev_fz = r.prev
        num = torch.linalg.vector_norm(r.fz - prev_fz, dim=1)
        den = torch.linalg.vector_norm(z - prev_z, dim=1)
        estimate = num / den
        keep = stopping & (den > 0) & (estimate == estimate)  # a number (NaN != NaN)
        r.rate = torch.where(keep, estimate, r.rate)
    # A converging iterate always becomes the row's best.
    better = active & (better | converged)
    r.best_res = torch.where(better, res, best_res)
    current = torch.ones_like(better) if r.current is None else r.current
    r.current = torch.where(active, better, current)
    r.n_steps = r.n_steps + active
    r.last_res = torch.where(active, res, r.last_res)
    code = torch.where(converged, _SUCCESS, torch.where(finite, _DIVERGED, _NONFINITE))
    r.status = status = torch.where(stopping, code, status)
    r.active = active = active & running
    any_active, best_is_z = True, False
    if reads:
        # Rows whose best iterate is their current one: those that improved, and those that
        # stopped by converging earlier (frozen since).
        flags = torch.stack((active.any(), active.all(), (better | (status == _SUCCESS)).all()))
        any_active, all_active, best_is_z = r.read(flags)
        r.any_active = any_active
        if all_active:
            r.active = None
    r.best_z = z if best_is_z else torch.where(better[:, None], z, r.best_z)
    return any_active


def _keep_state(r: _Rows, rows: Tensor | None, *, final: bool = False) -> None:
    """Keep the solver's memory (the entries ``r.keep_keys``) of ``rows`` (``None``: all) in
    ``r.kept``; ``final``: after the last step (no copy needed)."""
    kept, state = r.kept, r.state
    new: SolverState = {}
    for k in r.keep_keys:
        value = state[k]
        if kept is None:
            # A copy while steps follow (solvers update their memory in place); the rows not
            # in ``rows`` are written again when they stop, or at the end.
            new[k] = value if final else value.clone()
        elif rows is None:
            new[k] = value
        else:
            new[k] = torch.where(rows.view(-1, *([1] * (value.dim() - 1))), value, kept[k])
    r.kept = new


def _keep_best(r: _Rows, res: Tensor, better: Tensor, every_row_better: bool) -> None:
    """The rule's bookkeeping when the host has read that every row runs on: best iterates
    and residuals, without masks (and without any operation when every row improved)."""
    r.pending += 1
    r.any_active = True
    r.last_res = res
    if every_row_better:
        r.best_res, r.best_z, r.current = res, r.z, None
    else:
        r.best_res = torch.where(better, res, r.best_res)
        r.best_z = torch.where(better[:, None], r.z, r.best_z)
        r.current = better


def _iterate_with_reads(
    r: _Rows, solver: AbstractSolver, k: int, res: Tensor, bound: Tensor
) -> bool:
    """One iteration's bookkeeping with one host read (two when a row stops). Returns whether
    a row may still run."""
    running = _test(r, solver, k, res, bound)
    better = res < r.best_res
    if r.active is None:
        flags = r.read(torch.stack((running, better)).all(dim=1))
        if flags[0]:
            _keep_best(r, res, better, flags[1])
            return True
    return _update(r, solver, res, bound, running, better, reads=True)


# --- The iterations -----------------------------------------------------------------------


def _advance(r: _Rows, solver: AbstractSolver, k: int) -> None:
    """Take the solver's step from iteration ``k``'s batch; frozen rows keep their iterate."""
    z = r.z
    # Kept for the rate estimate (references only: z and f(z) are never modified in place).
    r.prev = (z, r.fz)
    z_next, r.state, breakdown = solver.step(r.state, z, r.fz, k)
    if k == 0:
        _check_step(solver, z, z_next, breakdown)
    if z_next.dtype != z.dtype:
        z_next = z_next.to(z.dtype)
    if r.active is not None:
        z_next = torch.where(r.active[:, None], z_next, z)
        if breakdown is not None:
            breakdown = r.active & breakdown
    r.z = z_next
    if breakdown is not None:
        r.broke = breakdown if r.broke is None else r.broke | breakdown


def _evaluate(r: _Rows, f: FlatMap, solver: AbstractSolver) -> tuple[Tensor, Tensor]:
    """Evaluate ``f`` at the rows; their residuals and tolerance bounds."""
    fz = f(r.z, r.idx)
    if fz.dtype != r.z.dtype:
        fz = fz.to(r.z.dtype)
    r.fz = fz
    return _measure(solver, r.z, fz, r.atol)


def _record(r: _Rows) -> Tensor:
    """The batch as ``states`` keeps it: stopped rows give their returned iterate."""
    return r.z if r.active is None else torch.where(r.active[:, None], r.z, r.best_z)


def _run_with_reads(
    r: _Rows, f: FlatMap, solver: AbstractSolver, record_at: tuple[int, ...]
) -> tuple[list[Tensor], dict[int, Tensor], int]:
    """All rows, one host read per iteration."""
    trace: list[Tensor] = []
    recorded: dict[int, Tensor] = {}
    max_iter, check_every = solver.max_iter, solver.check_every
    k = 0
    for k in range(max_iter):
        if k:
            _advance(r, solver, k - 1)
        if record_at and k in record_at:
            recorded[k] = _record(r)
        res, bound = _evaluate(r, f, solver)
        any_active = _iterate_with_reads(r, solver, k, res, bound)
        if solver.trace:
            trace.append(r.last_res)
        if not any_active and (k + 1) % check_every == 0:
            break
    return trace, recorded, k + 1


def _chunk(
    r: _Rows,
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
            _advance(r, solver, k - 1)
        if k in record_at:
            # Inline (not _record): a frame that names no torch global and takes no tensor
            # argument is not even offered to torch.compile.
            z = r.z
            recorded[k] = z if r.active is None else torch.where(r.active[:, None], z, r.best_z)
        res, bound = _evaluate(r, f, solver)
        running = _test(r, solver, k, res, bound)
        _update(r, solver, res, bound, running, res < r.best_res, reads=False)
        if solver.trace:
            trace.append(r.last_res)
    return trace, recorded


def _run_chunked(
    r: _Rows, f: FlatMap, solver: AbstractSolver, record_at: tuple[int, ...]
) -> tuple[list[Tensor], dict[int, Tensor], int]:
    """All rows, without host reads inside chunks of ``check_every`` iterations."""
    trace: list[Tensor] = []
    recorded: dict[int, Tensor] = {}
    max_iter, check_every = solver.max_iter, solver.check_every
    start = 0
    while start < max_iter:
        end = min(start + check_every, max_iter)
        entries, states = _chunk(r, f, solver, start, end, record_at)
        trace += entries
        recorded.update(states)
        start = end
        if end == max_iter:
            break
        # The one host read per chunk: stop once no row runs.
        assert r.active is not None  # _update without reads leaves a mask
        any_active, all_active = r.read(torch.stack((r.active.any(), r.active.all())))
        r.any_active = any_active
        if all_active:
            r.active = None
        if not any_active:
            break
    return trace, recorded, start


def _run_running_rows(
    r: _Rows, f: FlatMap, solver: AbstractSolver, record_at: tuple[int, ...]
) -> LoopOutput:
    """Running rows only: a row leaves the batch ``f`` sees as soon as it stops.

    The number of rows left is read on the host every iteration (it sizes the next call of
    ``f``), so ``check_every`` does not apply.
    """
    z0 = r.z
    # Each sample's memory is written out as it retires (the running rows are compacted).
    keys, r.keep_keys = r.keep_keys, ()
    out = _Retired(r, keys)
    trace: list[Tensor] = []
    recorded: dict[int, Tensor] = {}
    k = 0
    for k in range(solver.max_iter):
        if k:
            _advance(r, solver, k - 1)
        if record_at and k in record_at:
            recorded[k] = r.z if r.idx is None else out.best_z.index_put((r.idx,), r.z)
        res, bound = _evaluate(r, f, solver)
        any_active = _iterate_with_reads(r, solver, k, res, bound)
        if r.active is not None:
            out.retire(r, keep=r.active)
        if solver.trace:
            trace.append(
                r.last_res if r.idx is None else out.last_res.index_put((r.idx,), r.last_res)
            )
        if not any_active:
            break
    if r.z.shape[0]:
        _rate_of_running(r)
        out.retire(r, keep=torch.zeros_like(r.status, dtype=torch.bool))
    n_f_evals = k + 1 + _check_independent(out, f, solver, r.atol)
    r.status, r.n_steps, r.best_res, r.rate, r.broke = (
        out.status,
        out.n_steps,
        out.best_res,
        out.rate,
        out.broke,
    )
    r.kept = out.kept if keys else None
    return _output(r, solver, z0, out.best_z, trace, recorded, n_f_evals, record_at, fz=None)


class _Retired:
    """The whole batch's results, written row by row as rows leave the running set."""

    def __init__(self, r: _Rows, keys: tuple[str, ...] = ()) -> None:
        self.best_z = torch.empty_like(r.z)  # every row is written when it stops or at the end
        self.kept: SolverState = {k: torch.empty_like(r.state[k]) for k in keys}
        self.status = r.status.clone()
        self.n_steps = r.n_steps.clone()
        self.best_res = r.best_res.clone()
        self.last_res = r.best_res.clone()
        self.rate = r.rate.clone()
        self.broke = torch.zeros_like(r.status, dtype=torch.bool)

    def retire(self, r: _Rows, keep: Tensor) -> None:
        """Write the rows not in ``keep`` out and drop them from ``r``."""
        done = ~keep
        rows = done.nonzero().squeeze(1) if r.idx is None else r.idx[done]
        n_steps = r.n_steps + r.pending
        self.best_z[rows] = r.best_z[done]
        self.status[rows] = r.status[done]
        self.n_steps[rows] = n_steps[done]
        self.best_res[rows] = r.best_res[done]
        self.last_res[rows] = r.last_res[done]
        self.rate[rows] = r.rate[done]
        if r.broke is not None:
            self.broke[rows] = r.broke[done]
        for k, kept in self.kept.items():
            kept[rows] = r.state[k][done]
        # The running rows, compacted (the best iterate still aliases z where it did).
        aliased = r.best_z is r.z
        r.idx = keep.nonzero().squeeze(1) if r.idx is None else r.idx[keep]
        r.z, r.fz = r.z[keep], r.fz[keep]
        r.best_z = r.z if aliased else r.best_z[keep]
        r.state = {name: value[keep] for name, value in r.state.items()}
        r.status, r.n_steps, r.pending = r.status[keep], n_steps[keep], 0
        r.best_res, r.last_res, r.rate = r.best_res[keep], r.last_res[keep], r.rate[keep]
        if isinstance(r.limit, Tensor):
            r.limit = r.limit[keep]
        if r.broke is not None:
            r.broke = r.broke[keep]
        if r.prev is not None:
            r.prev = (r.prev[0][keep], r.prev[1][keep])
        r.current = None if r.current is None else r.current[keep]
        r.active = None


# --- The end of a solve ---------------------------------------------------------------------


def _rate_of_running(r: _Rows) -> None:
    """The secant rate over the last step of the rows still running at the end."""
    if r.prev is None:
        return
    estimate = _secant_rate(r.z, r.fz, r.prev)
    running = ~torch.isnan(estimate)
    if r.active is not None:
        running = running & r.active
    r.rate = torch.where(running, estimate, r.rate)


def _evaluate_returned(r: _Rows, f: FlatMap, solver: AbstractSolver, read: bool = True) -> int:
    """Rates of the rows still running; with all rows evaluated, the evaluation at a returned
    batch that was never evaluated (``read=False``: without reading whether it was), which
    sets every row's residual and status (a row that had converged but fails there runs no
    more). Returns the evaluations."""
    if r.any_active:  # (two full-state passes: skipped when the host knows none runs)
        _rate_of_running(r)
    r.n_steps = r.n_steps + r.pending
    r.pending = 0
    if read and (r.current is None or r.read(r.current.all())):
        return 0
    # Some rows return an earlier iterate, so the returned batch was never evaluated: for an
    # f that couples samples, every residual may differ there. Measure them, with the
    # loop's iterates and the solver's memory released first (they would add a state or more
    # to the solve's peak).
    best_z = r.best_z
    r.state, r.prev, r.z, r.fz = {}, None, best_z, best_z
    fz = f(best_z, None)
    if fz.dtype != best_z.dtype:
        fz = fz.to(best_z.dtype)
    r.fz = fz
    res, bound = _measure(solver, best_z, fz, r.atol)
    converged = (res <= torch.finfo(res.dtype).max) & (res <= bound)
    status = r.status
    held = status == _SUCCESS
    running = held | (status == _MAX_ITER)
    r.reopened = held & ~converged if r.reopened is None else r.reopened | (held & ~converged)
    r.status = torch.where(running, torch.where(converged, _SUCCESS, _MAX_ITER), status)
    r.best_res = res
    return 1


def _check_independent(out: _Retired, f: FlatMap, solver: AbstractSolver, atol: float) -> int:
    """Evaluate ``f`` once at the whole returned batch: a row reported ``SUCCESS`` whose
    residual there is far above its tolerance means ``f`` couples the samples, which
    ``independent_samples=True`` declared it does not. Returns the evaluations."""
    z = out.best_z
    if z.shape[0] == 0:
        return 0
    fz = f(z, None)
    if fz.dtype != z.dtype:
        fz = fz.to(z.dtype)
    res, bound = _measure(solver, z, fz, atol)
    # Twice the bound, and a margin of round-off: a sub-batch and the whole batch may round
    # differently, which must not turn a converged row into an error.
    slack = torch.linalg.vector_norm(fz, dim=1).mul_(64 * torch.finfo(z.dtype).eps)
    coupled = (out.status == _SUCCESS) & ~(res <= 2 * bound + slack)
    if bool(coupled.any()):
        rows = coupled.nonzero().squeeze(1).tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        worst = float(res[coupled].max())
        raise ValueError(
            f"independent_samples=True, but f couples the samples: {len(rows)} samples "
            f"({shown}) met the tolerance when f saw only the samples still running, yet at "
            f"the whole returned batch their residual is up to {worst:.3g} (their bound: "
            f"{float(bound[coupled].max()):.3g}). f mixes information across the batch (batch "
            "statistics, a batch mean, attention across samples), so its fixed point depends "
            "on the whole batch: solve with independent_samples=False."
        )
    return 1


def _output(
    r: _Rows,
    solver: AbstractSolver,
    z0: Tensor,
    best_z: Tensor,
    trace: list[Tensor],
    recorded: dict[int, Tensor],
    n_f_evals: int,
    record_at: tuple[int, ...],
    *,
    fz: Tensor | None,
) -> LoopOutput:
    """The loop's outcome: unsettled rows and breakdowns named, residuals in the solver's
    norm."""
    status = r.status
    if r.reopened is not None:
        status = torch.where((status == _MAX_ITER) & r.reopened, _UNSETTLED, status)
    if r.broke is not None:
        status = torch.where((status == _MAX_ITER) & r.broke, _BREAKDOWN, status)
    returned = best_z.clone() if best_z is z0 else best_z
    n = z0.shape[1]
    return LoopOutput(
        z=returned,
        status=status,
        n_steps=r.n_steps,
        residual=_in_norm(solver, n, r.best_res),
        n_f_evals=n_f_evals,
        trace=_in_norm(solver, n, torch.stack(trace)) if trace else None,
        rate=r.rate,
        states=tuple(recorded.get(k, returned) for k in record_at),
        fz=fz,
        solver_state=r.kept,
    )


# --- Measurements and checks --------------------------------------------------------------


def l2_atol(solver: AbstractSolver, n: int) -> float:
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
    with ``atol`` from :func:`l2_atol`.

    Every path of the loop measures through here, so the paths agree to the last bit.
    """
    res = torch.linalg.vector_norm(fz - z, dim=1)
    bound = torch.linalg.vector_norm(fz, dim=1).mul_(solver.rtol)
    if atol:
        bound.add_(atol)
    return res, bound


def _secant_rate(z: Tensor, fz: Tensor, prev: tuple[Tensor, Tensor]) -> Tensor:
    r"""Per row :math:`\|f(z_k) - f(z_{k-1})\| / \|z_k - z_{k-1}\|`; NaN where the step is 0.

    A lower estimate of the Lipschitz constant of ``f`` along the last step, from ``prev``,
    the previous iterate and its image.
    """
    prev_z, prev_fz = prev
    num = torch.linalg.vector_norm(fz - prev_fz, dim=1)
    den = torch.linalg.vector_norm(z - prev_z, dim=1)
    return torch.where(den > 0, num / den, float("nan"))


def _check_solver_state(solver: AbstractSolver, state: SolverState, batch: int) -> None:
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
    if z_next.is_complex() and not z.is_complex():
        raise TypeError(
            f"{name}.step returned a {z_next.dtype} z_next for a {z.dtype} iterate: casting it "
            "would drop the imaginary part; return real iterates"
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
