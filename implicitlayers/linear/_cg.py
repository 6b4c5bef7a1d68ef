"""Conjugate gradients on a batch of matrix-free symmetric positive definite systems."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._result import SolverResult, Status
from ._base import AbstractLinearSolver, MatVec

__all__ = ["CG"]

_SUCCESS, _MAX_ITER = int(Status.SUCCESS), int(Status.MAX_ITER)
_NONFINITE, _BREAKDOWN = int(Status.NONFINITE), int(Status.BREAKDOWN)


@dataclass(frozen=True, kw_only=True, repr=False)
class CG(AbstractLinearSolver):
    r"""Conjugate gradients (Hestenes & Stiefel, 1952), batched and matrix-free.

    For a symmetric positive definite :math:`A_b` per sample, from :math:`x_0` with
    :math:`r_0 = p_0 = b - A x_0`,

    .. math::

        \alpha_k = \frac{r_k^\top r_k}{p_k^\top A p_k}, \quad
        x_{k+1} = x_k + \alpha_k p_k, \quad r_{k+1} = r_k - \alpha_k A p_k, \quad
        p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k,

    every inner product taken per sample over all non-batch dimensions, so a batch of
    ``(B, *S)`` images is ``B`` solves sharing each call of ``matvec``. A sample stops
    updating once its recurrence residual meets
    :math:`\|r_k\| \le \mathrm{atol} + \mathrm{rtol}\,\|b\|`; the solve ends when every sample
    has stopped (one host read per iteration) or after ``max_iter`` products, and then
    measures each sample's true residual :math:`\|b - A x\|` with one more product, so that
    ``SUCCESS`` means the true residual meets the tolerance at the returned ``z``.

    A curvature :math:`p^\top A p \le 0` means :math:`A_b` is not positive definite on the
    Krylov space: the sample stops as ``BREAKDOWN`` (unless its residual already meets the
    tolerance). A non-finite product stops it as ``NONFINITE``. The iteration is plain tensor
    arithmetic, so autograd can differentiate through it when it runs with grad enabled.
    Takes the options of :class:`~implicitlayers.linear.AbstractLinearSolver` (defaults
    ``max_iter=200``, ``atol=1e-8``, ``rtol=1e-6``); ``n_steps`` counts every product a
    sample received, the final one included.

    Example:
        >>> import torch
        >>> from implicitlayers.linear import CG
        >>> M = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> result = CG(rtol=1e-12).solve(lambda v: v @ M, b)
        >>> torch.allclose(result.z @ M, b), result.n_steps.tolist()  # 2 steps + 1 check
        (True, [3])

    References:
        M. R. Hestenes and E. Stiefel. *Methods of Conjugate Gradients for Solving Linear
        Systems.* Journal of Research of the National Bureau of Standards, 49(6):409--436,
        1952.
    """

    def solve(
        self, matvec: MatVec, rhs: Tensor, x0: Tensor | None = None, *, host_reads: bool = True
    ) -> SolverResult:
        r"""Solve :math:`A_b x_b = r_b` for every sample by conjugate gradients.

        Args:
            matvec: Applies the operators to a ``(B, *S)`` batch, sample by sample.
            rhs: ``(B, *S)`` floating-point right-hand sides :math:`r_b`.
            x0: ``(B, *S)`` initial guesses, same dtype and device; zeros when ``None``.
            host_reads: ``False``: no host read, exactly ``max_iter`` products (see
                :meth:`AbstractLinearSolver.solve
                <implicitlayers.linear.AbstractLinearSolver.solve>`).

        Returns:
            A :class:`~implicitlayers.SolverResult` (see
            :meth:`AbstractLinearSolver.solve <implicitlayers.linear.AbstractLinearSolver.solve>`).
        """
        if not isinstance(rhs, Tensor) or not rhs.is_floating_point() or rhs.dim() < 1:
            raise TypeError("rhs must be a floating-point tensor of shape (B, *S)")
        if x0 is not None and (not isinstance(x0, Tensor) or x0.shape != rhs.shape):
            raise ValueError(f"x0 must have rhs's shape {tuple(rhs.shape)}, got {x0!r}")
        batch = rhs.shape[0]
        view = (batch,) + (1,) * (rhs.dim() - 1)
        bound = _norm(rhs).mul_(self.rtol).add_(self.atol)
        steps = torch.zeros(batch, dtype=torch.long, device=rhs.device)
        n_f_evals = 0
        if x0 is None:
            x, r = torch.zeros_like(rhs), rhs
        else:
            x, r = x0, rhs - _apply(matvec, x0)
            steps = steps + 1
            n_f_evals += 1
        p, rs = r, _dot(r, r)
        status = torch.full((batch,), _MAX_ITER, dtype=torch.long, device=rhs.device)
        active = rs.sqrt() > bound
        for _ in range(self.max_iter - n_f_evals - 1):
            if host_reads and not bool(active.any()):
                break
            Ap = _apply(matvec, p)
            n_f_evals += 1
            steps = steps + active
            curvature = _dot(p, Ap)
            finite = torch.isfinite(curvature)
            ok = active & finite & (curvature > 0)
            status = torch.where(active & ~finite, _NONFINITE, status)
            status = torch.where(active & finite & (curvature <= 0), _BREAKDOWN, status)
            alpha = torch.where(ok, rs / torch.where(ok, curvature, 1.0), 0.0)
            x = x + alpha.view(view) * p
            r = r - alpha.view(view) * Ap
            rs_new = _dot(r, r)
            beta = torch.where(ok, rs_new / torch.where(ok, rs, 1.0), 0.0)
            p = torch.where(ok.view(view), r + beta.view(view) * p, p)
            rs = torch.where(ok, rs_new, rs)
            active = ok & (rs.sqrt() > bound)
        # The true residual at the returned x decides SUCCESS.
        residual = _norm(rhs - _apply(matvec, x))
        n_f_evals += 1
        steps = steps + 1
        converged = residual <= bound
        status = torch.where(torch.isfinite(residual), status, _NONFINITE)
        status = torch.where(converged, _SUCCESS, status)
        return SolverResult(
            z=x,
            status=status,
            converged=converged,
            n_steps=steps,
            residual=residual,
            n_f_evals=n_f_evals,
            linear=True,
        )


def _apply(matvec: MatVec, v: Tensor) -> Tensor:
    out = matvec(v)
    if not isinstance(out, Tensor) or out.shape != v.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"matvec must return a tensor shaped like its input {tuple(v.shape)}, got {got}"
        )
    return out


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner products over all non-batch dimensions."""
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


def _norm(v: Tensor) -> Tensor:
    out: Tensor = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)
    return out
