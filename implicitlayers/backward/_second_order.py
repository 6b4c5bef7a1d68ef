"""Exact second-order gradients through an exact rule, under plain autograd."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._functions import Attach, Link

__all__ = ["exact_second_order"]


def exact_second_order(link: Link, grad: Tensor, leaves: Sequence[Tensor]) -> list[Tensor | None]:
    r"""The gradients :math:`u^\top \partial f / \partial w` for the ``leaves`` :math:`w`,
    differentiable with the fixed point moving with them (``create_graph=True``).

    ``f`` is applied again at :math:`z^\star` with :math:`z^\star` a leaf of its own.
    :math:`u` solves :math:`u = J(z^\star)^\top u + g` with :math:`z^\star` re-attached, so
    it moves with :math:`g`, :math:`z^\star` and the leaves. The partial derivatives of ``f``
    are taken at the detached :math:`z^\star` (its total derivative would re-enter this
    backward), and their dependence on :math:`z^\star` is added back to first order with a
    zero-valued Jacobian-vector product in the direction of the attached :math:`z^\star`.
    """
    rule, f_flat, on_result = link.rule, link.f_flat, link.on_result
    assert f_flat is not None  # only the first-level attach carries a second order
    with torch.enable_grad():
        z_in = link.z.detach().requires_grad_(True)
        fz = f_flat(z_in)
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
        u = _attach_final(link, adjoint_map, u_star.detach().to(grad.dtype))
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


def _attach_final(link: Link, f: Callable[[Tensor], Tensor], z_star: Tensor) -> Tensor:
    """The rule's attach for a map whose own second order is refused (a third order)."""
    z = z_star.detach()
    with torch.enable_grad():
        fz, vjp_fn = torch.func.vjp(f, z)[:2]
        final = Link(link.rule, lambda v: vjp_fn(v)[0], z, None, None, link.functorch, None)
        out: Tensor = Attach.apply(z, fz, final)  # type: ignore[no-untyped-call]
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
