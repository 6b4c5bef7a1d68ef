r"""Batched conjugate gradients, and the Tikhonov reconstruction built on it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._validate import check_float, check_int
from ._linear_operator import LinearOperator, check_operator

__all__ = ["batch_dot", "conjugate_gradient", "tikhonov_cg"]


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner products: ``(B, *S) x (B, *S) -> (B,)``."""
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


def conjugate_gradient(
    apply_op: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    x0: Tensor | None = None,
    steps: int,
    tol: float = 0.0,
) -> Tensor:
    r"""Solve :math:`M x = b` for a symmetric positive definite :math:`M`, one system per sample.

    Conjugate gradients (Hestenes & Stiefel, 1952) with every inner product taken per sample
    over the non-batch dimensions, so a batch of ``B`` images is ``B`` independent solves
    sharing each call of ``apply_op``:

    .. math::

        \alpha_k = \frac{r_k^\top r_k}{p_k^\top M p_k}, \quad
        x_{k+1} = x_k + \alpha_k p_k, \quad r_{k+1} = r_k - \alpha_k M p_k, \quad
        p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k.

    A sample stops updating once :math:`\|r_k\| \le \mathrm{tol}\, \|b\|` (or its residual is
    exactly zero); the loop ends early when every sample has stopped (checked only when
    ``tol > 0``, since the check synchronises with the GPU). The iteration is plain tensor
    arithmetic, so autograd can differentiate through it.

    Args:
        apply_op: :math:`x \mapsto M x` on ``(B, *S)`` batches, symmetric positive definite
            per sample.
        b: ``(B, *S)`` right-hand sides.
        x0: ``(B, *S)`` initial guess; zeros when ``None``.
        steps: Most iterations (each one call of ``apply_op``); at most ``n`` are needed in
            exact arithmetic for ``n`` unknowns per sample.
        tol: Relative residual tolerance; ``0`` runs all ``steps``.

    Returns:
        ``(B, *S)`` approximate solution.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import conjugate_gradient
        >>> M = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> x = conjugate_gradient(lambda v: v @ M, b, steps=2)
        >>> torch.allclose(x @ M, b)
        True
    """
    if not callable(apply_op):
        raise TypeError(f"apply_op must be callable as apply_op(x) -> M x, got {apply_op!r}")
    if not isinstance(b, Tensor) or not b.is_floating_point() or b.dim() < 1:
        raise TypeError("b must be a floating-point tensor of shape (B, *S)")
    check_int("steps", steps, minimum=0)
    check_float("tol", tol, low=0.0)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b
    else:
        if x0.shape != b.shape:
            raise ValueError(f"x0 must have b's shape {tuple(b.shape)}, got {tuple(x0.shape)}")
        x = x0
        r = b - apply_op(x0)
    view = (b.shape[0],) + (1,) * (b.dim() - 1)
    p = r
    rs = batch_dot(r, r)
    threshold = tol**2 * batch_dot(b, b)
    for _ in range(steps):
        active = rs > threshold
        if tol > 0 and not bool(active.any()):
            break
        Mp = apply_op(p)
        pMp = batch_dot(p, Mp)
        ok = active & (pMp > 0)
        alpha = torch.where(ok, rs / torch.where(ok, pMp, 1.0), 0.0)
        x = x + alpha.view(view) * p
        r = r - alpha.view(view) * Mp
        rs_new = batch_dot(r, r)
        beta = torch.where(ok, rs_new / torch.where(ok, rs, 1.0), 0.0)
        p = torch.where(ok.view(view), r + beta.view(view) * p, p)
        rs = torch.where(ok, rs_new, rs)
    return x


def tikhonov_cg(
    operator: LinearOperator,
    d: Tensor,
    *,
    lam: float = 0.01,
    steps: int = 60,
    x0: Tensor | None = None,
) -> Tensor:
    r"""Tikhonov-regularised least squares by conjugate gradients (the classical anchor).

    .. math::

        \hat x = \arg\min_x \tfrac12 \|A x - d\|^2 + \tfrac{\lambda}{2} \|x\|^2
        \quad\Longleftrightarrow\quad (A^\top A + \lambda I)\, \hat x = A^\top d.

    Args:
        operator: The forward operator :math:`A`, a :class:`LinearOperator` (its
            :meth:`~LinearOperator.normal` applies :math:`A^\top A`).
        d: ``(B, C, H, W)`` measurements.
        lam: Ridge weight :math:`\lambda \ge 0`.
        steps: CG iterations.
        x0: Initial guess; zeros when ``None``.

    Returns:
        ``(B, C, H, W)`` reconstruction.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import GaussianBlur, tikhonov_cg
        >>> A = GaussianBlur(5, 5.0, 1, dtype=torch.float64)
        >>> d = A(torch.rand(1, 1, 16, 16, dtype=torch.float64))
        >>> x = tikhonov_cg(A, d, lam=0.01, steps=100)
        >>> r = A.normal(x) + 0.01 * x - A.adjoint(d)
        >>> bool(r.norm() < 1e-8)
        True
    """
    operator = check_operator("operator", operator)
    check_float("lam", lam, low=0.0)

    def normal(x: Tensor) -> Tensor:
        return operator.normal(x) + lam * x

    return conjugate_gradient(normal, operator.adjoint(d), x0=x0, steps=steps)
