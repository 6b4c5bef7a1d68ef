"""``fixed_point``: the functional core, no autograd."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _tree
from ._autocast import AutocastSplit
from ._errors import ConvergenceError, ConvergenceWarning
from ._result import SolverResult, Status
from ._warn import warn_at_caller
from .solvers import AbstractSolver
from .solvers._loop import run_loop
from .solvers._names import as_solver

__all__ = ["FlatMap", "fixed_point", "solve"]

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
        f: Callable ``f(z, *inputs)`` returning a state with the structure of ``z``.
        z0: Initial state: a tensor of shape ``(B, *S)`` or a tuple/list/dict of such tensors
            sharing ``B``, dtype and device.
        *inputs: Extra arguments passed to ``f`` unchanged.
        solver: A solver object (:class:`~implicitlayers.Picard`,
            :class:`~implicitlayers.Anderson`, :class:`~implicitlayers.Broyden`, or your own
            :class:`~implicitlayers.solvers.AbstractSolver`) or one of their names.
        independent_samples: Evaluate ``f`` only on the samples still running, so a batch costs
            the sum of its samples' iterations rather than batch size times the slowest. Valid
            only when ``f`` treats samples independently (no batch norm in training mode) and
            every tensor input whose leading dimension equals ``B`` is batched along it.
            The solve then also stops as soon as the last sample stops (``check_every`` does
            not apply: it counts the running samples every iteration anyway).
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
        ValueError: When ``f`` returns a state whose structure differs from ``z0``'s.

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
    return solve(
        f,
        z0,
        inputs,
        solver=solver,
        independent_samples=independent_samples,
        states=states,
        host_reads=host_reads,
    )[0]


def solve(
    f: Callable[..., Any],
    z0: Any,
    inputs: tuple[Any, ...],
    *,
    solver: AbstractSolver | str,
    independent_samples: bool,
    states: Sequence[int],
    host_reads: bool | None,
    has_aux: bool = False,
) -> tuple[SolverResult, FlatMap]:
    """:func:`fixed_point`, also returning the :class:`FlatMap` it solved with, so that
    :class:`~implicitlayers.DEQ` attaches the solution through the same map
    (:meth:`FlatMap.for_attach`). With ``has_aux``, ``f`` returns ``(z_next, aux)``."""
    solver = as_solver(solver)
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, *inputs), got {type(f).__name__}")
    if not isinstance(independent_samples, bool):
        raise TypeError(f"independent_samples must be a bool, got {independent_samples!r}")
    if host_reads is not None and not isinstance(host_reads, bool):
        raise TypeError(f"host_reads must be None, True or False, got {host_reads!r}")
    record_at = _check_states(states)
    spec = _tree.spec_of(z0)
    parts = _tree.leaves(z0)
    batch = _tree.batch_size(parts)
    _check_leaves(parts)
    out_dtype = parts[0].dtype
    _check_precision(solver, out_dtype)
    work_dtype = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
    amp = AutocastSplit(parts[0].device.type)
    f_flat = FlatMap(f, spec, inputs, batch=batch, dtype=out_dtype, amp=amp, has_aux=has_aux)
    with torch.no_grad(), amp.bookkeeping():
        flat0 = _tree.flatten(z0).to(work_dtype)
        if batch == 0:
            empty = torch.zeros(0, dtype=torch.long, device=flat0.device)
            empty_result = SolverResult(
                z=_tree.unflatten(flat0.to(out_dtype), spec),
                status=empty,
                converged=empty.bool(),
                n_steps=empty,
                residual=flat0.new_zeros(0),
                n_f_evals=0,
                states=tuple(_tree.unflatten(flat0.to(out_dtype), spec) for _ in record_at),
            )
            return empty_result, f_flat
        out = run_loop(
            f_flat,
            flat0,
            solver,
            independent_samples=independent_samples,
            host_reads=host_reads,
            record_at=record_at,
        )
    result = SolverResult(
        z=_tree.unflatten(out.z.to(out_dtype), spec),
        status=out.status,
        converged=out.status == int(Status.SUCCESS),
        n_steps=out.n_steps,
        residual=out.residual,
        n_f_evals=out.n_f_evals,
        trace=out.trace,
        rate=out.rate,
        states=tuple(_tree.unflatten(state.to(out_dtype), spec) for state in out.states),
    )
    _apply_policies(result, solver)
    return result, f_flat


def _check_states(states: Sequence[int]) -> tuple[int, ...]:
    """``states`` as a tuple of iteration indices, each a non-negative int."""
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


def _check_precision(solver: AbstractSolver, dtype: torch.dtype) -> None:
    """Warn when ``rtol`` asks for more than a half-precision ``dtype`` can resolve (the solve
    would run to ``max_iter``); the default ``rtol=1e-4`` is below bfloat16's epsilon."""
    if dtype not in _LOW_PRECISION:
        return
    eps = torch.finfo(dtype).eps
    if solver.rtol < eps:
        warn_at_caller(
            f"rtol={solver.rtol:g} is below the precision of {dtype} (eps {eps:.2g}): unless "
            "the fixed point happens to be exactly representable, the residual cannot reach "
            "it and samples run to max_iter. Pass rtol >= "
            f"{_round_up(eps)} for {dtype} states (e.g. {type(solver).__name__}"
            f"(rtol={_round_up(eps)})), or solve in a wider dtype.",
            ConvergenceWarning,
        )


def _round_up(eps: float) -> str:
    """``eps`` rounded up to one significant digit, for a message."""
    exponent = math.floor(math.log10(eps))
    return f"{math.ceil(eps / 10**exponent) * 10**exponent:.0e}"


def _check_leaves(parts: list[Tensor]) -> None:
    first = parts[0]
    for p in parts:
        if not p.is_floating_point():
            raise TypeError(
                f"z0 must hold floating-point tensors, got dtype {p.dtype}; "
                "pass z0 as float32 or float64"
            )
        if p.dtype != first.dtype or p.device != first.device:
            raise ValueError(
                "every tensor of z0 must share dtype and device, got "
                f"{first.dtype} on {first.device} and {p.dtype} on {p.device}"
            )


class FlatMap:
    """``f`` on flat ``(b, n)`` iterates: the one wrapper the solve and the attach call.

    Rebuilds ``z0``'s structure from a flat iterate (in ``z0``'s dtype; a single-tensor state
    costs no operation when it is already flat, one reshape otherwise), calls
    ``f(z, *inputs)``, drops the auxiliary output when ``has_aux``, checks the structure and
    the batch of what ``f`` returned and flattens it. ``f`` is called once per iteration, so
    the wrapper adds no tensor operation it can avoid.

    The solve calls it as ``f_flat(z, idx)``, ``idx`` selecting the samples the rows of ``z``
    belong to (``None``: all, in order), with ``f`` under the caller's autocast and the
    bookkeeping outside it (``amp``). The backward rule attaches the solution through
    :meth:`for_attach`'s map, called as ``f_flat(z)``.
    """

    def __init__(
        self,
        f: Callable[..., Any],
        spec: _tree.TreeSpec,
        inputs: tuple[Any, ...],
        *,
        batch: int,
        dtype: torch.dtype,
        amp: AutocastSplit | None = None,
        has_aux: bool = False,
    ) -> None:
        self.f = f
        self.spec = spec
        self.inputs = inputs
        self.batch = batch
        self.dtype = dtype
        self.amp = amp if amp is not None and amp.enabled else None
        self.has_aux = has_aux
        #: With :meth:`for_attach`: the auxiliary output of the map's first call (the
        #: attach's application of ``f``; later calls are the backward rule's), else ``None``.
        self.aux: Any = None
        self._keeps_aux = False
        # Of a single-tensor state: its per-sample shape, and whether it is flat already.
        self._shape = spec.shape if spec.kind == "tensor" else None
        self._is_flat = self._shape is not None and len(self._shape) == 1

    def for_attach(self, inputs: tuple[Any, ...]) -> FlatMap:
        """The same map on ``inputs`` for the differentiable application that attaches the
        solution: ``f`` runs under whatever autocast the caller has (no split: there is no
        bookkeeping), and with ``has_aux`` the map keeps the auxiliary output of its first
        call in :attr:`aux`."""
        attach = FlatMap(
            self.f, self.spec, inputs, batch=self.batch, dtype=self.dtype, has_aux=self.has_aux
        )
        attach._keeps_aux = self.has_aux
        return attach

    def __call__(self, z: Tensor, idx: Tensor | None = None) -> Tensor:
        inputs = self.inputs
        args = inputs if idx is None else tuple(_select(x, idx, self.batch) for x in inputs)
        if z.dtype != self.dtype:
            z = z.to(self.dtype)
        shape = self._shape
        if shape is None:
            state = _tree.unflatten(z, self.spec)
        else:
            state = z if self._is_flat else z.reshape(z.shape[0], *shape)
        if self.amp is None:  # the common case, without a context manager's cost on every call
            out = self.f(state, *args)
        else:
            with self.amp.user():
                out = self.f(state, *args)
        if self.has_aux:
            out, aux = split_aux(out)
            if self._keeps_aux:
                self.aux, self._keeps_aux = aux, False
        if shape is None:
            check_structure(out, self.spec)
            flat: Tensor = _tree.flatten(out)
        else:
            if not isinstance(out, Tensor) or out.shape[1:] != shape:
                check_structure(out, self.spec)  # raises, naming both structures
            flat = out if out.dim() == 2 else out.reshape(out.shape[0], -1)
        if flat.shape[0] != z.shape[0]:
            _batch_error(flat.shape[0], z.shape[0])
        return flat


def split_aux(out: Any) -> tuple[Any, Any]:
    """``(z_next, aux)`` from the output of an ``f`` built for ``DEQ(f, has_aux=True)``."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(
            "DEQ(f, has_aux=True) needs f to return a pair (z_next, aux), got "
            f"{type(out).__name__}; return (z_next, aux) or pass has_aux=False"
        )
    return out[0], out[1]


def _batch_error(got: int, expected: int) -> None:
    """Raise for an ``f`` whose output has another batch size than its input (broadcasting
    would otherwise give every sample one sample's answer)."""
    raise ValueError(
        f"f returned a batch of {got} samples for a state of {expected}; f must keep the "
        "batch dimension (one output row per input row)"
    )


def check_structure(out: Any, spec: _tree.TreeSpec) -> None:
    """Raise a ``ValueError`` naming both structures when ``f``'s output does not match ``z0``."""
    hint = ""
    if spec.kind == "tensor" and isinstance(out, tuple) and len(out) == 2:
        hint = " If f returns (z_next, aux), construct the DEQ with has_aux=True."
    try:
        out_spec = _tree.spec_of(out)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"f returned {type(out).__name__}, expected {spec.describe()}.{hint}"
        ) from err
    if out_spec != spec:
        raise ValueError(
            f"f(z, *inputs) returned shape {out_spec.describe()} but z0 has shape "
            f"{spec.describe()}; a fixed point needs f to map z to the same shape. Pass z0 "
            "with the shape of f's output (DEQ(...)(x, z0=...), fixed_point(f, z0, x))." + hint
        )


def _select(x: Any, idx: Tensor, batch: int) -> Any:
    if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch:
        return x[idx]
    return x


def _apply_policies(result: SolverResult, solver: AbstractSolver) -> None:
    status = result.status
    if logger.isEnabledFor(logging.DEBUG):  # the summary reads the statuses on the host
        logger.debug("fixed_point: %s", result.summary())
    nonfinite = status == int(Status.NONFINITE)
    failed = (status != int(Status.SUCCESS)) & ~nonfinite
    for mask, policy in ((nonfinite, solver.on_nonfinite), (failed, solver.on_unconverged)):
        if policy == "ignore" or not bool(mask.any()):
            continue
        message = _describe_failure(result, mask, type(solver).__name__)
        if policy == "raise":
            raise ConvergenceError(message, result)
        warn_at_caller(message, ConvergenceWarning)


def _describe_failure(result: SolverResult, mask: Tensor, solver_name: str) -> str:
    idx = mask.nonzero().squeeze(1).tolist()
    shown = ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")
    codes = sorted({int(s) for s in result.status[mask].tolist()})
    reasons = " ".join(f"{Status(c).name}: {Status(c).message}" for c in codes)
    return (
        f"{solver_name} stopped {len(idx)}/{result.batch_size} samples without converging "
        f"(samples {shown}). {reasons}"
    )
