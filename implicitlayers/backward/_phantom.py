"""Phantom gradients (Geng et al., 2021): damped unrolling from the fixed point, and its
Neumann series."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._result import SolverResult
from .._validate import check_float, check_int
from ._base import JVP, VJP, AbstractBackward
from ._functions import OnResult, ValueOfFirst

__all__ = ["NeumannPhantom", "PhantomGradient"]


def _check(count_name: str, count: int, minimum: int, mixing: float) -> None:
    check_int(count_name, count, minimum=minimum)
    check_float("mixing", mixing, low=0.0, high=1.0, low_open=True)


def _damped_neumann(vjp: VJP, grad: Tensor, terms: int, mixing: float) -> Tensor:
    r""":math:`\lambda \sum_{i=0}^{k} ((1 - \lambda) I + \lambda J^\top)^i g` for
    :math:`k` = ``terms``, with :math:`k` VJPs and differentiable operations only."""
    v = grad
    total = grad
    for _ in range(terms):
        # mixing == 1 skips the 0 * v term: the plain Neumann series, operation for operation.
        v = vjp(v) if mixing == 1.0 else (1.0 - mixing) * v + mixing * vjp(v)
        total = total + v
    return total if mixing == 1.0 else mixing * total


@dataclass(frozen=True, kw_only=True, repr=False)
class PhantomGradient(AbstractBackward):
    r"""The unrolling-based phantom gradient (Geng et al., 2021): backpropagation through
    :math:`k` damped steps of ``f`` taken from the detached fixed point.

    .. math::

        z_0 = \operatorname{sg}(z^\star), \qquad
        z_{i+1} = (1 - \lambda)\, z_i + \lambda f(z_i, x; \theta), \quad i = 0, \dots, k - 1,

    and the output has the value of :math:`z^\star` exactly with the gradient of :math:`z_k`
    (:math:`\operatorname{sg}` stops the gradient). By the chain rule,

    .. math::

        \frac{\partial z_k}{\partial \theta} = \lambda \sum_{i=0}^{k-1}
            \Big[\prod_{j=i+1}^{k-1} \big((1 - \lambda) I + \lambda J(z_j)\big)\Big]
            \frac{\partial f(z_i, x; \theta)}{\partial \theta}.

    At an exact fixed point every :math:`z_i` equals :math:`z^\star`, so this is
    :class:`NeumannPhantom` with ``terms=steps - 1``; it tends to the exact gradient as
    :math:`k \to \infty` at the rate :math:`\rho((1 - \lambda) I + \lambda J)^k`.
    ``PhantomGradient(steps=1, mixing=1.0)`` is :class:`~implicitlayers.JFB`. torchdeq calls
    this ``grad=k`` with damping ``tau`` :math:`= \lambda` (it returns :math:`z_k`'s value;
    this rule returns :math:`z^\star`'s).

    The backward pass costs one VJP through each of the :math:`k` applications of ``f`` and no
    solve; the graph of all :math:`k` applications is kept, so memory grows with :math:`k`,
    not with the number of forward iterations. Second-order gradients differentiate through
    the :math:`k` steps (the surrogate's own second derivative, :math:`z^\star` held fixed).

    Args:
        steps: :math:`k \ge 1`, the number of damped steps (torchdeq's ``grad``).
        mixing: :math:`\lambda \in (0, 1]`, the weight of :math:`f(z_i)` against :math:`z_i`
            (as :class:`~implicitlayers.Anderson`'s ``mixing``; torchdeq's ``tau``).

    Example:
        >>> import torch
        >>> import implicitlayers as il
        >>> from implicitlayers.backward import PhantomGradient
        >>> cell = torch.nn.Linear(4, 4)
        >>> deq = il.DEQ(lambda z, x: torch.tanh(0.5 * cell(z) + x),
        ...              backward=PhantomGradient(steps=3))
        >>> deq.backward
        PhantomGradient(steps=3)
        >>> z, result = deq(torch.randn(2, 4))
        >>> torch.equal(z, result.z)  # the value is the fixed point itself
        True
        >>> z.sum().backward()  # gradients reach cell through the 3 damped steps
        >>> cell.weight.grad is not None
        True
    """

    steps: int = 5
    mixing: float = 0.5

    def __post_init__(self) -> None:
        _check("steps", self.steps, 1, self.mixing)

    def adjoint(self, vjp: VJP, grad: Tensor) -> tuple[Tensor, SolverResult | None]:
        r"""The vector this rule's gradient is at an exact fixed point: that of
        :class:`NeumannPhantom` with ``terms=steps - 1``.

        :meth:`attach` does not call it (it unrolls ``f`` instead); it serves code that drives
        rules through :meth:`~implicitlayers.backward.AbstractBackward.adjoint` directly.
        """
        return _damped_neumann(vjp, grad, self.steps - 1, self.mixing), None

    def tangent(self, jvp: JVP, fz_tangent: Tensor) -> tuple[Tensor, SolverResult | None]:
        r"""The forward-mode counterpart at an exact fixed point, as :meth:`adjoint`'s:
        :math:`\lambda \sum_{i=0}^{k-1} ((1 - \lambda) I + \lambda J)^i \dot f`.
        (:meth:`attach` unrolls ``f``, so forward mode flows through the unrolled steps
        themselves.)"""
        return _damped_neumann(jvp, fz_tangent, self.steps - 1, self.mixing), None

    def attach(
        self,
        f_flat: Callable[[Tensor], Tensor],
        z_star: Tensor,
        on_result: OnResult | None = None,
        *,
        leaves: Sequence[Tensor] = (),
    ) -> Tensor:
        r"""Return :math:`z^\star` (same value) carrying the gradient of the :math:`k` damped
        steps; see :meth:`~implicitlayers.backward.AbstractBackward.attach` for the arguments.
        No adjoint solve runs, so ``on_result`` is never called, and ``leaves`` are not
        needed."""
        z = z_star.detach()
        with torch.enable_grad():
            for _ in range(self.steps):
                fz = f_flat(z)
                z = fz if self.mixing == 1.0 else (1.0 - self.mixing) * z + self.mixing * fz
        out: Tensor = ValueOfFirst.apply(z_star.detach(), z)  # type: ignore[no-untyped-call]
        return out


@dataclass(frozen=True, kw_only=True, repr=False)
class NeumannPhantom(AbstractBackward):
    r"""The Neumann-series phantom gradient (Geng et al., 2021): the damped iteration's
    Jacobian at :math:`z^\star`, summed as a truncated Neumann series.

    With :math:`B = (1 - \lambda) I + \lambda J^\top` (the transposed Jacobian of one damped
    step :math:`z \mapsto (1 - \lambda) z + \lambda f(z)` at :math:`z^\star`),

    .. math::

        u = \lambda \sum_{i=0}^{k} B^i g, \qquad
        \frac{\partial L}{\partial \theta} \approx
            u^\top \frac{\partial f(z^\star, x; \theta)}{\partial \theta},

    computed with :math:`k` vector-Jacobian products. Since
    :math:`\lambda \sum_{i \ge 0} B^i = (I - J^\top)^{-1}`, the error is
    :math:`B^{k+1} (I - J^\top)^{-1} g`: it tends to the exact gradient when the spectral radius
    :math:`\rho(B) < 1`, which holds for small enough :math:`\lambda` whenever the eigenvalues
    of :math:`J` have real part below one, even where :class:`~implicitlayers.Neumann`
    (:math:`\lambda = 1`) diverges. ``terms`` means what it means for
    :class:`~implicitlayers.Neumann`: ``mixing=1.0`` is ``Neumann(terms=terms)``, and
    ``terms=0`` is :class:`~implicitlayers.JFB` scaled by :math:`\lambda`. At an exact fixed
    point it gives the gradient of :class:`PhantomGradient` with ``steps=terms + 1``, keeping the
    graph of one application of ``f`` instead of :math:`k`.

    Under ``create_graph=True`` the series is built from the graph-carrying VJPs, so
    second-order gradients are those of this formula with :math:`z^\star` held fixed.

    Args:
        terms: :math:`k \ge 0`, the highest power of :math:`B` kept (as for
            :class:`~implicitlayers.Neumann`); :math:`k` VJPs.
        mixing: :math:`\lambda \in (0, 1]`, the weight of :math:`f(z)` in the damped step (as
            :class:`~implicitlayers.Anderson`'s ``mixing``).

    Example:
        >>> import torch
        >>> from implicitlayers.backward import NeumannPhantom
        >>> rule = NeumannPhantom(terms=2, mixing=0.5)
        >>> rule
        NeumannPhantom(terms=2)
        >>> J = torch.tensor([[0.0, 0.5], [0.5, 0.0]])
        >>> g = torch.tensor([[1.0, 0.0]])
        >>> u, _ = rule.adjoint(lambda v: v @ J, g)  # v^T J for row vectors
        >>> B = 0.5 * torch.eye(2) + 0.5 * J.T
        >>> torch.allclose(u, 0.5 * (g + g @ B.T + g @ (B @ B).T))
        True
    """

    terms: int = 5
    mixing: float = 0.5

    def __post_init__(self) -> None:
        _check("terms", self.terms, 0, self.mixing)

    def adjoint(self, vjp: VJP, grad: Tensor) -> tuple[Tensor, SolverResult | None]:
        return _damped_neumann(vjp, grad, self.terms, self.mixing), None

    def tangent(self, jvp: JVP, fz_tangent: Tensor) -> tuple[Tensor, SolverResult | None]:
        r"""The same series on the tangent: :math:`\lambda \sum_{i=0}^{k} B^i \dot f` with
        :math:`B = (1 - \lambda) I + \lambda J`."""
        return _damped_neumann(jvp, fz_tangent, self.terms, self.mixing), None
