r"""SHINE: the forward solver's inverse estimate as the implicit gradient's adjoint."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import ConvergenceError, ConvergenceWarning
from .._result import SolverResult, Status
from .._validate import Policy, check_choice, check_float
from .._warn import warn_at_caller
from ..linear import AbstractLinearSolver
from ..solvers._estimate import InverseEstimate
from ._base import JVP, VJP, AbstractBackward
from ._functions import _FirstOrderOnly, functorch_active, host_readable
from ._implicit import DEFAULT_ADJOINT_SOLVER

__all__ = ["SHINE", "SHINEResult"]

_SUCCESS, _MAX_ITER = int(Status.SUCCESS), int(Status.MAX_ITER)


@dataclass(frozen=True)
class SHINEResult(SolverResult):
    r"""What a :class:`~implicitlayers.SHINE` backward pass did, per sample
    (``DEQ.last_backward_result``).

    The fields of :class:`~implicitlayers.SolverResult` describe the returned :math:`u`:
    ``residual`` is its adjoint residual :math:`\|g - (I - J^\top) u\|`, measured (one VJP);
    ``status`` is ``SUCCESS`` where that is within the rule's tolerance (``max_residual``
    relative to :math:`\|g\|` for an accepted estimate, the solver's tolerance for a solved
    sample); ``n_steps`` counts each sample's VJPs and ``n_f_evals`` the calls of the VJP.

    Attributes:
        used_estimate: ``(B,)`` bool: :math:`u` is the estimate :math:`M^\top g` itself.
        fell_back: ``(B,)`` bool: the estimate was poor (or missing) and :math:`u` comes from
            the exact solve (with ``refine=True``: from the solve without the estimate).
        estimate_residual: ``(B,)`` the estimate's relative adjoint residual
            :math:`\|g - (I - J^\top) M^\top g\| / \|g\|` (NaN without an estimate).
    """

    used_estimate: Tensor | None = None
    fell_back: Tensor | None = None
    estimate_residual: Tensor | None = None


@dataclass(frozen=True, kw_only=True, repr=False)
class SHINE(AbstractBackward):
    r"""SHINE (Ramzi et al., 2022): the implicit gradient with the forward solver's estimate of
    the inverse Jacobian, which a quasi-Newton solve builds anyway and other rules throw away.

    :class:`~implicitlayers.Broyden` (and :class:`~implicitlayers.Anderson`, through its
    multisecant form) ends a solve holding a low-rank estimate
    :math:`M = I + \sum_i a_i b_i^\top \approx (I - J)^{-1}` at the fixed point
    (:class:`~implicitlayers.solvers.InverseEstimate`); :class:`~implicitlayers.DEQ` keeps it
    and hands it to this rule. The adjoint is then

    .. math::

        u = M^\top g \approx (I - J^\top)^{-1} g,

    at the cost of two passes over the stored pairs, no solve. Its quality is checked per
    sample by its residual in the adjoint equation, one VJP:

    .. math::

        \rho = \frac{\|g - (I - J^\top) u\|}{\|g\|} \le \texttt{max\_residual},

    and a sample above it (or without an estimate) falls back to the exact solve of
    :class:`~implicitlayers.ImplicitDifferentiation` (``solver``, from :math:`u` where that
    residual is below :math:`\|g\|`). With ``refine=True`` the estimate is not returned as it
    is but preconditions the exact solve: GMRES on :math:`(I - J^\top) M^\top y = g`,
    :math:`u = M^\top y`, which minimises the same true residual and converges in fewer VJPs
    when :math:`M` captures the slow directions. A sample whose estimate is worse than none
    (:math:`\rho \ge 1`) is solved without it, one the preconditioned solve broke down on
    goes on without it from where it got, and the whole costs at most the solver's
    ``max_iter`` VJPs and one. ``DEQ.last_backward_result`` reports per sample which way
    was taken and the measured residual (:class:`~implicitlayers.backward.SHINEResult`).

    Memory stays that of the forward solver's history (two ``(B, k, n)`` tensors), whatever
    the number of iterations. The estimate's quality depends on the forward solve: a solve
    that stopped after few steps (a warm start, a loose tolerance) holds few secant pairs, so
    more samples fall back; a restarted Broyden memory holds only the updates since. Forward
    mode uses :math:`\dot z = M \dot f` with the same check through a JVP. Second-order
    gradients (``create_graph=True``) differentiate :math:`M^\top g` with :math:`M` held; a
    sample that fell back has none (the rule raises rather than drop it). With
    ``refine=True`` they are exact, as :class:`~implicitlayers.ImplicitDifferentiation`'s.

    Args:
        refine: ``False``: the estimate is the adjoint (mode (a) of the paper, the cheapest).
            ``True``: refine it to the solver's tolerance (the exact gradient, fewer VJPs
            than an unpreconditioned solve when the estimate is good).
        max_residual: The largest relative adjoint residual :math:`\rho` an estimate may have
            to be used as it is (``refine=False``).
        solver: The linear solver of the exact solve (fallback and refinement); default that
            of :class:`~implicitlayers.ImplicitDifferentiation`,
            ``GMRES(max_iter=200, rtol=1e-6, atol=1e-10, restart=20)``.
        on_unconverged: When that solve did not converge for some samples: ``"warn"``,
            ``"raise"`` or ``"ignore"``, as :class:`~implicitlayers.ImplicitDifferentiation`.

    Example:
        >>> import torch, implicitlayers as il
        >>> W = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64)
        >>> x = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
        >>> deq = il.DEQ(lambda z, x: z @ W.T + x, solver=il.Broyden(rtol=1e-12),
        ...              backward=il.SHINE())
        >>> z, _ = deq(x)
        >>> z.sum().backward()  # Broyden's two steps ran along both axes: its estimate is exact
        >>> exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - W.T,
        ...                            torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(x.grad[0], exact, atol=1e-12)
        True
        >>> report = deq.last_backward_result
        >>> report.used_estimate.tolist(), report.n_f_evals  # one VJP: the check
        ([True], 1)

    References:
        Z. Ramzi, F. Mannel, S. Bai, J.-L. Starck, P. Ciuciu and T. Moreau. *SHINE: SHaring the
        INverse Estimate from the forward pass for bi-level optimization and implicit
        models.* ICLR 2022.
    """

    refine: bool = False
    max_residual: float = 0.1
    solver: AbstractLinearSolver = DEFAULT_ADJOINT_SOLVER
    on_unconverged: Policy = "warn"

    def __post_init__(self) -> None:
        if not isinstance(self.refine, bool):
            raise TypeError(f"refine must be a bool, got {self.refine!r}")
        check_float("max_residual", self.max_residual, low=0.0, low_open=True)
        if not isinstance(self.solver, AbstractLinearSolver):
            raise TypeError(
                f"solver must be a linear solver (an AbstractLinearSolver, e.g. "
                f"implicitlayers.GMRES()), got {self.solver!r}: SHINE's exact solve is the "
                "linear adjoint system (I - J^T) u = g"
            )
        check_choice("on_unconverged", self.on_unconverged, ("ignore", "warn", "raise"))

    @property
    def uses_estimate(self) -> bool:
        return True

    @property
    def exact(self) -> bool:
        """With ``refine=True`` the adjoint is solved to the solver's tolerance: exact, and so
        are its second derivatives (as :class:`~implicitlayers.ImplicitDifferentiation`'s)."""
        return self.refine

    @property
    def estimate(self) -> InverseEstimate | None:
        """The estimate this rule holds (set by ``with_estimate``), else ``None``."""
        held: InverseEstimate | None = self.__dict__.get("_estimate")
        return held

    def with_estimate(self, estimate: InverseEstimate | None) -> SHINE:
        bound = copy.copy(self)
        object.__setattr__(bound, "_estimate", estimate)
        return bound

    def adjoint(self, vjp: VJP, grad: Tensor) -> tuple[Tensor, SolverResult | None]:
        estimate = self.estimate
        apply = None if estimate is None else estimate.apply_transposed
        return self._solve(vjp, apply, grad)

    def tangent(self, jvp: JVP, fz_tangent: Tensor) -> tuple[Tensor, SolverResult | None]:
        r"""Forward mode: :math:`\dot z = M \dot f`, checked through a JVP, with the same
        fallback (GMRES on :math:`(I - J) \dot z = \dot f`)."""
        estimate = self.estimate
        apply = None if estimate is None else estimate.apply
        return self._solve(jvp, apply, fz_tangent)

    def _solve(
        self,
        product: Callable[[Tensor], Tensor],
        apply: Callable[[Tensor], Tensor] | None,
        g: Tensor,
    ) -> tuple[Tensor, SHINEResult]:
        """:math:`v \\approx (I - A)^{-1} g` for the Jacobian product ``product`` (:math:`A`)
        and the estimate ``apply`` (:math:`M`, ``None``: none)."""
        sync_free = not host_readable(g)
        if sync_free and not functorch_active():
            raise RuntimeError(
                f"{self!r} cannot solve under autograd's own batched gradients "
                "(is_grads_batched=True, autograd.functional.jacobian(vectorize=True)): use "
                "torch.func.jacrev or torch.func.vmap over torch.func.vjp, or vectorize=False"
            )
        batch = g.shape[0]
        work = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
        g_norm = torch.linalg.vector_norm(g.detach().to(work), dim=1)
        nan = torch.full((batch,), float("nan"), dtype=work, device=g.device)
        no = torch.zeros(batch, dtype=torch.bool, device=g.device)
        if apply is None:
            u, result = self._exact(product, g, None, sync_free)
            return u, self._report(result, no, ~no, nan, sync_free)
        if self.refine:
            return self._refine(product, apply, g, g_norm, sync_free)
        u = apply(g)
        residual_vec = g - u + product(u)
        residual = torch.linalg.vector_norm(residual_vec.detach().to(work), dim=1)
        rho = residual / g_norm
        # Accepted: within max_residual of ||g||, or g = 0 (u = 0 then). NaN is not accepted.
        accepted = (residual <= self.max_residual * g_norm) | (g_norm == 0)
        poor = ~accepted
        if not sync_free and not bool(poor.any()):
            steps = torch.ones(batch, dtype=torch.long, device=g.device)
            status = torch.full((batch,), _SUCCESS, dtype=torch.long, device=g.device)
            result = SolverResult(
                z=u.detach(),
                status=status,
                converged=status == _SUCCESS,
                n_steps=steps,
                residual=residual,
                n_f_evals=1,
                linear=True,
            )
            return u, self._report(result, accepted, poor, rho, sync_free)
        if torch.is_grad_enabled() and g.requires_grad and not sync_free:
            raise RuntimeError(
                f"{self!r}: a second-order derivative (create_graph=True) reached samples whose "
                "estimate was poor, which fall back to the exact solve, whose second order "
                "this rule does not give. Use ImplicitDifferentiation for exact second "
                "derivatives, or raise max_residual."
            )
        # The exact solve for the poor samples, from u where u is closer than 0.
        closer = poor & (residual < g_norm)
        start = None
        if sync_free or bool(closer.any()):
            start = torch.where(closer[:, None], u.detach(), 0.0)
        rhs = torch.where(poor[:, None], g, 0.0)
        exact, solved = self._exact(product, rhs, None, sync_free, x0=start)
        if sync_free:  # under a torch.func transform: the solve is first order only
            exact = _FirstOrderOnly.apply(exact, self)  # type: ignore[no-untyped-call]
        u = torch.where(poor[:, None], exact.to(u.dtype), u)
        checked = SolverResult(
            z=u.detach(),
            status=torch.where(poor, solved.status, _SUCCESS),
            converged=torch.where(poor, solved.converged, True),
            n_steps=solved.n_steps + 1,
            residual=torch.where(poor, solved.residual.to(work), residual),
            n_f_evals=solved.n_f_evals + 1,
            linear=True,
        )
        return u, self._report(checked, accepted, poor, rho, sync_free)

    def _refine(
        self,
        product: Callable[[Tensor], Tensor],
        apply: Callable[[Tensor], Tensor],
        g: Tensor,
        g_norm: Tensor,
        sync_free: bool,
    ) -> tuple[Tensor, SHINEResult]:
        """``refine=True``: one GMRES solve, preconditioned by the estimate on the samples
        where it is better than none; a sample it broke down on goes on without it, from its
        best iterate, with the budget left. At most the solver's ``max_iter`` VJPs and one."""
        batch = g.shape[0]
        with torch.no_grad():  # the estimate's residual: one VJP
            u0 = apply(g)
            rho = torch.linalg.vector_norm((g - u0 + product(u0)).to(g_norm.dtype), dim=1)
            rho = rho / g_norm
        # A preconditioner whose own answer is worse than none (rho >= 1, or NaN) is not used.
        usable = rho < 1.0
        rows = usable[:, None]

        def chosen(y: Tensor) -> Tensor:
            return torch.where(rows, apply(y), y)

        u, result = self._exact(product, g, chosen, sync_free)
        checked = SolverResult(
            z=u,
            status=result.status,
            converged=result.converged,
            n_steps=result.n_steps + 1,
            residual=result.residual,
            n_f_evals=result.n_f_evals + 1,
            linear=True,
        )
        failed = usable & ~result.converged
        again = None
        if not sync_free and bool(failed.any()):
            left = self.solver.max_iter - int(result.n_steps[failed].max())
        if not sync_free and bool(failed.any()) and left >= 2:
            solver = dataclasses.replace(self.solver, max_iter=left)
            rhs = torch.where(failed[:, None], g, 0.0)
            start = torch.where(failed[:, None], u, 0.0)
            plain, again = self._exact(product, rhs, None, sync_free, x0=start, solver=solver)
            u = torch.where(failed[:, None], plain, u)
            checked = _merge(checked, again, failed)
        fell_back = ~usable | (failed if again is not None else torch.zeros_like(failed))
        no = torch.zeros(batch, dtype=torch.bool, device=g.device)
        return u, self._report(checked, no, fell_back, rho, sync_free)

    def _exact(
        self,
        product: Callable[[Tensor], Tensor],
        g: Tensor,
        apply: Callable[[Tensor], Tensor] | None,
        sync_free: bool,
        x0: Tensor | None = None,
        solver: AbstractLinearSolver | None = None,
    ) -> tuple[Tensor, SolverResult]:
        r"""GMRES (``solver``, default the rule's) on :math:`(I - A) v = g`, right-preconditioned
        by ``apply`` when given (:math:`(I - A) M y = g`, :math:`v = M y`), from ``x0``."""
        work = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype

        def operator(v: Tensor) -> Tensor:
            return v - product(v.to(g.dtype)).to(work)

        def preconditioned(y: Tensor) -> Tensor:
            assert apply is not None
            return operator(apply(y.to(g.dtype)).to(work))

        matvec = operator if apply is None else preconditioned

        with torch.no_grad():
            start = None if x0 is None else x0.to(work)
            solver = self.solver if solver is None else solver
            result = solver.solve(matvec, g.to(work), start, host_reads=not sync_free)
            v = result.z if apply is None else apply(result.z.to(g.dtype)).to(work)
        result = dataclasses.replace(result, z=v.to(g.dtype))
        return result.z, result

    def _report(
        self,
        result: SolverResult,
        used: Tensor,
        fell_back: Tensor,
        estimate_residual: Tensor,
        sync_free: bool,
    ) -> SHINEResult:
        """The :class:`~implicitlayers.backward.SHINEResult` of ``result``, with the policy
        applied (not under a ``torch.func`` transform, whose statuses cannot be read)."""
        if not sync_free:
            self._warn(result)
        return SHINEResult(
            z=result.z,
            status=result.status,
            converged=result.converged,
            n_steps=result.n_steps,
            residual=result.residual,
            n_f_evals=result.n_f_evals,
            linear=True,
            used_estimate=used,
            fell_back=fell_back,
            estimate_residual=estimate_residual,
        )

    def _warn(self, result: SolverResult) -> None:
        if self.on_unconverged == "ignore" or bool(result.converged.all()):
            return
        codes = sorted({int(c) for c in result.status[~result.converged].tolist()})
        reasons = " ".join(f"{Status(c).name}: {Status(c).linear_message}" for c in codes)
        message = (
            f"{self!r}: the exact adjoint solve did not converge for some samples, so their "
            f"gradients are inexact (DEQ.last_backward_result holds the statuses). {reasons}"
        )
        if self.on_unconverged == "raise":
            raise ConvergenceError(message + "\n" + result.summary(), result)
        warn_at_caller(message, ConvergenceWarning)


def _merge(first: SolverResult, second: SolverResult, rows: Tensor) -> SolverResult:
    """``first`` with the ``rows`` of ``second``, the VJPs of both counted."""
    return SolverResult(
        z=torch.where(rows[:, None], second.z, first.z),
        status=torch.where(rows, second.status, first.status),
        converged=torch.where(rows, second.converged, first.converged),
        n_steps=first.n_steps + second.n_steps,
        residual=torch.where(rows, second.residual, first.residual),
        n_f_evals=first.n_f_evals + second.n_f_evals,
        linear=True,
    )
