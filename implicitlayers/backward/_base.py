"""The interface every backward rule implements."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
        # Only rules that take VJPs need dL/dz through f; JFB skips that part of the backward.
        z_in = z_star.detach().requires_grad_(self.uses_vjp)
        with torch.enable_grad():
            fz = f_flat(z_in)
            if self.uses_vjp:
                fz = _ReplaceGradient.apply(fz, z_in, self, on_result)  # type: ignore[no-untyped-call]
        # Exactly z_star in value; the gradient flows through the one application of f.
        out: Tensor = _ValueOfFirst.apply(z_star.detach(), fz)  # type: ignore[no-untyped-call]
        return out


class _ValueOfFirst(torch.autograd.Function):
    """``z* + (f(z*) - f(z*).detach())`` without its two state-sized temporaries.

    Returns a copy of ``z`` in ``fz``'s dtype; the gradient passes to ``fz`` unchanged.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, fz: Tensor) -> Tensor:
        return z.to(fz.dtype, copy=True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


class _ReplaceGradient(torch.autograd.Function):
    """Identity whose backward maps the incoming gradient :math:`g` to the rule's :math:`u`.

    A custom ``Function`` rather than a tensor hook: a hook on ``f(z*)`` must capture that
    tensor to take its VJPs, and the cycle tensor -> graph node -> hook -> tensor passes through
    C++ where Python's garbage collector cannot see it, leaking the graph every step. Saving the
    input here keeps references one-way.
    """

    @staticmethod
    def forward(
        ctx: Any,
        fz: Tensor,
        z_in: Tensor,
        rule: AbstractBackward,
        on_result: Callable[[SolverResult | None], None] | None,
    ) -> Tensor:
        ctx.save_for_backward(fz, z_in)
        ctx.rule = rule
        ctx.on_result = on_result
        out: Tensor = fz.view_as(fz)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        fz: Tensor
        z_in: Tensor
        fz, z_in = ctx.saved_tensors

        def vjp(v: Tensor) -> Tensor:
            (out,) = torch.autograd.grad(fz, z_in, v, retain_graph=True)
            return out

        with torch.enable_grad():
            u, result = ctx.rule.adjoint(vjp, grad)
        if ctx.on_result is not None:
            ctx.on_result(result)
        return u.to(grad.dtype), None, None, None
