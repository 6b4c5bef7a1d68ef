"""The interface every backward rule implements."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._flat import FlatMap
from .._repr import compact_repr
from .._result import SolverResult

__all__ = ["VJP", "AbstractBackward"]

#: ``vjp(v)`` returns :math:`v^\top \partial f / \partial z` at the fixed point, flat ``(B, n)``.
VJP = Callable[[Tensor], Tensor]

#: Called during the backward pass with the rule and the adjoint solve's result.
OnResult = Callable[["AbstractBackward", "SolverResult | None"], None]


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

    @property
    def uses_vjp(self) -> bool:
        """Whether :meth:`adjoint` needs Jacobian products (``False`` skips the hook)."""
        return True

    @property
    def exact(self) -> bool:
        r"""Whether :math:`u` is the exact :math:`(I - J^\top)^{-1} g`, so that second-order
        gradients must see :math:`z^\star` move with the inputs (see :meth:`attach`)."""
        return False

    def attach(
        self,
        f_flat: FlatMap,
        z_star: Tensor,
        on_result: OnResult | None = None,
        *,
        leaves: Sequence[Tensor] = (),
    ) -> Tensor:
        r"""Return :math:`z^\star` (same value) carrying this rule's gradient.

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
        # Only rules that take VJPs need dL/dz through f; JFB skips that part of the backward.
        z_in = z_star.detach().requires_grad_(self.uses_vjp)
        with torch.enable_grad():
            fz = f_flat(z_in)
            if self.uses_vjp:
                fz = _ReplaceGradient.apply(fz, z_in, self, on_result, f_flat, *leaves)  # type: ignore[no-untyped-call]
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

    Under ``create_graph=True`` an exact rule does not return :math:`u` to ``f(z*)``, whose
    graph holds :math:`z^\\star` fixed: it re-attaches :math:`z^\\star` (so it moves with the
    inputs), solves the adjoint equation, attaches :math:`u` as the fixed point of
    :math:`u = J^\\top u + g` it is, and returns :math:`u^\\top \\partial f / \\partial` to the
    ``leaves`` directly.
    """

    @staticmethod
    def forward(
        ctx: Any,
        fz: Tensor,
        z_in: Tensor,
        rule: AbstractBackward,
        on_result: OnResult | None,
        f_flat: FlatMap | None,
        *leaves: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(fz, z_in, *leaves)
        ctx.rule = rule
        ctx.on_result = on_result
        ctx.f_flat = f_flat
        out: Tensor = fz.view_as(fz)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        fz, z_in, *leaves = ctx.saved_tensors
        rule: AbstractBackward = ctx.rule
        create_graph = torch.is_grad_enabled()
        if create_graph and rule.exact:
            if ctx.f_flat is None:
                raise RuntimeError(
                    "third- and higher-order gradients through ImplicitDifferentiation are not "
                    "supported; first and second order are exact"
                )
            grads = _exact_second_order(rule, ctx.f_flat, fz, z_in, grad, leaves, ctx.on_result)
            return (None, None, None, None, None, *grads)

        def vjp(v: Tensor) -> Tensor:
            out: Tensor
            (out,) = torch.autograd.grad(fz, z_in, v, retain_graph=True, create_graph=create_graph)
            return out

        with torch.enable_grad():
            u, result = rule.adjoint(vjp, grad)
        if ctx.on_result is not None:
            ctx.on_result(rule, result)
        return (u.to(grad.dtype), None, None, None, None, *(None for _ in leaves))


def _exact_second_order(
    rule: AbstractBackward,
    f_flat: FlatMap,
    fz: Tensor,
    z_in: Tensor,
    grad: Tensor,
    leaves: Sequence[Tensor],
    on_result: OnResult | None,
) -> list[Tensor | None]:
    r"""The gradients :math:`u^\top \partial f / \partial w` for the ``leaves`` :math:`w`,
    differentiable with the fixed point moving with them.

    :math:`u` solves :math:`u = J(z^\star)^\top u + g` with :math:`z^\star` re-attached, so
    it moves with :math:`g`, :math:`z^\star` and the leaves. The partial derivatives of ``f``
    are taken at the detached :math:`z^\star` (its total derivative would re-enter this
    backward), and their dependence on :math:`z^\star` is added back to first order with a
    zero-valued Jacobian-vector product in the direction of the attached :math:`z^\star`.
    """
    _check_leaves_cover(fz, z_in, leaves)
    wanted = [t for t in leaves if t.requires_grad]
    with torch.enable_grad():
        # z* carrying its exact derivative.
        z_att = rule.attach(f_flat, z_in.detach(), leaves=leaves)
        fz_att = f_flat(z_att)

        def vjp_value(v: Tensor) -> Tensor:
            (out,) = torch.autograd.grad(fz_att, z_att, v, retain_graph=True)
            return out

        u_star, result = rule.adjoint(vjp_value, grad.detach())
        if on_result is not None:
            on_result(rule, result)

        def adjoint_map(u: Tensor) -> Tensor:
            (jtu,) = torch.autograd.grad(fz_att, z_att, u, retain_graph=True, create_graph=True)
            return jtu + grad

        # u = J^T u + g is a fixed point too: attached by the same rule, u moves with g and
        # with everything J depends on. (Its own double backward would be a third order.)
        u = _attach_final(rule, adjoint_map, u_star.detach().to(grad.dtype))
        partial = torch.autograd.grad(
            fz, wanted, u, retain_graph=True, create_graph=True, allow_unused=True
        )
        held = torch.autograd.grad(
            fz, wanted, u.detach(), retain_graph=True, create_graph=True, allow_unused=True
        )
        # d partial / d z* along the attached z*, with u held (its own motion is in `partial`):
        # value 0, derivative (d partial / dz) dz*/dw. A Jacobian-vector product by two VJPs.
        moving = [i for i, h in enumerate(held) if h is not None and h.requires_grad]
        total = list(partial)
        if moving:
            probes = [torch.zeros_like(held[i], requires_grad=True) for i in moving]
            (through_z,) = torch.autograd.grad(
                [held[i] for i in moving],
                z_in,
                probes,
                retain_graph=True,
                create_graph=True,
                allow_unused=True,
            )
            if through_z is not None and through_z.requires_grad:
                direction = z_att - z_att.detach()
                corrections = torch.autograd.grad(
                    through_z, probes, direction, create_graph=True, allow_unused=True
                )
                for i, c in zip(moving, corrections, strict=True):
                    if c is not None:
                        # partial[i] is a tensor: allow_unused gives None by the graph alone,
                        # so where held[i] is one (i is moving), partial[i] is one too.
                        total[i] = total[i] + c
    by_id = {id(t): g for t, g in zip(wanted, total, strict=True)}
    return [by_id.get(id(t)) for t in leaves]


def _attach_final(
    rule: AbstractBackward, f_flat: Callable[[Tensor], Tensor], z_star: Tensor
) -> Tensor:
    """:meth:`AbstractBackward.attach` for a map whose own double backward is not supported."""
    z_in = z_star.detach().requires_grad_(True)
    with torch.enable_grad():
        fz = _ReplaceGradient.apply(f_flat(z_in), z_in, rule, None, None)  # type: ignore[no-untyped-call]
    out: Tensor = _ValueOfFirst.apply(z_star.detach(), fz)  # type: ignore[no-untyped-call]
    return out


def _check_leaves_cover(fz: Tensor, z_in: Tensor, leaves: Sequence[Tensor]) -> None:
    """Raise when ``f``'s graph reaches a tensor requiring grad that is not among ``leaves``.

    Walks the graph of one application of ``f`` (run only for a double backward), stopping at
    the leaves and at the graphs of non-leaf inputs.
    """
    known = {id(t) for t in leaves} | {id(z_in)}
    stops = {t.grad_fn for t in leaves if t.grad_fn is not None}
    seen: set[Any] = set()
    stack = [fz.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in known:
            raise RuntimeError(
                "a second-order gradient through ImplicitDifferentiation needs to know every "
                f"tensor f differentiates, but f uses one (shape {tuple(variable.shape)}) that "
                "is none of the tensors the library can see: the inputs of the DEQ (however "
                "nested), the parameters, buffers and tensor attributes of an nn.Module f, the "
                "closure of a plain f. Reached through a global? Pass it as an input, deq(x, w) "
                "with f(z, x, w), or hold it in an nn.Module f."
            )
        stack.extend(next_node for next_node, _ in node.next_functions)
