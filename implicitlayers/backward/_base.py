"""The interface every backward rule implements."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._repr import compact_repr
from .._result import SolverResult

__all__ = ["VJP", "AbstractBackward"]

#: ``vjp(v)`` returns :math:`v^\top \partial f / \partial z` at the fixed point, flat ``(B, n)``.
VJP = Callable[[Tensor], Tensor]


@dataclass(frozen=True, kw_only=True, repr=False)
class AbstractBackward(abc.ABC):
    r"""Base class of the backward rules: how a fixed point joins the autograd graph.

    With :math:`z^\star = f(z^\star, x; \theta)`, :math:`J = \partial f / \partial z` at
    :math:`z^\star` and incoming gradient :math:`g = \partial L / \partial z^\star`, the
    implicit function theorem gives

    .. math::

        \frac{\partial L}{\partial (x, \theta)} = u^\top
            \frac{\partial f(z^\star, x; \theta)}{\partial (x, \theta)}, \qquad
        u = (I - J^\top)^{-1} g.

    Every rule returns the fixed point's value unchanged and attaches it to the graph through
    one application of ``f`` at the detached :math:`z^\star`; a rule only chooses the vector
    :math:`u` fed into that application. To write your own, subclass this and implement
    :meth:`adjoint`.
    """

    def __repr__(self) -> str:
        return compact_repr(self)

    @abc.abstractmethod
    def adjoint(self, vjp: VJP, grad: Tensor) -> tuple[Tensor, SolverResult | None]:
        r"""Map the incoming gradient :math:`g` to :math:`u`.

        Args:
            vjp: Computes :math:`v^\top J` for a flat ``(B, n)`` vector :math:`v`.
            grad: Flat ``(B, n)`` incoming gradient :math:`g`.

        Returns:
            ``(u, result)``: :math:`u` of the same shape, and the
            :class:`~implicitlayers.SolverResult` of any solve performed (``None`` if none).
        """

    @property
    def uses_vjp(self) -> bool:
        """Whether :meth:`adjoint` needs Jacobian products (``False`` skips the hook)."""
        return True

    def attach(
        self,
        f_flat: Callable[[Tensor], Tensor],
        z_star: Tensor,
        on_result: Callable[[SolverResult | None], None] | None = None,
    ) -> Tensor:
        r"""Return :math:`z^\star` (same value) carrying this rule's gradient.

        Args:
            f_flat: ``f`` on flat ``(B, n)`` states with the inputs bound.
            z_star: Flat ``(B, n)`` fixed point.
            on_result: Called with the adjoint solve's result during the backward pass.
        """
        z_in = z_star.detach().requires_grad_(True)
        with torch.enable_grad():
            fz = f_flat(z_in)
        if self.uses_vjp:

            def vjp(v: Tensor) -> Tensor:
                (out,) = torch.autograd.grad(fz, z_in, v, retain_graph=True)
                return out

            solving = False  # the VJPs below reach this hook again; let them pass through

            def hook(grad: Tensor | None) -> Tensor | None:
                nonlocal solving
                if solving or grad is None:  # None: an undefined gradient, nothing to map
                    return grad
                solving = True
                try:
                    u, result = self.adjoint(vjp, grad)
                finally:
                    solving = False
                if on_result is not None:
                    on_result(result)
                return u.to(grad.dtype)

            fz.register_hook(hook)  # type: ignore[no-untyped-call]
        # Exactly z_star in value; the gradient flows through the one application of f.
        return z_star.detach().to(fz.dtype) + (fz - fz.detach())
