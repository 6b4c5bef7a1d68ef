r"""Jacobian regularisation: Hutchinson estimates of :math:`\|J_f(z)\|_F^2` per sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._flat import flat_map
from .._validate import check_int

__all__ = ["jacobian_frobenius", "jacobian_penalty"]


def jacobian_frobenius(
    fz: Tensor,
    z: Tensor,
    *,
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    normalize: bool = False,
) -> Tensor:
    r"""Hutchinson estimate of :math:`\|J_f(z)\|_F^2` per sample, from an existing graph.

    The Jacobian regulariser of Bai, Koltun & Kolter (2021). With Gaussian probes
    :math:`\varepsilon \sim \mathcal N(0, I)` in the output space,

    .. math::

        \mathbb E_\varepsilon \big\|\varepsilon^\top J\big\|_2^2
            = \mathbb E_\varepsilon\, \varepsilon^\top J J^\top \varepsilon
            = \operatorname{tr}(J J^\top) = \|J\|_F^2,
        \qquad
        \widehat{\|J\|_F^2} = \frac{1}{m} \sum_{i=1}^{m} \big\|\varepsilon_i^\top J\big\|_2^2,

    an unbiased estimate, with :math:`m` = ``n_probes`` and each
    :math:`\varepsilon_i^\top J` one vector-Jacobian product through the graph of ``fz``
    (``torch.autograd.grad`` with ``retain_graph=True``). Its variance is
    :math:`2\|J J^\top\|_F^2 / m` for Gaussian probes; Rademacher probes (random signs) have a
    slightly smaller one, :math:`2(\|J J^\top\|_F^2 - \sum_j (J J^\top)_{jj}^2) / m`, and are
    an equally valid choice, but this function draws Gaussian ones.

    The graph of ``fz`` is kept, so the caller can still backpropagate a loss through ``fz``
    afterwards. With ``create_graph=True`` the estimate is itself differentiable with respect to
    everything ``fz`` depends on (the parameters of ``f``), so ``loss + gamma * estimate.mean()``
    trains ``f`` towards a smaller Jacobian. The paper's regulariser is normalised by the
    dimension, :math:`\|J\|_F^2 / n`; ``normalize=True`` gives that.

    Each row of the result is the squared norm of row ``b`` of :math:`\varepsilon^\top J`, so
    it is sample ``b``'s own :math:`\|J_b\|_F^2` when ``f`` treats the samples independently
    (no batch norm in training mode); otherwise it also counts the cross-sample blocks
    :math:`\partial f_{b'} / \partial z_b`.

    Args:
        fz: ``(B, n)`` output of ``f`` at ``z``, with an autograd graph that reaches ``z``.
        z: ``(B, n)`` point, a tensor that requires grad (e.g.
            ``z = z_star.detach().requires_grad_()``, then ``fz = f(z, x)``).
        n_probes: Number of probes :math:`m`, at least 1. The paper uses one per training step.
        generator: Draws the probes; fix its seed for reproducible estimates.
        create_graph: Build the graph of the VJPs, so that the estimate can be differentiated.
            Pass ``False`` to only monitor it (cheaper; the result is then detached).
        normalize: Divide by :math:`n`, the per-sample dimension of ``z``, as the paper does.

    Returns:
        ``(B,)`` tensor, the estimate for each sample (non-negative).

    Raises:
        TypeError: If ``fz`` or ``z`` is not a floating-point tensor.
        ValueError: If the shapes are not ``(B, n)`` with a common ``B``, if ``z`` does not
            require grad, or if ``fz`` has no graph.

    Example:
        >>> import torch
        >>> from implicitlayers.diagnostics import jacobian_frobenius
        >>> W = torch.tensor([[0.5, 0.2], [0.0, 0.3]])
        >>> z = torch.randn(3, 2).requires_grad_()
        >>> fz = z @ W.T                            # J = W, ||W||_F^2 = 0.38
        >>> g = torch.Generator().manual_seed(0)
        >>> est = jacobian_frobenius(fz, z, n_probes=4000, generator=g)
        >>> est.shape, bool(torch.allclose(est, torch.tensor(0.38), rtol=0.1))
        (torch.Size([3]), True)
    """
    _check_flat("fz", fz)
    _check_flat("z", z)
    if fz.shape[0] != z.shape[0]:
        raise ValueError(
            f"fz and z must share the batch size, got fz of shape {tuple(fz.shape)} and z of "
            f"shape {tuple(z.shape)}; pass f's output at z and z itself, both flattened to (B, n)"
        )
    check_int("n_probes", n_probes, minimum=1)
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be a bool, got {create_graph!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    if not z.requires_grad:
        raise ValueError(
            "z must require grad, got a tensor with requires_grad=False; use "
            "z = z.detach().requires_grad_() and compute fz = f(z, ...) from it"
        )
    if not fz.requires_grad:
        raise ValueError(
            "fz has no autograd graph (requires_grad=False); compute it from z under "
            "torch.enable_grad(), not under torch.no_grad() or torch.inference_mode()"
        )

    probes = torch.randn(
        (n_probes, *fz.shape), generator=generator, dtype=fz.dtype, device=fz.device
    )
    total = fz.new_zeros(fz.shape[0])
    for eps in probes:
        (vjp,) = torch.autograd.grad(
            fz, z, eps, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        if vjp is None:  # fz does not depend on z: J = 0
            return fz.new_zeros(fz.shape[0])
        total = total + vjp.pow(2).sum(dim=1)
    estimate = total / n_probes
    if normalize:
        estimate = estimate / z.shape[1]
    return estimate if create_graph else estimate.detach()


def jacobian_penalty(
    f: Callable[..., Any],
    z: Any,
    *inputs: Any,
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    normalize: bool = False,
) -> Tensor:
    r"""Jacobian regulariser of a DEQ cell at a point: :math:`\|\partial f(z, x)/\partial z\|_F^2`.

    Evaluates ``f`` once at the detached point (``z`` as a constant: no gradient flows back
    into ``z``) and returns the Hutchinson estimate of :func:`jacobian_frobenius`,

    .. math::

        R(\theta) = \frac{1}{m} \sum_{i=1}^{m}
            \Big\|\varepsilon_i^\top \frac{\partial f(z, x; \theta)}{\partial z}\Big\|_2^2
            \approx \|J_f(z)\|_F^2, \qquad \varepsilon_i \sim \mathcal N(0, I),

    differentiable with respect to the parameters :math:`\theta` of ``f`` and its ``inputs``.
    Bai, Koltun & Kolter (2021) add :math:`\gamma R / n` at the fixed point :math:`z^\star` to
    the training loss (``normalize=True`` divides by :math:`n`), which keeps the Jacobian
    small, the fixed point well conditioned and the forward and backward solves short.

    The graph of the VJPs is built whenever autograd is recording at the call; under
    ``torch.no_grad()`` the estimate is computed all the same (``f`` runs under
    ``torch.enable_grad()``) but returned detached, for monitoring.

    Args:
        f: The cell, called as ``f(z, *inputs)``; it returns a state with the structure of
            ``z``.
        z: The point, ``(B, *S)`` or a tuple/list/dict of such tensors (typically the fixed
            point of a solve). It is detached.
        *inputs: Passed to ``f`` unchanged (gradients do flow into them).
        n_probes: Number of Gaussian probes, at least 1.
        generator: Draws the probes; fix its seed for reproducible estimates.
        normalize: Divide by :math:`n`, the flat size of one sample of ``z``.

    Returns:
        ``(B,)`` tensor, the estimate for each sample.

    Example:
        >>> import torch
        >>> from implicitlayers.diagnostics import jacobian_penalty
        >>> lin = torch.nn.Linear(4, 4)
        >>> f = lambda z, x: torch.tanh(lin(z) + x)
        >>> x = torch.randn(2, 4)
        >>> penalty = jacobian_penalty(f, torch.zeros(2, 4), x, n_probes=2)
        >>> penalty.shape
        torch.Size([2])
        >>> penalty.mean().backward()               # gradients reach lin.weight
        >>> lin.weight.grad is not None
        True
    """
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, *inputs), got {f!r}")
    check_int("n_probes", n_probes, minimum=1)
    f_flat, flat = flat_map(f, z, inputs)
    return penalty_at(f_flat, flat, n_probes=n_probes, generator=generator, normalize=normalize)


def penalty_at(
    f_flat: Callable[[Tensor], Tensor],
    flat: Tensor,
    *,
    n_probes: int,
    generator: torch.Generator | None = None,
    normalize: bool = False,
) -> Tensor:
    """:func:`jacobian_penalty` of the flat map ``f_flat`` at the flat point ``flat``
    (detached), differentiable in what ``f_flat`` depends on whenever autograd records."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        flat = flat.detach().requires_grad_()
        fz = f_flat(flat)
        if not fz.requires_grad:  # f ignores z and has no parameters: J = 0
            return fz.new_zeros(fz.shape[0])
        return jacobian_frobenius(
            fz,
            flat,
            n_probes=n_probes,
            generator=generator,
            create_graph=create_graph,
            normalize=normalize,
        )


def _check_flat(name: str, value: Any) -> None:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(
            f"{name} must be flat, of shape (B, n), got shape {tuple(value.shape)}; flatten the "
            "state first (or use jacobian_penalty, which accepts any state)"
        )
