"""The interface every linear solver implements."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .._repr import compact_repr
from .._result import SolverResult
from .._validate import check_budget

__all__ = ["AbstractLinearSolver", "MatVec"]

#: A batch of linear operators applied matrix-free: maps flat ``(B, n)`` to ``(B, n)``, row
#: ``b`` of the output being sample ``b``'s operator :math:`A_b` applied to row ``b`` of the
#: input. For the adjoint equation of implicit differentiation it is
#: ``u -> u - vjp(u)``, that is :math:`u \mapsto (I - J^\top) u`.
MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True, kw_only=True, repr=False)
class AbstractLinearSolver(abc.ABC):
    r"""Base class of the batched, matrix-free linear solvers.

    A linear solver solves :math:`A_b x_b = r_b` for every sample :math:`b` of a batch, given
    only products :math:`v \mapsto A_b v` (a :data:`MatVec`). A sample has converged when

    .. math::

        \|r_b - A_b x_b\| \le \mathrm{atol} + \mathrm{rtol}\, \|r_b\|,

    with norms over the flat non-batch dimension. :meth:`solve` only records what happened in
    its :class:`~implicitlayers.SolverResult`: it never warns or raises on a failed solve (the
    caller applies its policies), and it runs under the caller's grad mode (call it under
    :func:`torch.no_grad` unless you mean to differentiate through the iterations).

    Args:
        max_iter: Most operator applications (matvecs) per sample, every one counted,
            including those that only measure a true residual.
        atol: Absolute tolerance on the residual norm.
        rtol: Tolerance relative to :math:`\|r_b\|`, the norm of the right-hand side.
    """

    max_iter: int = 200
    atol: float = 1e-8
    rtol: float = 1e-6

    def __post_init__(self) -> None:
        check_budget(self.max_iter, self.atol, self.rtol, example_rtol="1e-6")

    def __repr__(self) -> str:
        return compact_repr(self)

    @abc.abstractmethod
    def solve(
        self, matvec: MatVec, rhs: Tensor, x0: Tensor | None = None, *, host_reads: bool = True
    ) -> SolverResult:
        r"""Solve :math:`A_b x_b = r_b` for every sample.

        Args:
            matvec: Applies the operators to a ``(B, n)`` batch, row by row.
            rhs: ``(B, n)`` right-hand sides :math:`r_b`.
            x0: ``(B, n)`` initial guesses; zeros when ``None``.
            host_reads: ``True`` (default): stop as soon as every sample has stopped, which
                reads per-sample flags on the host. ``False``: read nothing on the host (for
                ``torch.func`` transforms, whose batched tensors cannot be read, and for CUDA
                graphs): every sample gets exactly ``max_iter`` matrix-vector products, those
                that stopped masked, with the same results.

        Returns:
            A :class:`~implicitlayers.SolverResult` with the ``(B, n)`` solution ``z``, per-sample
            ``status``, ``converged``, ``n_steps`` (matvecs each sample received) and the true
            ``residual`` :math:`\|r_b - A_b x_b\|` at the returned ``z``, ``n_f_evals``
            (calls of ``matvec``) and ``linear=True`` (so that its summary words the statuses
            for a linear system).
        """
