r"""The Tikhonov reconstruction, solved by :class:`~implicitlayers.linear.CG`."""

from __future__ import annotations

from torch import Tensor

from .._validate import check_float
from ..linear import CG
from ._linear_operator import LinearOperator, check_operator

__all__ = ["tikhonov_cg"]


def tikhonov_cg(
    operator: LinearOperator,
    d: Tensor,
    *,
    lam: float = 0.01,
    x0: Tensor | None = None,
    max_iter: int = 200,
    atol: float = 1e-8,
    rtol: float = 1e-6,
) -> Tensor:
    r"""Tikhonov-regularised least squares by conjugate gradients (the classical anchor).

    .. math::

        \hat x = \arg\min_x \tfrac12 \|A x - d\|^2 + \tfrac{\lambda}{2} \|x\|^2
        \quad\Longleftrightarrow\quad (A^\top A + \lambda I)\, \hat x = A^\top d,

    solved per sample by :class:`~implicitlayers.linear.CG` with its budget and stopping
    rule: a sample stops once :math:`\|A^\top d - (A^\top A + \lambda I) x\| \le
    \mathrm{atol} + \mathrm{rtol}\, \|A^\top d\|`, and ``max_iter`` counts every product with
    :math:`A^\top A + \lambda I`, the final one that measures the true residual included (so
    ``max_iter=k + 1`` allows ``k`` CG steps from zero; with ``x0`` one more product computes
    the first residual). ``rtol=0`` runs the whole budget unless the residual falls below
    ``atol``, a fixed-budget reconstruction.

    Only the reconstruction is returned. For the solve's statistics (per-sample status,
    true residual, products), call the solver directly:
    ``CG(max_iter=..., rtol=...).solve(lambda v: A.normal(v) + lam * v, A.adjoint(d), x0)``
    returns a :class:`~implicitlayers.SolverResult` whose ``z`` is this function's output.

    Args:
        operator: The forward operator :math:`A`, a :class:`LinearOperator` (its
            :meth:`~LinearOperator.normal` applies :math:`A^\top A`).
        d: ``(B, C, H, W)`` measurements.
        lam: Ridge weight :math:`\lambda \ge 0`.
        x0: ``(B, C, H, W)`` initial guess; zeros when ``None``.
        max_iter: Most products per sample, as in :class:`~implicitlayers.linear.CG`.
        atol: Absolute tolerance on the residual norm.
        rtol: Tolerance relative to :math:`\|A^\top d\|`.

    Returns:
        ``(B, C, H, W)`` reconstruction, differentiable by autograd through the iterations
        when computed with grad enabled.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import GaussianBlur, tikhonov_cg
        >>> A = GaussianBlur(5, 5.0, 1, dtype=torch.float64)
        >>> d = A(torch.rand(1, 1, 16, 16, dtype=torch.float64))
        >>> x = tikhonov_cg(A, d, lam=0.01, rtol=1e-12)
        >>> r = A.normal(x) + 0.01 * x - A.adjoint(d)
        >>> bool(r.norm() < 1e-8)
        True
    """
    operator = check_operator("operator", operator)
    check_float("lam", lam, low=0.0)
    solver = CG(max_iter=max_iter, atol=atol, rtol=rtol)
    if not isinstance(d, Tensor) or not d.is_floating_point():
        raise TypeError("d must be a floating-point tensor of shape (B, C, H, W)")

    def normal(x: Tensor) -> Tensor:
        return operator.normal(x) + lam * x

    z: Tensor = solver.solve(normal, operator.adjoint(d), x0).z
    return z
