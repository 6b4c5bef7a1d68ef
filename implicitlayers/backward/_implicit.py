"""Exact implicit differentiation through a matrix-free adjoint solve."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._result import SolverResult, Status
from ..solvers import AbstractSolver, Anderson
from ._base import VJP, AbstractBackward

__all__ = ["ImplicitDifferentiation"]


def _default_adjoint_solver() -> AbstractSolver:
    return Anderson(max_iter=50, rtol=1e-5)


@dataclass(frozen=True, kw_only=True, repr=False)
class ImplicitDifferentiation(AbstractBackward):
    r"""The exact gradient of the fixed point, by the implicit function theorem.

    Solves the adjoint fixed-point equation matrix-free, with vector-Jacobian products only,

    .. math::

        u = J^\top u + g \quad\Longleftrightarrow\quad u = (I - J^\top)^{-1} g,

    using any solver object with its own tolerance and budget (separate from the forward
    solve's). The solve's :class:`~implicitlayers.SolverResult` is passed to the DEQ, which
    keeps it as ``DEQ.last_backward_result``.

    Args:
        solver: The solver for the adjoint equation.
        fallback_to_jfb: Samples whose adjoint solve failed (status ``NONFINITE``,
            ``DIVERGED`` or ``BREAKDOWN``) use the JFB vector :math:`u = g` instead of raising;
            samples that only reached ``max_iter`` keep their best iterate. With ``False`` the
            adjoint solver's own policies apply.

    Example:
        >>> import implicitlayers as il
        >>> il.ImplicitDifferentiation(solver=il.Broyden(max_iter=30, rtol=1e-6))
        ImplicitDifferentiation(solver=Broyden(max_iter=30, rtol=1e-06))
    """

    solver: AbstractSolver = field(default_factory=_default_adjoint_solver)
    fallback_to_jfb: bool = True

    def __post_init__(self) -> None:
        from .._lookup import as_solver

        object.__setattr__(self, "solver", as_solver(self.solver, "solver"))
        if not isinstance(self.fallback_to_jfb, bool):
            raise TypeError(f"fallback_to_jfb must be a bool, got {self.fallback_to_jfb!r}")

    @property
    def exact(self) -> bool:
        return True

    def adjoint(self, vjp: VJP, grad: Tensor) -> tuple[Tensor, SolverResult | None]:
        from .._fixed_point import fixed_point

        solver = self.solver
        if self.fallback_to_jfb:
            solver = dataclasses.replace(solver, on_nonfinite="ignore")
        result = fixed_point(lambda u: vjp(u) + grad, grad, solver=solver)
        u: Tensor = result.z
        if self.fallback_to_jfb:
            failed = (result.status != int(Status.SUCCESS)) & (
                result.status != int(Status.MAX_ITER)
            )
            u = torch.where(failed[:, None], grad, u)
        return u, result
