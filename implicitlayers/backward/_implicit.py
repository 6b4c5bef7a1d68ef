"""Exact implicit differentiation through a matrix-free adjoint solve."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from .._errors import ConvergenceError, ConvergenceWarning
from .._fixed_point import fixed_point
from .._lookup import lookup
from .._repr import compact_repr
from .._result import SolverResult, Status
from .._validate import Policy, check_choice
from .._warn import warn_at_caller
from ..linear import GMRES, AbstractLinearSolver
from ..solvers import AbstractSolver
from ..solvers._names import SOLVERS
from ._base import VJP, AbstractBackward
from ._functions import functorch_active, host_readable

__all__ = ["ImplicitDifferentiation"]


#: The default adjoint solver (a frozen dataclass: one shared value is safe).
DEFAULT_ADJOINT_SOLVER = GMRES(max_iter=200, rtol=1e-6, atol=1e-10, restart=20)


def _default_adjoint_solver() -> AbstractLinearSolver:
    return DEFAULT_ADJOINT_SOLVER


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

    solver: AbstractSolver | AbstractLinearSolver = DEFAULT_ADJOINT_SOLVER
    fallback_to_jfb: bool = True
    on_unconverged: Policy = "warn"

    def __repr__(self) -> str:
        # The adjoint solver is named even when it is the default: the rule's cost and
        # accuracy are its.
        shown = compact_repr(self)
        if self.solver == DEFAULT_ADJOINT_SOLVER:
            inner = shown[len("ImplicitDifferentiation(") : -1]
            shown = f"ImplicitDifferentiation(solver={self.solver!r}" + (
                f", {inner})" if inner else ")"
            )
        return shown

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

    def tangent(self, jvp: VJP, fz_tangent: Tensor) -> tuple[Tensor, SolverResult | None]:
        r"""Forward mode: :math:`\dot z` solves :math:`(I - J)\, \dot z = \dot f` (or
        :math:`\dot z = J \dot z + \dot f` with a fixed-point solver), with Jacobian-vector
        products, by the same solver as the adjoint (GMRES needs no transpose)."""
        return self._solve(jvp, fz_tangent)

    def adjoint(self, vjp: VJP, grad: Tensor) -> tuple[Tensor, SolverResult | None]:
        return self._solve(vjp, grad)

    def _solve(self, product: VJP, grad: Tensor) -> tuple[Tensor, SolverResult | None]:
        """Solve :math:`v = A v + g` for the Jacobian product :math:`A` (``product``: the
        transposed Jacobian for the adjoint, the Jacobian for the tangent).

        Under a ``torch.func`` transform the solve reads nothing on the host (its tensors may
        be batched): the whole budget runs, with stopped samples masked.
        """
        solver = self.solver
        sync_free = not host_readable(grad)
        functorch = functorch_active()
        if sync_free and not functorch:
            raise RuntimeError(
                f"{self!r} cannot solve under autograd's own batched gradients "
                "(torch.autograd.grad(..., is_grads_batched=True), "
                "torch.autograd.functional.jacobian(..., vectorize=True)): that vmap lacks "
                "batching rules its solve needs. torch.func.jacrev, or torch.func.vmap over "
                "torch.func.vjp, give the same batched gradients exactly; or pass "
                "vectorize=False."
            )
        try:
            return self._solve_with(solver, product, grad, sync_free)
        except RuntimeError as err:
            if not functorch:
                raise
            raise RuntimeError(
                f"{self!r}: its solve failed under a torch.func transform (the error above). "
                "A second-order derivative under torch.func (torch.func.hessian, "
                "jacfwd(jacrev(...)), jacrev(jacrev(...)), a jvp or vjp of a gradient) is not "
                "supported through ImplicitDifferentiation: exact second derivatives are "
                "computed by plain autograd, torch.autograd.grad(..., create_graph=True) or "
                "torch.autograd.functional.hessian. First derivatives work under every "
                "torch.func transform."
            ) from err

    def _solve_with(
        self,
        solver: AbstractSolver | AbstractLinearSolver,
        product: VJP,
        grad: Tensor,
        sync_free: bool,
    ) -> tuple[Tensor, SolverResult | None]:
        """:meth:`_solve` with ``solver``, with or without host reads."""
        if isinstance(solver, AbstractLinearSolver):
            # Half-precision gradients (autocast, bfloat16 states) are solved in float32, as
            # the forward's bookkeeping is; the products go back in the gradient's dtype.
            work = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype

            def matvec(u: Tensor) -> Tensor:
                return u - product(u.to(grad.dtype)).to(work)

            with torch.no_grad():
                result = solver.solve(matvec, grad.to(work), host_reads=not sync_free)
            result = dataclasses.replace(result, z=result.z.to(grad.dtype))
        else:
            quiet = dataclasses.replace(solver, on_unconverged="ignore", on_nonfinite="ignore")
            if sync_free:  # one chunk of the whole budget: no host read at all
                quiet = dataclasses.replace(quiet, check_every=quiet.max_iter)
            result = fixed_point(
                lambda u: product(u) + grad, grad, solver=quiet, host_reads=not sync_free
            )
        u: Tensor = result.z
        if self.fallback_to_jfb:
            status = result.status
            failed = (
                (status == int(Status.NONFINITE))
                | (status == int(Status.DIVERGED))
                | (status == int(Status.BREAKDOWN))
            )
            u = torch.where(failed[:, None], grad, u)
        if not sync_free:  # (the statuses of a batched solve cannot be read)
            self._report(result)
        return u, result

    def _report(self, result: SolverResult) -> None:
        if self.on_unconverged == "ignore" or bool(result.converged.all()):
            return
        codes = sorted({int(c) for c in result.status[~result.converged].tolist()})
        linear = isinstance(self.solver, AbstractLinearSolver)
        reasons = " ".join(
            f"{Status(c).name}: {Status(c).linear_message if linear else Status(c).message}"
            for c in codes
        )
        if not linear:
            reasons += (
                " On the adjoint equation u = J^T u + g a fixed-point solver needs "
                "rho(J) < 1 (implicitlayers.diagnostics.spectral_radius estimates it); GMRES "
                "(solver='gmres') needs only I - J^T invertible."
            )
        # No counts in the text: Python's default filter shows one warning per message.
        message = (
            f"{self!r}: the adjoint solve did not converge for some samples, so their "
            f"gradients are inexact (DEQ.last_backward_result holds the statuses). {reasons}"
        )
        if self.on_unconverged == "raise":
            raise ConvergenceError(message + "\n" + result.summary(), result)
        warn_at_caller(message, ConvergenceWarning)
