"""The interface every fixed-point solver implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .._repr import compact_repr
from .._validate import check_budget, check_choice, check_float, check_int

__all__ = ["AbstractSolver", "SolverState"]

#: A solver's memory between steps: tensors whose leading dimension is the batch, so the
#: driver loop can select, freeze and restore samples without knowing the algorithm.
SolverState = dict[str, Tensor]

Policy = Literal["ignore", "warn", "raise"]
_POLICIES = ("ignore", "warn", "raise")


@dataclass(frozen=True, kw_only=True, repr=False)
class AbstractSolver(abc.ABC):
    r"""Base class of the fixed-point solvers.

    A solver only proposes the next iterate; the shared driver loop
    (:func:`~implicitlayers.fixed_point`) evaluates ``f``, measures residuals, freezes samples
    that have converged, keeps the best iterate, records traces and applies the policies. A
    sample has converged when

    .. math::

        \|f(z) - z\| \le \mathrm{atol} + \mathrm{rtol}\, \|f(z)\|,

    with norms over all non-batch dimensions.

    To write your own solver, subclass this (as a frozen keyword-only dataclass if it has
    hyperparameters) and implement :meth:`init` and :meth:`step` on flat ``(B, n)`` iterates.

    Args:
        max_iter: Most evaluations of ``f`` per sample.
        atol: Absolute tolerance on the residual norm.
        rtol: Tolerance relative to :math:`\|f(z)\|`.
        on_max_iter: What to do when samples end without converging (status ``MAX_ITER``,
            ``DIVERGED`` or ``BREAKDOWN``): ``"ignore"`` (only recorded in the result),
            ``"warn"`` (:class:`~implicitlayers.ConvergenceWarning`) or ``"raise"``
            (:class:`~implicitlayers.ConvergenceError`).
        on_nonfinite: The same choice for samples where ``f`` returned NaN or Inf.
        divergence_ratio: A sample is stopped as ``DIVERGED`` once its residual exceeds this
            multiple of its first residual; ``None`` disables the check.
        check_every: Check whether every sample has stopped (a host synchronisation on CUDA)
            only every this many iterations. Per-sample freezing stays exact; at most
            ``check_every - 1`` evaluations are spent after the last sample converged.
        trace: Record every iteration's residuals in ``SolverResult.trace``.
    """

    max_iter: int = 50
    atol: float = 1e-6
    rtol: float = 1e-4
    on_max_iter: Policy = "ignore"
    on_nonfinite: Policy = "raise"
    divergence_ratio: float | None = 1e4
    check_every: int = 1
    trace: bool = False

    def __post_init__(self) -> None:
        check_budget(self.max_iter, self.atol, self.rtol)
        check_choice("on_max_iter", self.on_max_iter, _POLICIES)
        check_choice("on_nonfinite", self.on_nonfinite, _POLICIES)
        if self.divergence_ratio is not None:
            check_float("divergence_ratio", self.divergence_ratio, low=1.0, low_open=True)
        check_int("check_every", self.check_every, minimum=1)
        if not isinstance(self.trace, bool):
            raise TypeError(f"trace must be a bool, got {self.trace!r}")

    def __repr__(self) -> str:
        return compact_repr(self)

    @abc.abstractmethod
    def init(self, z: Tensor) -> SolverState:
        """Create the solver's memory for the flat initial iterate ``z`` of shape ``(B, n)``.

        Every tensor in the returned dict must have the batch as its leading dimension.
        """

    @abc.abstractmethod
    def step(
        self, state: SolverState, z: Tensor, fz: Tensor
    ) -> tuple[Tensor, SolverState, Tensor | None]:
        """Propose the next iterate.

        The driver loop calls this once per iteration, so on a small ``f`` every tensor
        operation here is a visible share of the solve (and a kernel launch on a GPU): keep
        them few, and read nothing on the host (no ``.item()``, ``bool(tensor)``,
        ``.tolist()``), so that a chunk of ``check_every`` iterations runs without a
        synchronisation and can be compiled as one graph.

        Args:
            state: The memory returned by :meth:`init` or the previous :meth:`step`.
            z: ``(B, n)`` current iterate.
            fz: ``(B, n)`` value of ``f(z)``.

        Returns:
            ``(z_next, state, breakdown)``: the next iterate, the updated memory, and a
            ``(B,)`` bool tensor marking samples whose internal system broke down this step
            (their memory should already be restarted), or ``None`` for a solver that has no
            internal system to break down.
        """

    def step_at(
        self, iteration: int, state: SolverState, z: Tensor, fz: Tensor
    ) -> tuple[Tensor, SolverState, Tensor | None]:
        """:meth:`step`, told how many steps the driver loop has taken before this one.

        The driver loop calls this; the default ignores ``iteration``. A solver whose memory
        fills at most one slot per step can override it to skip the unfilled slots without
        reading its state on the host (a synchronisation on CUDA).

        Args:
            iteration: Steps taken before this one (``0`` for the first); no sample has taken
                more.
            state: As in :meth:`step`.
            z: As in :meth:`step`.
            fz: As in :meth:`step`.
        """
        return self.step(state, z, fz)


#: Up to this many features per sample, a batched product with the history is faster on the
#: CPU as a broadcast product and a sum (the batched matrix product has a slow path there);
#: above, the matrix product wins (2-3x at 10^4 features) and allocates no temporary.
_SMALL = 64


def dots(W: Tensor, x: Tensor) -> Tensor:
    """``(B, k)`` products :math:`w_i^\\top x` of the ``k`` rows of each ``W[b]`` with ``x[b]``."""
    # As a row vector times W^T: several times faster on CPU than W times a column vector.
    out: Tensor = torch.bmm(x[:, None, :], W.transpose(1, 2)).squeeze(1)
    return out


def combine(coeff: Tensor, W: Tensor) -> Tensor:
    """``(B, n)`` combinations :math:`\\sum_i c_i w_i` of the rows of each ``W[b]``."""
    if W.shape[2] <= _SMALL:
        return (coeff[:, :, None] * W).sum(dim=1)
    out: Tensor = torch.bmm(coeff[:, None, :], W).squeeze(1)
    return out
