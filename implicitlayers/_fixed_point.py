"""``fixed_point``: the functional core, no autograd."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._cache import FixedPointCache
from ._flat import flatten_state
from ._result import SolverResult
from ._solve import check_flags, record_at, result_of
from ._solve_op import Request, solve_op
from .solvers import AbstractSolver
from .solvers._names import as_solver

__all__ = ["fixed_point"]


def fixed_point(
    f: Callable[..., Any],
    z0: Any,
    *inputs: Any,
    solver: AbstractSolver | str = "anderson",
    independent_samples: bool = False,
    states: Sequence[int] = (),
    host_reads: bool | None = None,
    cache: FixedPointCache | None = None,
    keys: Any = None,
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
        cache: A :class:`~implicitlayers.FixedPointCache`, with ``keys``: samples whose key it
            holds start from their stored state (``z0`` is then the default for the others;
            the check costs two evaluations of ``f``), and the solutions are stored.
        keys: One key per sample, for ``cache``.

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
    if (cache is None) != (keys is None):
        raise ValueError(
            "cache and keys go together: pass both (cache=FixedPointCache(...), keys=one key "
            f"per sample) or neither; got cache={cache!r}, keys={'None' if keys is None else '...'}"
        )
    request = Request(f_flat, solver, independent_samples, host_reads, recorded)
    with torch.no_grad():
        if cache is not None:
            flat0 = cache.start(f_flat, flat0, keys)[0]
        out = solve_op(request, flat0)
        if cache is not None:
            cache.finish(keys, out.z, out.status)
    return result_of(out, f_flat)
