"""The solve behind :func:`~implicitlayers.fixed_point` and :class:`~implicitlayers.DEQ`:
the driver loop on the flat state, the result, and the policies with their messages."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._errors import ConvergenceError, ConvergenceWarning
from ._flat import FlatMap
from ._result import SolverResult, Status
from ._warn import warn_at_caller
from .solvers import AbstractSolver, Broyden, Picard
from .solvers._loop import LoopOutput, run_loop

__all__ = ["apply_policies", "check_flags", "record_at", "result_of", "solve"]

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def solve(
    f_flat: FlatMap,
    flat0: Tensor,
    solver: AbstractSolver,
    *,
    independent_samples: bool,
    host_reads: bool | None,
    record_at: tuple[int, ...],
    keep_state: bool = False,
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
            keep_state=keep_state,
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


def apply_policies(out: LoopOutput, f_flat: FlatMap, solver: AbstractSolver) -> None:
    """Warn or raise for the samples that did not converge, as the solver's policies say (the
    result is built, the solution unflattened, only for an error that carries it)."""
    status = out.status
    if logger.isEnabledFor(logging.DEBUG):  # the summary reads the statuses on the host
        logger.debug("fixed_point: %s", result_of(out, f_flat).summary())
    _check_precision(status, solver, *_working_precision(f_flat.dtype, out.z))
    nonfinite = status == int(Status.NONFINITE)
    failed = (status != int(Status.SUCCESS)) & ~nonfinite
    for mask, policy in ((nonfinite, solver.on_nonfinite), (failed, solver.on_unconverged)):
        if policy == "ignore" or not bool(mask.any()):
            continue
        message = describe_failure(status, mask, solver)
        if policy == "raise":
            raise ConvergenceError(message, result_of(out, f_flat))
        warn_at_caller(message, ConvergenceWarning)


def describe_failure(status: Tensor, mask: Tensor, solver: AbstractSolver) -> str:
    """What happened to the samples in ``mask`` and what to try, each status's advice suited
    to the solver that ran."""
    name = type(solver).__name__
    idx = mask.nonzero().squeeze(1).tolist()
    shown = ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")
    codes = sorted({int(s) for s in status[mask].tolist()})
    reasons = " ".join(f"{Status(c).name}: {_advice(Status(c), solver)}" for c in codes)
    return (
        f"{name} stopped {len(idx)}/{status.shape[0]} samples without converging "
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
    if code == Status.BREAKDOWN and isinstance(solver, Broyden):
        return (
            "Broyden's rank-one update was singular and its memory restarted, and the sample "
            "did not reach the tolerance after it. Lower history_size, raise max_iter, or use "
            "Anderson or Picard."
        )
    return code.message


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs ``f``'s matmuls and convolutions in on ``device_type``, or
    ``None`` outside autocast (the per-device API is torch >= 2.4's; older torch has the
    CPU and CUDA functions)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except (TypeError, AttributeError):  # pragma: no cover - torch < 2.4
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def _working_precision(state_dtype: torch.dtype, z: Tensor) -> tuple[torch.dtype, str]:
    """The narrowest dtype the residual passes through, and how to name it: the state's (``f``
    sees states in it), the iterates' (what ``f`` returned) or autocast's (``f``'s products)."""
    candidates = [(state_dtype, "state"), (z.dtype, "iterates")]
    autocast = _autocast_dtype(z.device.type)
    if autocast is not None:
        candidates.append((autocast, "autocast arithmetic in f"))
    return max(candidates, key=lambda c: torch.finfo(c[0]).eps)


def _check_precision(
    status: Tensor, solver: AbstractSolver, dtype: torch.dtype, where: str = "state"
) -> None:
    """Warn when samples ran out of iterations with an ``rtol`` below what a half-precision
    state (or iterates, or autocast's arithmetic inside ``f``) can resolve (the default
    ``rtol=1e-4`` is below bfloat16's epsilon)."""
    if dtype not in _LOW_PRECISION:
        return
    eps = torch.finfo(dtype).eps
    if solver.rtol >= eps:
        return
    ran_out = (status == int(Status.MAX_ITER)) | (status == int(Status.BREAKDOWN))
    unconverged = int(ran_out.sum())
    if not unconverged:
        return
    warn_at_caller(
        f"{unconverged}/{status.shape[0]} samples used all max_iter={solver.max_iter} "
        f"evaluations with rtol={solver.rtol:g}, which is below the precision of their "
        f"{dtype} {where} (eps {eps:.2g}): unless the fixed point happens to be exactly "
        f"representable, the residual cannot reach it. Pass rtol >= {_round_up(eps)} for "
        f"{dtype} (e.g. {type(solver).__name__}(rtol={_round_up(eps)})), or solve in "
        "a wider dtype.",
        ConvergenceWarning,
    )


def _round_up(eps: float) -> str:
    """``eps`` rounded up to one significant digit, for a message."""
    exponent = math.floor(math.log10(eps))
    return f"{math.ceil(eps / 10**exponent) * 10**exponent:.0e}"
