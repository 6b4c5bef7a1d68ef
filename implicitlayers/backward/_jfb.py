"""Jacobian-free backpropagation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .._result import SolverResult
from ._base import JVP, VJP, AbstractBackward

__all__ = ["JFB"]


@dataclass(frozen=True, kw_only=True, repr=False)
class JFB(AbstractBackward):
    r"""Jacobian-free backpropagation (Fung et al., 2022).

    Replaces :math:`(I - J^\top)^{-1}` by the identity, so the gradient flows through one
    application of ``f`` at the detached fixed point:

    .. math::

        u = g, \qquad \frac{\partial L}{\partial \theta} \approx
            g^\top \frac{\partial f(z^\star, x; \theta)}{\partial \theta}.

    It costs one VJP through ``f`` and no solve. In forward mode its tangent is
    :math:`\dot z = \dot f`, the tangent of :math:`f(z^\star, x; \theta)` with :math:`z^\star`
    held. When ``f`` is a contraction in ``z`` the
    result is a descent direction for the loss (Fung et al., Theorem 3.1), which is why DE-GRAD
    trains well with it.

    Example:
        >>> import torch, implicitlayers as il
        >>> deq = il.DEQ(torch.nn.Linear(4, 4), solver=il.Picard(), backward=il.JFB())
        >>> deq.backward
        JFB()
    """

    @property
    def uses_vjp(self) -> bool:
        return False

    def adjoint(self, vjp: VJP, grad: Tensor) -> tuple[Tensor, SolverResult | None]:
        return grad, None

    def tangent(self, jvp: JVP, fz_tangent: Tensor) -> tuple[Tensor, SolverResult | None]:
        r""":math:`\dot z = \dot f`: the fixed point moves as one application of ``f`` does."""
        return fz_tangent, None
