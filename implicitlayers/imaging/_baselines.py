r"""Classical deblurring baselines for the comparison table: direct inverse, gradient descent,
total variation (Chambolle-Pock) and Plug-and-Play proximal gradient."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_float, check_int
from ._linear_operator import LinearOperator, check_operator

__all__ = ["direct_inverse", "gradient_descent", "operator_norm", "pnp_deblur", "tv_deblur"]


def operator_norm(operator: LinearOperator, like: Tensor, *, power_iterations: int = 50) -> float:
    r""":math:`\|A\|_2`, as the step sizes of the baselines need it.

    The operator's certified :meth:`~LinearOperator.norm_bound` when it is finite; otherwise
    (the default ``inf``) a power-iteration estimate on :math:`A^\top A` from a random
    start shaped like ``like``,

    .. math::

        v_{k+1} = \frac{A^\top A v_k}{\|A^\top A v_k\|}, \qquad \hat L = \|A v_K\|
        \le \|A\|_2,

    which approaches the norm from below.

    Args:
        operator: :math:`A`, a :class:`LinearOperator`.
        like: A tensor shaped like the operator's inputs (only its shape, dtype and device
            are used).
        power_iterations: Power iterations :math:`K` when there is no finite bound.

    Returns:
        The bound or the estimate, as a Python float.
    """
    operator = check_operator("operator", operator)
    check_int("power_iterations", power_iterations, minimum=1)
    bound = float(operator.norm_bound())
    if math.isfinite(bound):
        return bound
    with torch.no_grad():
        v = torch.randn_like(like)
        v = v / v.norm()
        for _ in range(power_iterations):
            w = operator.normal(v)
            v = w / w.norm().clamp_min(torch.finfo(w.dtype).tiny)
        return float(operator(v).norm())


def _default_x0(operator: LinearOperator, d: Tensor, x0: Tensor | None) -> Tensor:
    return operator.adjoint(d) if x0 is None else x0


def direct_inverse(operator: LinearOperator, d: Tensor, *, eps: float = 0.0) -> Tensor:
    r"""Deconvolution by division in the Fourier domain.

    .. math::

        \hat x = \mathcal{F}^{-1}\Big(\frac{\overline{\hat h}\, \mathcal{F} d}
            {|\hat h|^2 + \epsilon}\Big),

    with :math:`\hat h` the blur's transfer function (``operator.transfer_function(H, W)``,
    see :meth:`GaussianBlur.transfer_function`); for :math:`\epsilon = 0` this is
    :math:`\mathcal{F}^{-1}(\mathcal{F} d / \hat h)`. It is exact for a circular blur
    (``GaussianBlur(circular=True)``) and noiseless data, and an approximation at the borders
    for a zero-padded one. With noise it shows why deblurring needs regularisation: frequencies
    where :math:`|\hat h|` is small amplify the noise by :math:`1 / |\hat h|`; a positive
    :math:`\epsilon` (a Wiener-type filter) tempers that.

    Args:
        operator: A shift-invariant :class:`LinearOperator` with a
            ``transfer_function(height, width)`` method (a :class:`GaussianBlur`).
        d: ``(B, C, H, W)`` measurements.
        eps: :math:`\epsilon \ge 0`.

    Returns:
        ``(B, C, H, W)`` reconstruction.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import GaussianBlur, direct_inverse
        >>> A = GaussianBlur(5, 5.0, 1, circular=True, dtype=torch.float64)
        >>> x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
        >>> bool((direct_inverse(A, A(x)) - x).abs().max() < 1e-8)
        True
    """
    operator = check_operator("operator", operator)
    transfer = getattr(operator, "transfer_function", None)
    if not callable(transfer):
        raise TypeError(
            "operator must have a transfer_function(height, width) method (GaussianBlur has "
            f"one), got {type(operator).__name__}"
        )
    check_float("eps", eps, low=0.0)
    h = transfer(int(d.shape[-2]), int(d.shape[-1])).to(device=d.device)
    spectrum = torch.fft.fft2(d)
    if eps == 0.0:
        if bool((h.abs() == 0).any()):
            raise ValueError(
                "the blur's transfer function has exact zeros at this image size, so the "
                "direct inverse does not exist; pass eps > 0"
            )
        out = spectrum / h
    else:
        out = spectrum * h.conj() / (h.abs() ** 2 + eps)
    recon: Tensor = torch.fft.ifft2(out)
    return recon.real.to(d.dtype)


def gradient_descent(
    operator: LinearOperator,
    d: Tensor,
    *,
    max_iter: int,
    step_size: float | None = None,
    tikhonov: float = 0.0,
    x0: Tensor | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    r"""Gradient descent (Landweber iteration) on Tikhonov-regularised least squares.

    .. math::

        x_{k+1} = x_k - \tau \big(A^\top (A x_k - d) + \lambda x_k\big), \qquad
        f(x) = \tfrac12 \|A x - d\|^2 + \tfrac{\lambda}{2} \|x\|^2.

    For :math:`0 < \tau \le 1 / (\|A\|^2 + \lambda)` the objective decreases monotonically;
    with :math:`\lambda = 0` early stopping is the regulariser.

    Args:
        operator: :math:`A`.
        d: ``(B, C, H, W)`` measurements.
        max_iter: Iterations (all of them are run).
        step_size: :math:`\tau`; default :math:`1 / (\|A\|^2 + \lambda)` (1 for a normalised
            blur without Tikhonov term), with :math:`\|A\|` from :func:`operator_norm`.
        tikhonov: :math:`\lambda \ge 0`.
        x0: Start; :math:`A^\top d` when ``None``.
        callback: Called as ``callback(k, x_k)`` after each step ``k = 1..max_iter``.

    Returns:
        ``(B, C, H, W)`` reconstruction.
    """
    operator = check_operator("operator", operator)
    check_int("max_iter", max_iter, minimum=0)
    check_float("tikhonov", tikhonov, low=0.0)
    if step_size is None:
        step_size = 1.0 / (operator_norm(operator, d) ** 2 + tikhonov)
    check_float("step_size", step_size, low=0.0, low_open=True)
    x = _default_x0(operator, d, x0)
    for k in range(1, max_iter + 1):
        grad = operator.adjoint(operator(x) - d)
        if tikhonov:
            grad = grad + tikhonov * x
        x = x - step_size * grad
        if callback is not None:
            callback(k, x)
    return x


def _grad2d(x: Tensor) -> tuple[Tensor, Tensor]:
    """Forward differences with Neumann boundaries (zero difference at the last row/col)."""
    gx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1))
    gy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return gx, gy


def _grad2d_adjoint(px: Tensor, py: Tensor) -> Tensor:
    """The exact adjoint of :func:`_grad2d` (minus the discrete divergence)."""
    px, py = px[..., :, :-1], py[..., :-1, :]
    return (F.pad(px, (1, 0)) - F.pad(px, (0, 1))) + (
        F.pad(py, (0, 0, 1, 0)) - F.pad(py, (0, 0, 0, 1))
    )


def tv_deblur(
    operator: LinearOperator,
    d: Tensor,
    *,
    lam: float,
    max_iter: int = 200,
    x0: Tensor | None = None,
) -> Tensor:
    r"""Total-variation deblurring by the Chambolle-Pock primal-dual algorithm.

    Solves

    .. math::

        \min_x \tfrac12 \|A x - d\|^2 + \lambda \operatorname{TV}(x), \qquad
        \operatorname{TV}(x) = \sum_{c,i,j} \sqrt{(\nabla_1 x)_{cij}^2 + (\nabla_2 x)_{cij}^2}

    (isotropic, per channel, forward differences) as :math:`\min_x F(Kx)` with
    :math:`K = (A, \nabla)` and :math:`F(y, p) = \frac12\|y - d\|^2 + \lambda \|p\|_{2,1}`
    (Chambolle & Pock, 2011, Algorithm 1 with :math:`G = 0`, :math:`\theta = 1`):

    .. math::

        y &\leftarrow \frac{y + \sigma (A \bar x - d)}{1 + \sigma}, \qquad
        p \leftarrow \Pi_{\|\cdot\|_2 \le \lambda}\big(p + \sigma \nabla \bar x\big), \\
        x^+ &= x - \tau (A^\top y + \nabla^\top p), \qquad \bar x = 2 x^+ - x.

    It converges when :math:`\tau \sigma L^2 < 1`, :math:`L = \|K\|`; we use
    :math:`L^2 = \|A\|^2 + 8 \ge \|K\|^2` (:math:`\|\nabla\|^2 \le 8`) and
    :math:`\tau = \sigma = 0.99 / L`.

    Args:
        operator: :math:`A` (its norm from :func:`operator_norm`).
        d: ``(B, C, H, W)`` measurements.
        lam: :math:`\lambda > 0`.
        max_iter: Iterations (all of them are run).
        x0: Start; :math:`A^\top d` when ``None``.

    Returns:
        ``(B, C, H, W)`` reconstruction.
    """
    operator = check_operator("operator", operator)
    check_float("lam", lam, low=0.0, low_open=True)
    check_int("max_iter", max_iter, minimum=0)
    lipschitz = (operator_norm(operator, d) ** 2 + 8.0) ** 0.5
    tau = sigma = 0.99 / lipschitz
    x = _default_x0(operator, d, x0)
    x_bar = x
    y = torch.zeros_like(d)
    px, py = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(max_iter):
        y = (y + sigma * (operator(x_bar) - d)) / (1 + sigma)
        gx, gy = _grad2d(x_bar)
        qx, qy = px + sigma * gx, py + sigma * gy
        scale = (torch.sqrt(qx**2 + qy**2) / lam).clamp_min(1.0)
        px, py = qx / scale, qy / scale
        x_next = x - tau * (operator.adjoint(y) + _grad2d_adjoint(px, py))
        x_bar = 2 * x_next - x
        x = x_next
    return x


def pnp_deblur(
    operator: LinearOperator,
    d: Tensor,
    denoiser: Callable[[Tensor], Tensor],
    *,
    max_iter: int = 30,
    step_size: float = 1.0,
    strength: float = 1.0,
    x0: Tensor | None = None,
) -> Tensor:
    r"""Plug-and-Play proximal gradient (Venkatakrishnan et al., 2013): a denoiser in place of a
    proximal operator.

    .. math::

        v_k = x_k - \tau A^\top (A x_k - d), \qquad
        x_{k+1} = (1 - s)\, v_k + s\, D(v_k),

    with :math:`\tau` = ``step_size`` and :math:`s` = ``strength``; :math:`s = 0` is plain
    gradient descent. Run it under ``torch.no_grad()`` unless you mean to differentiate
    through the unrolled iterations.

    Args:
        operator: :math:`A`.
        d: ``(B, C, H, W)`` measurements.
        denoiser: :math:`D`, ``(B, C, H, W)`` to the same shape (e.g. a trained
            :class:`DnCNN` plus the identity, or :class:`ContractiveDnCNN`).
        max_iter: Iterations (all of them are run).
        step_size: :math:`\tau > 0`.
        strength: :math:`s \in [0, 1]`.
        x0: Start; :math:`A^\top d` when ``None``.

    Returns:
        ``(B, C, H, W)`` reconstruction.
    """
    operator = check_operator("operator", operator)
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as denoiser(x), got {denoiser!r}")
    check_int("max_iter", max_iter, minimum=0)
    check_float("step_size", step_size, low=0.0, low_open=True)
    check_float("strength", strength, low=0.0, high=1.0)
    x = _default_x0(operator, d, x0)
    for _ in range(max_iter):
        v = x - step_size * operator.adjoint(operator(x) - d)
        x = v if strength == 0.0 else torch.lerp(v, denoiser(v), strength)
    return x
