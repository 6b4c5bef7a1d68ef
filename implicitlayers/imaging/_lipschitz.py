r"""Lipschitz constants: local estimates by power iteration, certified bounds for convolutions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._validate import check_int

__all__ = ["circular_conv_norm", "estimate_lipschitz"]


def estimate_lipschitz(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    power_iterations: int = 50,
    generator: torch.Generator | None = None,
) -> float:
    r"""Estimate :math:`\|J_{fn}(x)\|_2`, the local Lipschitz constant of ``fn`` at ``x``.

    Power iteration on :math:`J^\top J`, with :math:`J v` and :math:`J^\top u` computed by
    autograd (a vector-Jacobian product, and a Jacobian-vector product by double backward
    through it), evaluating ``fn`` once:

    .. math::

        v_{k+1} = \frac{J^\top J v_k}{\|J^\top J v_k\|}, \qquad
        \hat L = \|J v_K\| \;\le\; \|J(x)\|_2 \;\le\; \operatorname{Lip}(fn).

    Both inequalities make the result a **lower bound** of the global Lipschitz constant: the
    Rayleigh quotient never exceeds the top singular value, and a local Jacobian norm never
    exceeds the global constant. Use it to test a claimed bound (an estimate above a bound
    disproves it), not to certify one. For a linear ``fn`` it estimates the operator norm.

    For a batch ``x`` of shape ``(B, *S)`` the power iteration runs on the whole batch, so for
    a map that treats samples independently it estimates the largest per-sample norm.

    Args:
        fn: The map, differentiable (almost everywhere) in its input. Modules with
            training-mode side effects (batch norm statistics, power-iteration buffers) are
            best put in ``eval()`` first.
        x: The point, ``(B, *S)``.
        power_iterations: Power iterations :math:`K`.
        generator: Seeds the random starting vector.

    Returns:
        The estimate :math:`\hat L \ge 0` as a Python float.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import estimate_lipschitz
        >>> W = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> round(estimate_lipschitz(lambda x: x @ W.T, torch.randn(1, 3)), 4)
        3.0
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(x) -> Tensor, got {fn!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    check_int("power_iterations", power_iterations, minimum=1)
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        y = fn(x_)
        if not isinstance(y, Tensor):
            raise TypeError(f"fn must return a Tensor, got {type(y).__name__}")
        if not y.requires_grad:  # constant map
            return 0.0
        u = torch.zeros_like(y, requires_grad=True)
        (vjp_u,) = torch.autograd.grad(y, x_, u, create_graph=True, allow_unused=True)
        if vjp_u is None:
            return 0.0

        def jvp(v: Tensor) -> Tensor:
            (out,) = torch.autograd.grad(vjp_u, u, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(y) if out is None else out

        def vjp(w: Tensor) -> Tensor:
            (out,) = torch.autograd.grad(y, x_, w, retain_graph=True, allow_unused=True)
            return torch.zeros_like(x_) if out is None else out

        v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        v = v / v.norm()
        for _ in range(power_iterations):
            w = vjp(jvp(v))
            norm = w.norm()
            if float(norm) == 0.0:
                return 0.0
            v = w / norm
        return float(jvp(v).norm())


def circular_conv_norm(weight: Tensor, size: tuple[int, int]) -> float:
    r"""Exact operator norm of a stride-1 convolution with periodic boundaries on a torus.

    A circular convolution is block-diagonalised by the 2-D DFT (Sedghi, Gupta & Long, 2019):
    at each frequency :math:`\omega` it acts on the channels as the matrix
    :math:`\hat W(\omega) = \sum_{a,b} W_{:,:,a,b}\, e^{-i (\omega_1 a + \omega_2 b)}`, so

    .. math::

        \|\mathrm{conv}_W\|_{2} = \max_{\omega \in \text{DFT grid}}
            \sigma_{\max}\big(\hat W(\omega)\big),

    computed here in float64 by batched singular values over the grid (the real-input half
    only; the other half holds complex conjugates).

    A zero-padded ('same') convolution on ``H x W`` images is a compression of the circular
    one on an ``(H + K - 1) x (W + K - 1)`` torus (embed the image in the larger grid with a
    border of zeros, convolve, crop; the wrap-around only reads zeros), so
    ``circular_conv_norm(weight, (H + K - 1, W + K - 1))`` is a guaranteed upper bound of the
    zero-padded convolution's norm at every input size up to ``H x W``.

    Args:
        weight: ``(C_out, C_in, K_h, K_w)`` convolution weight.
        size: ``(N_1, N_2)`` torus size, at least the kernel size.

    Returns:
        The norm as a Python float.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError("weight must be a (C_out, C_in, K_h, K_w) tensor")
    n1, n2 = size
    if n1 < weight.shape[-2] or n2 < weight.shape[-1]:
        raise ValueError(f"size {size} must be at least the kernel size {tuple(weight.shape[-2:])}")
    with torch.no_grad():
        spectrum = torch.fft.rfft2(weight.detach().to(torch.float64), s=(n1, n2))
        mats = spectrum.permute(2, 3, 0, 1).reshape(-1, weight.shape[0], weight.shape[1])
        best = 0.0
        for chunk in mats.split(2048):
            best = max(best, float(torch.linalg.matrix_norm(chunk, ord=2).max()))
    return best
