"""Exact implicit differentiation through a matrix-free adjoint solve."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .._errors import ConvergenceError, ConvergenceWarning
from .._fixed_point import fixed_point
from .._lookup import lookup
from .._result import SolverResult, Status
from .._validate import KeywordHint, check_choice
from .._warn import warn_at_caller
from ..linear import GMRES, AbstractLinearSolver
from ..solvers import AbstractSolver
from ..solvers._names import SOLVERS
from ._base import VJP, AbstractBackward

__all__ = ["ImplicitDifferentiation"]

Policy = Literal["ignore", "warn", "raise"]


def _default_adjoint_solver() -> AbstractLinearSolver:
    return GMRES(max_iter=200, rtol=1e-6, atol=1e-10, restart=20)


#: The names ``ImplicitDifferentiation(solver=...)`` accepts: the default linear solver and the
#: fixed-point solvers (read-only).
ADJOINT_SOLVERS: Mapping[str, Callable[[], AbstractSolver | AbstractLinearSolver]] = (
    MappingProxyType({"gmres": _default_adjoint_solver, **SOLVERS})
)


@dataclass(frozen=True, kw_only=True, repr=False)
class ImplicitDifferentiation(AbstractBackward):
    r"""The exact gradient of the fixed point, by the implicit function theorem.

    Solves the adjoint equation matrix-free, with vector-Jacobian products only,

    .. math::

        (I - J^\top)\, u = g \quad\Longleftrightarrow\quad u = J^\top u + g,

    either as a linear system with a Krylov solver (the default, :class:`~implicitlayers.GMRES`:
    it needs only :math:`I - J^\top` invertible) or as a fixed point with any fixed-point
    solver object (:class:`~implicitlayers.Picard` needs the spectral radius
    :math:`\rho(J) < 1` and slows down as it nears 1; :class:`~implicitlayers.Anderson` and
    :class:`~implicitlayers.Broyden` often converge beyond it, with a large enough history,
    but without a guarantee: see the ``adjoint`` benchmark). The solve has its own tolerance and
    budget, separate from the forward solve's; its :class:`~implicitlayers.SolverResult` is
    kept as ``DEQ.last_backward_result``.

    Second-order gradients (``create_graph=True``: gradient penalties, hypergradients) are
    exact: the adjoint equation is a fixed point too, and the rule attaches its solution the
    same way. They need every tensor ``f`` differentiates to be an input of the DEQ or a
    parameter of an ``nn.Module`` ``f``, and raise otherwise; third order raises.

    Args:
        solver: The adjoint solver: an :class:`~implicitlayers.linear.AbstractLinearSolver`
            (default ``GMRES(max_iter=200, rtol=1e-6, atol=1e-10, restart=20)``, also named
            ``"gmres"``) or an :class:`~implicitlayers.solvers.AbstractSolver`, or a name:
            ``"gmres"``, ``"picard"``, ``"anderson"``, ``"broyden"`` (each with its default
            configuration). The solver's own
            ``on_unconverged`` / ``on_nonfinite`` policies are not used: this rule's
            ``on_unconverged`` decides.
        fallback_to_jfb: Samples whose adjoint solve failed (status ``NONFINITE``,
            ``DIVERGED`` or ``BREAKDOWN``) use the JFB vector :math:`u = g`; samples that only
            reached ``max_iter`` keep their best iterate. With ``False`` every sample keeps
            the solver's best iterate.
        on_unconverged: When some samples' adjoint did not converge (their gradient is
            inexact): ``"warn"`` (a :class:`~implicitlayers.ConvergenceWarning`, shown once
            per rule and message by Python's default filter), ``"raise"``
            (:class:`~implicitlayers.ConvergenceError` from ``backward()``) or ``"ignore"``.

    Example:
        >>> import torch, implicitlayers as il
        >>> rule = il.ImplicitDifferentiation(solver=il.GMRES(rtol=1e-8))
        >>> W = torch.tensor([[0.0, 1.5], [-1.5, 0.0]])  # rho(J) = 1.5: Anderson diverges
        >>> x = torch.ones(1, 2, requires_grad=True)
        >>> deq = il.DEQ(lambda z, x: z @ W.T + x, solver=il.Broyden(rtol=1e-8), backward=rule)
        >>> z, _ = deq(x)
        >>> z.sum().backward()
        >>> exact = torch.linalg.solve(torch.eye(2) - W.T, torch.ones(2))
        >>> torch.allclose(x.grad[0], exact, atol=1e-5)
        True
    """

    solver: AbstractSolver | AbstractLinearSolver = field(default_factory=_default_adjoint_solver)
    fallback_to_jfb: bool = True
    on_unconverged: Policy = "warn"

    _renamed: ClassVar[Mapping[str, KeywordHint]] = {
        "on_max_iter": lambda value: (
            f"on_unconverged={value!r} (the same values; it covers every sample whose adjoint "
            "did not converge, as the solvers' on_unconverged covers the forward)"
        ),
    }

    def __post_init__(self) -> None:
        solver = lookup(
            self.solver, "solver", ADJOINT_SOLVERS, (AbstractLinearSolver, AbstractSolver)
        )
        object.__setattr__(self, "solver", solver)
        if not isinstance(self.fallback_to_jfb, bool):
            raise TypeError(f"fallback_to_jfb must be a bool, got {self.fallback_to_jfb!r}")
        check_choice("on_unconverged", self.on_unconverged, ("ignore", "warn", "raise"))

    @property
    def exact(self) -> bool:
        return True

    def adjoint(self, vjp: VJP, grad: Tensor) -> tuple[Tensor, SolverResult | None]:
        solver = self.solver
        if isinstance(solver, AbstractLinearSolver):
            # Half-precision gradients (autocast, bfloat16 states) are solved in float32, as
            # the forward's bookkeeping is; the products go back in the gradient's dtype.
            work = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype

            def matvec(u: Tensor) -> Tensor:
                return u - vjp(u.to(grad.dtype)).to(work)

            with torch.no_grad():
                result = solver.solve(matvec, grad.to(work))
            result = dataclasses.replace(result, z=result.z.to(grad.dtype))
        else:
            quiet = dataclasses.replace(solver, on_unconverged="ignore", on_nonfinite="ignore")
            result = fixed_point(lambda u: vjp(u) + grad, grad, solver=quiet)
        u: Tensor = result.z
        if self.fallback_to_jfb:
            failed = (result.status != int(Status.SUCCESS)) & (
                result.status != int(Status.MAX_ITER)
            )
            u = torch.where(failed[:, None], grad, u)
        self._report(result)
        return u, result

    def _report(self, result: SolverResult) -> None:
        if self.on_unconverged == "ignore" or bool(result.converged.all()):
            return
        if isinstance(self.solver, AbstractLinearSolver):
            advice = (
                "its residual ||g - (I - J^T) u|| stayed above atol + rtol * ||g||. Raise the "
                "adjoint solver's max_iter, or its restart if it has one (restarted GMRES can "
                "stagnate; a larger Krylov space per cycle helps), or loosen its rtol; an "
                "eigenvalue of J near 1 makes the system ill-conditioned "
                "(implicitlayers.diagnostics.spectral_radius estimates rho(J)): regularise f "
                "towards a contraction."
            )
        else:
            advice = (
                "its residual ||J^T u + g - u|| stayed above the tolerance. "
                "implicitlayers.diagnostics.spectral_radius tells whether rho(J) >= 1, where "
                "a fixed-point solver cannot converge. Give the adjoint solver a larger "
                "max_iter, use GMRES (solver='gmres': it needs only I - J^T invertible), or "
                "regularise f towards a contraction."
            )
        message = (
            f"{self!r}: the adjoint solve did not converge for some samples, so their "
            f"gradients are inexact (DEQ.last_backward_result holds the statuses): {advice} "
            "This warning is shown once per rule."
        )
        if self.on_unconverged == "raise":
            raise ConvergenceError(message + "\n" + result.summary(), result)
        warn_at_caller(message, ConvergenceWarning)
