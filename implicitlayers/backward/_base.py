"""The interface every backward rule implements."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._repr import compact_repr
from .._result import SolverResult
from ..solvers._estimate import InverseEstimate
from ._functions import Attach, Link, OnResult, ValueOfFirst, functorch_active
from ._second_order import exact_second_order

__all__ = ["JVP", "VJP", "AbstractBackward"]

#: ``vjp(v)`` returns :math:`v^\top \partial f / \partial z` at the fixed point, flat ``(B, n)``.
VJP = Callable[[Tensor], Tensor]

#: ``jvp(v)`` returns :math:`(\partial f / \partial z)\, v` at the fixed point, flat ``(B, n)``.
JVP = Callable[[Tensor], Tensor]


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

    Second-order gradients (``create_graph=True``) differentiate the rule's own formula for
    :math:`u` with :math:`z^\star` held fixed (so :class:`~implicitlayers.JFB` gives the
    second derivative of the one-step map :math:`f(z^\star, x)`), unless the rule is
    :attr:`exact`, in which case they are the exact second derivatives of the fixed point.
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
            Under ``create_graph=True`` the products ``vjp`` returns carry a graph, and a rule
            that builds :math:`u` from them with differentiable operations gets its own
            formula's second derivatives.
        """

    def tangent(self, jvp: JVP, fz_tangent: Tensor) -> tuple[Tensor, SolverResult | None]:
        r"""Forward mode: map the tangent :math:`\dot f` of ``f(z*)`` (the inputs and
        parameters moving, :math:`z^\star` held) to the rule's tangent of the fixed point,
        the transpose of :meth:`adjoint`'s formula: with :math:`u = M^\top g` in reverse mode,
        :math:`\dot z = M \dot f` (exactly, :math:`\dot z = (I - J)^{-1} \dot f`).

        Args:
            jvp: Computes :math:`J v` for a flat ``(B, n)`` vector :math:`v`.
            fz_tangent: Flat ``(B, n)`` tangent :math:`\dot f`.

        Returns:
            ``(dz, result)``, as :meth:`adjoint` returns ``(u, result)``.

        Raises:
            NotImplementedError: For a rule that defines only :meth:`adjoint` (forward mode,
                ``torch.func.jvp`` and ``jacfwd`` need this method).
        """
        raise NotImplementedError(
            f"{type(self).__name__} defines no forward-mode formula: implement "
            f"{type(self).__name__}.tangent(jvp, fz_tangent), the transpose of its adjoint, to "
            "use it under torch.func.jvp, jacfwd or torch.autograd.forward_ad"
        )

    @property
    def uses_vjp(self) -> bool:
        """Whether :meth:`adjoint` needs Jacobian products (``False`` skips the hook)."""
        return True

    @property
    def exact(self) -> bool:
        r"""Whether :math:`u` is the exact :math:`(I - J^\top)^{-1} g`, so that second-order
        gradients must see :math:`z^\star` move with the inputs (see :meth:`attach`)."""
        return False

    @property
    def uses_estimate(self) -> bool:
        r"""Whether the rule uses the forward solver's estimate of :math:`(I - J)^{-1}`
        (:class:`~implicitlayers.solvers.InverseEstimate`): then :class:`~implicitlayers.DEQ`
        asks the solve to keep it and attaches through :meth:`with_estimate`'s rule."""
        return False

    def with_estimate(self, estimate: InverseEstimate | None) -> AbstractBackward:
        """This rule holding the forward solver's ``estimate`` at one solution (``None``: the
        solver gave none) for its :meth:`adjoint` and :meth:`tangent`:
        :class:`~implicitlayers.DEQ` attaches each solution through it. The default ignores
        it; a rule whose :attr:`uses_estimate` is true returns a copy that holds it."""
        return self

    def attach(
        self,
        f_flat: Callable[[Tensor], Tensor],
        z_star: Tensor,
        on_result: OnResult | None = None,
        *,
        leaves: Sequence[Tensor] = (),
    ) -> Tensor:
        r"""Return :math:`z^\star` (same value) carrying this rule's gradient and tangent.

        Applies ``f`` once at the detached :math:`z^\star` and routes the derivatives through
        that application: the gradient :math:`g` becomes :math:`u` (:meth:`adjoint`) and the
        tangent :math:`\dot f` becomes :math:`\dot z` (:meth:`tangent`). The Jacobian
        products come from ``torch.func.vjp`` on that application, so the attach
        composes with ``torch.func`` transforms.

        Args:
            f_flat: ``f`` on flat ``(B, n)`` states with the inputs bound.
            z_star: Flat ``(B, n)`` fixed point.
            on_result: Called with the rule and the adjoint solve's result during the
                backward pass.
            leaves: For an :attr:`exact` rule, every tensor requiring grad that ``f``
                depends on (the inputs and the parameters): exact second-order gradients are
                returned to these directly. A double backward that finds ``f`` depending on
                another tensor raises, rather than return an inexact second derivative.
        """
        z = z_star.detach()
        with torch.enable_grad():
            if not self.uses_vjp:  # JFB: the gradient and tangent of f(z*) as they are
                fz = f_flat(z)
            else:
                functorch = functorch_active()
                fz, vjp = _application(f_flat, z, functorch)
                link = Link(
                    rule=self,
                    vjp=vjp,
                    z=z,
                    f_flat=f_flat,
                    on_result=on_result,
                    functorch=functorch,
                    second_order=exact_second_order,
                )
                out: Tensor = Attach.apply(z, fz, link, *leaves)  # type: ignore[no-untyped-call]
                return out
        # Exactly z_star in value; the derivatives flow through the one application of f.
        jfb: Tensor = ValueOfFirst.apply(z, fz)  # type: ignore[no-untyped-call]
        return jfb


def _application(
    f_flat: Callable[[Tensor], Tensor], z: Tensor, functorch: bool
) -> tuple[Tensor, VJP]:
    """``f(z)`` with its graph, and the VJP through that graph.

    Under a ``torch.func`` transform by ``torch.func.vjp`` (no ``requires_grad_`` on an
    intermediate tensor, which the transforms refuse); otherwise by plain autograd, which
    also serves saved-tensor hooks (activation checkpointing, offloading), which
    ``torch.func.vjp`` does not support.
    """
    if functorch:
        fz, vjp_fn = torch.func.vjp(f_flat, z)[:2]

        def vjp(v: Tensor) -> Tensor:
            out: Tensor = vjp_fn(v)[0]
            return out

        return fz, vjp
    z_in = z.detach().requires_grad_(True)
    fz = f_flat(z_in)

    def autograd_vjp(v: Tensor) -> Tensor:
        create_graph = torch.is_grad_enabled()
        (out,) = torch.autograd.grad(fz, z_in, v, retain_graph=True, create_graph=create_graph)
        return out

    return fz, autograd_vjp
