"""``fixed_point``: the functional core, no autograd."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._errors import ConvergenceError, ConvergenceWarning
from ._flat import FlatMap, flatten_state
from ._result import SolverResult, Status
from ._warn import warn_at_caller
from .solvers import AbstractSolver, Picard
from .solvers._loop import LoopOutput, run_loop
from .solvers._names import as_solver

__all__ = ["fixed_point", "record_at", "result_of", "solve"]

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def fixed_point(
    f: Callable[..., Any],
    z0: Any,
    *inputs: Any,
    solver: AbstractSolver | str = "anderson",
    independent_samples: bool = False,
    states: Sequence[int] = (),
    host_reads: bool | None = None,
) -> SolverResult:
    r"""Solve :math:`z^\star = f(z^\star, \text{inputs})` for every sample of a batch.

    Runs without recording autograd history. Each sample stops as soon as

    .. math::

        \|f(z) - z\| \le \mathrm{atol} + \mathrm{rtol}\, \|f(z)\|

    (norms over all non-batch dimensions: Euclidean, or per feature with the solver's
    ``norm="rms"``, see :class:`~implicitlayers.solvers.AbstractSolver`), after which its
    iterate is frozen.

    Args:
        f: Callable ``f(z, *inputs)`` returning a state with the structure of ``z``, in the
            state's dtype or one it can be cast to without loss of kind (a complex ``f(z)``
            for a real state raises: its imaginary part would be dropped).
        z0: Initial state: a real floating-point tensor of shape ``(B, *S)`` or a
            tuple/list/dict of such tensors sharing ``B``, dtype and device.
        *inputs: Extra arguments passed to ``f`` unchanged (tensors or any structure of them).
        solver: A solver object (:class:`~implicitlayers.Picard`,
            :class:`~implicitlayers.Anderson`, :class:`~implicitlayers.Broyden`, or your own
            :class:`~implicitlayers.solvers.AbstractSolver`) or one of their names.
        independent_samples: Evaluate ``f`` only on the samples still running, so a batch costs
            the sum of its samples' iterations rather than batch size times the slowest. Valid
            only when ``f`` treats samples independently (no batch norm in training mode) and
            every tensor input whose leading dimension equals ``B`` (however deep in a dict,
            list, tuple or dataclass input) is batched along it. One evaluation of the whole
            returned batch checks the first condition: a sample that met the tolerance alone
            but fails it there raises ``ValueError``. The solve stops as soon as the last
            sample stops (``check_every`` does not apply).
        states: Iterations :math:`k` whose iterates :math:`z_k` to keep in
            ``result.states`` (:math:`z_0` is ``z0``; :math:`z_k` is the iterate ``f`` is
            evaluated on at iteration :math:`k`). A sample that stopped before :math:`k`, or a
            :math:`k` the solve did not reach, gives the sample's returned iterate. Memory:
            one state per entry, whatever ``max_iter`` is.
        host_reads: Whether the loop may read per-sample flags on the host every iteration.
            ``None`` (default): where that is free (the CPU), and on any device with
            ``check_every=1``, where the other path would read the host every iteration too
            but launch two to four times as many operations. ``False``: the loop reads the
            host only once every ``check_every`` iterations (to stop once no sample runs), as
            it does on a GPU with ``check_every > 1``; between two reads it launches no
            synchronisation, so the chunk can be captured by ``torch.compile`` as one graph
            (see the guide's compile recipe). ``True``: read every iteration anywhere. The
            results are the same to the last bit; only the operations and host reads per
            iteration differ.

    Returns:
        A :class:`~implicitlayers.SolverResult`; ``result.z`` holds the solution.

    Raises:
        ConvergenceError: When the solver's policies say so (by default, when ``f`` returns
            NaN or Inf).
        ValueError: When ``f`` returns a state whose structure differs from ``z0``'s, or
            couples the samples under ``independent_samples=True``.
        TypeError: When ``f`` returns a complex state for a real ``z0``.

    Example:
        >>> import torch, implicitlayers as il
        >>> x = torch.tensor([[1.0], [2.0]])
        >>> result = il.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(2, 1), x,
        ...                         solver=il.Anderson(rtol=1e-8))
        >>> torch.allclose(result.z, 2 * x)  # z = 0.5 z + x  =>  z = 2 x
        True
        >>> bool(result.converged.all())
        True
    """
    solver = as_solver(solver)
    check_flags(independent_samples=independent_samples, host_reads=host_reads)
    recorded = record_at(states)
    f_flat, flat0 = flatten_state(f, z0, inputs)
    out = solve(
        f_flat,
        flat0,
        solver,
        independent_samples=independent_samples,
        host_reads=host_reads,
        record_at=recorded,
    )
    result = result_of(out, f_flat)
    apply_policies(result, solver, f_flat.dtype)
    return result


def solve(
    f_flat: FlatMap,
    flat0: Tensor,
    solver: AbstractSolver,
    *,
    independent_samples: bool,
    host_reads: bool | None,
    record_at: tuple[int, ...],
) -> LoopOutput:
    """Run the driver loop on the flat map from the flat start, without autograd and with the
    bookkeeping outside the caller's autocast; an empty batch takes no step."""
    if flat0.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=flat0.device)
        return LoopOutput(
            z=flat0,
            status=empty,
            n_steps=empty,
            residual=flat0.new_zeros(0),
            n_f_evals=0,
            trace=None,
            rate=flat0.new_zeros(0),
            states=tuple(flat0 for _ in record_at),
        )
    amp = f_flat.amp
    with torch.no_grad(), amp.bookkeeping() if amp is not None else _nothing():
        return run_loop(
            f_flat,
            flat0,
            solver,
            independent_samples=independent_samples,
            host_reads=host_reads,
            record_at=record_at,
        )


class _nothing:
    """A context manager that does nothing (cheaper than ``contextlib.nullcontext``)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def result_of(
    out: LoopOutput, f_flat: FlatMap, z: Any = None, states: tuple[Any, ...] | None = None
) -> SolverResult:
    """The :class:`SolverResult` of a loop's output, with the solution and states unflattened
    (or ``z`` and ``states``, unflattened already)."""
    if z is None:
        z = f_flat.unflatten(out.z)
    if states is None:
        states = tuple(f_flat.unflatten(state) for state in out.states)
    empty = out.status.shape[0] == 0
    return SolverResult(
        z=z,
        status=out.status,
        converged=out.status == int(Status.SUCCESS),
        n_steps=out.n_steps,
        residual=out.residual,
        n_f_evals=out.n_f_evals,
        trace=out.trace,
        rate=None if empty else out.rate,
        states=states,
    )


def check_flags(*, independent_samples: Any, host_reads: Any) -> None:
    """The solve's flags: ``independent_samples`` a bool, ``host_reads`` ``None`` or a bool."""
    if not isinstance(independent_samples, bool):
        raise TypeError(f"independent_samples must be a bool, got {independent_samples!r}")
    if host_reads is not None and not isinstance(host_reads, bool):
        raise TypeError(f"host_reads must be None, True or False, got {host_reads!r}")


def record_at(states: Sequence[int]) -> tuple[int, ...]:
    """``states`` (the iterations to record) as a tuple of indices, each a non-negative int."""
    if isinstance(states, (str, bytes)) or not isinstance(states, Sequence):
        raise TypeError(
            f"states must be a sequence of iteration indices, e.g. (5, 10, 20), got {states!r}"
        )
    for k in states:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(
                f"states must hold iteration indices k >= 0 (ints), got {k!r} in {states!r}"
            )
    return tuple(states)


def apply_policies(result: SolverResult, solver: AbstractSolver, dtype: torch.dtype) -> None:
    """Warn or raise for the samples that did not converge, as the solver's policies say."""
    status = result.status
    if logger.isEnabledFor(logging.DEBUG):  # the summary reads the statuses on the host
        logger.debug("fixed_point: %s", result.summary())
    _check_precision(result, solver, dtype)
    nonfinite = status == int(Status.NONFINITE)
    failed = (status != int(Status.SUCCESS)) & ~nonfinite
    for mask, policy in ((nonfinite, solver.on_nonfinite), (failed, solver.on_unconverged)):
        if policy == "ignore" or not bool(mask.any()):
            continue
        message = describe_failure(result, mask, solver)
        if policy == "raise":
            raise ConvergenceError(message, result)
        warn_at_caller(message, ConvergenceWarning)


def describe_failure(result: SolverResult, mask: Tensor, solver: AbstractSolver) -> str:
    """What happened to the samples in ``mask`` and what to try, each status's advice suited
    to the solver that ran."""
    name = type(solver).__name__
    idx = mask.nonzero().squeeze(1).tolist()
    shown = ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")
    codes = sorted({int(s) for s in result.status[mask].tolist()})
    reasons = " ".join(f"{Status(c).name}: {_advice(Status(c), solver)}" for c in codes)
    return (
        f"{name} stopped {len(idx)}/{result.batch_size} samples without converging "
        f"(samples {shown}). {reasons}"
    )


def _max_iter_advice(solver: AbstractSolver) -> str:
    """Advice for samples that used their whole budget."""
    text = (
        f"used all max_iter={solver.max_iter} evaluations without meeting "
        "||f(z) - z|| <= atol + rtol * ||f(z)||. Raise max_iter, loosen atol/rtol"
    )
    if isinstance(solver, Picard):
        text += ", use an accelerated solver (Anderson, Broyden)"
    text += (
        ", or make f more contractive (a smaller step size, spectral normalisation; "
        "implicitlayers.diagnostics.spectral_radius estimates how contractive it is)."
    )
    return text


def _advice(code: Status, solver: AbstractSolver) -> str:
    """The status's own message, with advice for the solver that ran."""
    if code == Status.MAX_ITER:
        return _max_iter_advice(solver)
    if code == Status.DIVERGED and not isinstance(solver, Picard):
        return (
            f"{code.message} If f couples the samples (batch statistics, a batch mean), "
            f"{type(solver).__name__}'s per-sample model of f is wrong and can diverge where "
            "Picard converges: try Picard (with a mixing below 1)."
        )
    return code.message


def _check_precision(result: SolverResult, solver: AbstractSolver, dtype: torch.dtype) -> None:
    """Warn when samples ran out of iterations with an ``rtol`` below what a half-precision
    state can resolve (the default ``rtol=1e-4`` is below bfloat16's epsilon)."""
    if dtype not in _LOW_PRECISION:
        return
    eps = torch.finfo(dtype).eps
    if solver.rtol >= eps:
        return
    ran_out = (result.status == int(Status.MAX_ITER)) | (result.status == int(Status.BREAKDOWN))
    unconverged = int(ran_out.sum())
    if not unconverged:
        return
    warn_at_caller(
        f"{unconverged}/{result.batch_size} samples used all max_iter={solver.max_iter} "
        f"evaluations with rtol={solver.rtol:g}, which is below the precision of their "
        f"{dtype} state (eps {eps:.2g}): unless the fixed point happens to be exactly "
        f"representable, the residual cannot reach it. Pass rtol >= {_round_up(eps)} for "
        f"{dtype} states (e.g. {type(solver).__name__}(rtol={_round_up(eps)})), or solve in "
        "a wider dtype.",
        ConvergenceWarning,
    )


def _round_up(eps: float) -> str:
    """``eps`` rounded up to one significant digit, for a message."""
    exponent = math.floor(math.log10(eps))
    return f"{math.ceil(eps / 10**exponent) * 10**exponent:.0e}"
