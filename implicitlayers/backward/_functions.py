"""The autograd ``Function`` objects through which a rule attaches a fixed point.

Every one composes with ``torch.func``: no ``requires_grad_`` on an intermediate tensor under
a transform (the Jacobian products come from ``torch.func.vjp`` there), a forward-mode
rule (``jvp``) beside the reverse one, and a generated vmap rule (the rules' formulas batch as
they are; a solve that would read the host runs without reads under a transform).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._result import SolverResult

if TYPE_CHECKING:
    from ._base import AbstractBackward

__all__ = ["Attach", "Link", "ValueOfFirst", "functorch_active", "host_readable"]

#: Called during the backward pass with the rule and the adjoint solve's result.
OnResult = Callable[["AbstractBackward", "SolverResult | None"], None]


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) is running.

    torch has no public query for it; its level counter answers, where this torch has one.
    """
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is not None and level() is not None


@dataclass
class Link:
    """What a rule's backward and forward-mode formulas need, held by :class:`ReplaceGradient`.

    Attributes:
        rule: The backward rule.
        vjp: :math:`v \\mapsto v^\\top J` at the fixed point (flat ``(B, n)``).
        z: The detached fixed point, for an exact second order.
        f_flat: The map, for an exact second order (``None``: a map whose second order is
            refused).
        on_result: Called with the rule and the adjoint solve's result.
        functorch: Whether the attach ran under a ``torch.func`` transform.
        second_order: For an exact rule under plain autograd's ``create_graph=True``: the
            gradients to the ``leaves`` with the fixed point moving with them (``None``: a
            third order, refused).
    """

    rule: AbstractBackward
    vjp: Callable[[Tensor], Tensor]
    z: Tensor
    f_flat: Callable[[Tensor], Tensor] | None
    on_result: OnResult | None
    functorch: bool
    second_order: Callable[[Link, Tensor, tuple[Tensor, ...]], list[Tensor | None]] | None = None

    def jvp(self, v: Tensor) -> Tensor:
        """:math:`J v`, as the VJP of the (linear) VJP: it reuses the graph of ``f`` kept for
        the VJPs, with no new application of ``f``."""
        if self.functorch:
            transpose = torch.func.vjp(self.vjp, torch.zeros_like(v))[1]
            out: Tensor = transpose(v)[0]
            return out
        with torch.enable_grad():
            u = torch.zeros_like(v, requires_grad=True)
            (jv,) = torch.autograd.grad(self.vjp(u), u, v, create_graph=torch.is_grad_enabled())
        return jv


class ValueOfFirst(torch.autograd.Function):
    """``z* + (f(z*) - f(z*).detach())`` without its two state-sized temporaries.

    Returns a copy of ``z`` in ``fz``'s dtype; the gradient, and the tangent, pass to and from
    ``fz`` unchanged.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, fz: Tensor) -> Tensor:
        return z.to(fz.dtype, copy=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad

    @staticmethod
    def jvp(ctx: Any, z_tangent: Tensor | None, fz_tangent: Tensor) -> Tensor:
        return fz_tangent


class Attach(torch.autograd.Function):
    r""":math:`z^\star` in value, with the rule's derivatives through ``f(z*)``: the backward
    maps the incoming gradient :math:`g` to the rule's :math:`u`
    (:meth:`~AbstractBackward.adjoint`), returned to ``f(z*)``, and forward mode maps the
    tangent :math:`\dot f` of ``f(z*)`` to the rule's :math:`\dot z`
    (:meth:`~AbstractBackward.tangent`).

    A ``Function`` rather than a tensor hook: a hook on ``f(z*)`` must capture that tensor to
    take its VJPs, and the cycle tensor -> graph node -> hook -> tensor passes through C++,
    where Python's garbage collector cannot see it. The VJPs go through the graph of the one
    application of ``f``, held by the :class:`Link`, references one-way.

    Under ``create_graph=True`` (plain autograd) an exact rule does not return :math:`u` to
    ``f(z*)``, whose graph holds :math:`z^\star` fixed: see
    :func:`~implicitlayers.backward._second_order.exact_second_order`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, fz: Tensor, link: Link, *leaves: Tensor) -> Tensor:
        return z.to(fz.dtype, copy=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, _, ctx.link, *leaves = inputs
        ctx.save_for_backward(*leaves)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        link: Link = ctx.link
        leaves = ctx.saved_tensors
        rule = link.rule
        if rule.exact and torch.is_grad_enabled() and not link.functorch:
            if link.second_order is None:
                raise RuntimeError(
                    "third- and higher-order gradients through ImplicitDifferentiation are not "
                    "supported; first and second order are exact"
                )
            grads = link.second_order(link, grad, leaves)
            return (None, None, None, *grads)
        u = adjoint(link, grad)
        return (None, u.to(grad.dtype), None, *(None for _ in leaves))

    @staticmethod
    def jvp(ctx: Any, z_tangent: Any, fz_tangent: Tensor, *tangents: Any) -> Tensor:
        return tangent(ctx.link, fz_tangent)


def host_readable(t: Tensor) -> bool:
    """Whether the host can read ``t``'s values: not under a ``torch.func`` transform, and not
    a batched tensor of autograd's own vmap (behind ``is_grads_batched=True`` and
    ``autograd.functional.jacobian(vectorize=True)``), whose storage the host cannot see."""
    if functorch_active():
        return False
    try:
        t.data_ptr()
    except RuntimeError:
        return False
    return True


def adjoint(link: Link, grad: Tensor) -> Tensor:
    """The rule's :math:`u` for the incoming gradient ``grad``."""
    with torch.enable_grad():
        u, result = link.rule.adjoint(link.vjp, grad)
    if link.on_result is not None and not link.functorch:
        link.on_result(link.rule, result)
    return _first_order_only(link, u)


def tangent(link: Link, fz_tangent: Tensor) -> Tensor:
    r"""The rule's :math:`\dot z` for the tangent ``fz_tangent`` of ``f(z*)``."""
    dz, _ = link.rule.tangent(link.jvp, fz_tangent)
    return _first_order_only(link, dz)


def _first_order_only(link: Link, value: Tensor) -> Tensor:
    """An exact rule's solve under a ``torch.func`` transform, guarded: differentiating it
    again (a second order) would hold the fixed point fixed, which is not exact."""
    if link.functorch and link.rule.exact:
        out: Tensor = _FirstOrderOnly.apply(value, link.rule)  # type: ignore[no-untyped-call]
        return out
    return value


class _FirstOrderOnly(torch.autograd.Function):
    """Identity that refuses to be differentiated (see :func:`_second_order_refused`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, rule: Any) -> Tensor:
        out: Tensor = value.view_as(value)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.rule = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None]:
        raise _second_order_refused(ctx.rule)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Tensor:
        raise _second_order_refused(ctx.rule)


def _second_order_refused(rule: Any) -> RuntimeError:
    return RuntimeError(
        f"a second-order derivative through {rule!r} under a torch.func transform "
        "(torch.func.hessian, jacfwd(jacrev(...)), jacrev(jacrev(...)), or a jvp/vjp of a "
        "gradient): the transforms would differentiate the adjoint solve with the fixed point "
        "held, which is not the exact second derivative. Exact second derivatives through "
        "ImplicitDifferentiation are computed by plain autograd: torch.autograd.grad(..., "
        "create_graph=True) or torch.autograd.functional.hessian; first derivatives work under "
        "every torch.func transform."
    )
