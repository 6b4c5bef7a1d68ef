r"""Image quality metrics, batched: PSNR and SSIM for a given data range, and the two
conventions for :math:`[-1, 1]` images (standard: rescaled to :math:`[0, 1]`; the JFB paper's:
peak 1, 6.02 dB lower)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_float

__all__ = ["psnr", "psnr_paper", "psnr_standard", "ssim", "ssim_standard"]


def _check_pair(x: Tensor, ref: Tensor, *, min_dim: int = 2) -> None:
    for name, t in (("x", x), ("ref", ref)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
        if t.dim() < min_dim:
            raise ValueError(
                f"{name} must be batched with at least {min_dim} dimensions, got shape "
                f"{tuple(t.shape)}; add a batch dimension with {name}[None]"
            )
    if x.shape != ref.shape:
        raise ValueError(
            f"x and ref must have the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}"
        )


def psnr(x: Tensor, ref: Tensor, *, data_range: float) -> Tensor:
    r"""Peak signal-to-noise ratio per sample, in dB.

    .. math::

        \mathrm{PSNR}_L(x, r) = 10 \log_{10} \frac{L^2}{\mathrm{MSE}(x, r)},
        \qquad \mathrm{MSE} = \frac{1}{n} \sum_i (x_i - r_i)^2

    over each sample's ``n`` non-batch entries (``inf`` for identical samples), with
    :math:`L` = ``data_range``. It is invariant to mapping both images by
    :math:`v \mapsto a v + b` with :math:`L \mapsto |a| L`. There is deliberately no default
    :math:`L`: the same reconstruction reads 6.02 dB apart under the two conventions in use
    for :math:`[-1, 1]` images (:func:`psnr_standard`, :func:`psnr_paper`).

    Args:
        x: ``(B, *S)`` estimate.
        ref: ``(B, *S)`` reference.
        data_range: :math:`L > 0`, the width of the data range (``max - min``: 1 for
            :math:`[0, 1]` images, 2 for :math:`[-1, 1]`, 255 for 8-bit).

    Returns:
        ``(B,)`` tensor.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import psnr
        >>> ref = torch.zeros(1, 1, 4, 4)
        >>> psnr(ref + 0.1, ref, data_range=1.0).tolist()  # MSE 0.01 -> 20 dB
        [20.0]
    """
    _check_pair(x, ref)
    check_float("data_range", data_range, low=0.0, low_open=True)
    mse = (x - ref).pow(2).reshape(x.shape[0], -1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def psnr_paper(x: Tensor, ref: Tensor) -> Tensor:
    r"""PSNR of :math:`[-1, 1]` images with peak 1, the JFB paper's convention (Liu, Tong &
    Zhao, 2024): ``psnr(x, ref, data_range=1.0)``,

    .. math::

        \mathrm{PSNR}_{\text{paper}}(x, r) = 10 \log_{10} \frac{1}{\mathrm{MSE}(x, r)}
            = \mathrm{PSNR}_{\text{standard}}(x, r) - 20 \log_{10} 2,

    with the MSE on the :math:`[-1, 1]` scale. The range is 2 wide, so this reads
    :math:`20 \log_{10} 2 \approx 6.0206` dB below :func:`psnr_standard`; compare a number
    with a table only under the table's convention, and say which one you report.

    Args:
        x: ``(B, *S)`` estimate in :math:`[-1, 1]`.
        ref: ``(B, *S)`` reference in :math:`[-1, 1]`.

    Returns:
        ``(B,)`` tensor.
    """
    return psnr(x, ref, data_range=1.0)


def psnr_standard(x: Tensor, ref: Tensor) -> Tensor:
    r"""PSNR of :math:`[-1, 1]` images in the usual convention: rescaled to :math:`[0, 1]`,
    data range 1,

    .. math::

        \mathrm{PSNR}_{\text{standard}}(x, r)
            = \mathrm{PSNR}_1\big(\tfrac{x + 1}{2}, \tfrac{r + 1}{2}\big)
            = 10 \log_{10} \frac{4}{\mathrm{MSE}(x, r)}
            = \mathrm{PSNR}_{\text{paper}}(x, r) + 20 \log_{10} 2

    (equal to ``psnr(x, ref, data_range=2.0)``), the value scikit-image or torchmetrics give
    for the images mapped to :math:`[0, 1]`.

    Args:
        x: ``(B, *S)`` estimate in :math:`[-1, 1]`.
        ref: ``(B, *S)`` reference in :math:`[-1, 1]`.

    Returns:
        ``(B,)`` tensor.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import psnr_paper, psnr_standard
        >>> ref = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
        >>> round(psnr_standard(ref + 0.1, ref).item(), 4)  # 10 log10(4 / 0.01)
        26.0206
        >>> round(psnr_paper(ref + 0.1, ref).item(), 4)  # 10 log10(1 / 0.01)
        20.0
    """
    return psnr((x + 1) / 2, (ref + 1) / 2, data_range=1.0)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    grid = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(grid**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(
    x: Tensor,
    ref: Tensor,
    *,
    data_range: float,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    r"""Structural similarity (Wang, Bovik, Sheikh & Simoncelli, 2004) per sample.

    With Gaussian-weighted local means :math:`\mu`, variances :math:`\sigma^2` and covariance
    :math:`\sigma_{xr}` (window ``win_size`` = 11, standard deviation ``sigma`` = 1.5,
    population rather than sample covariance),

    .. math::

        \mathrm{SSIM}(x, r) = \frac{(2 \mu_x \mu_r + C_1)(2 \sigma_{xr} + C_2)}
            {(\mu_x^2 + \mu_r^2 + C_1)(\sigma_x^2 + \sigma_r^2 + C_2)}, \qquad
        C_1 = (K_1 L)^2, \; C_2 = (K_2 L)^2,

    averaged over every pixel whose window lies inside the image and over channels
    (:math:`L` = ``data_range``; :math:`C_1 = (0.01 L)^2`, :math:`C_2 = (0.03 L)^2` with the
    default :math:`K_1, K_2`). Scaling both images and :math:`L` by the same :math:`a > 0`
    leaves it unchanged; shifting both images does not (the luminance term depends on the
    means), which is why :func:`ssim_standard` maps :math:`[-1, 1]` images to
    :math:`[0, 1]` rather than passing :math:`L = 2`. There is deliberately no default
    :math:`L`, as for :func:`psnr`. This matches
    ``skimage.metrics.structural_similarity(x, r, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L, channel_axis=0)`` per image. It is written in
    torch rather than called from scikit-image so that it runs batched and on the GPU inside
    training and evaluation loops, and so the library needs no runtime dependency beyond
    torch and numpy.

    Args:
        x: ``(B, C, H, W)`` estimate, ``H, W >= win_size``.
        ref: ``(B, C, H, W)`` reference.
        data_range: :math:`L > 0`, the width of the data range (``max - min``: 1 for
            :math:`[0, 1]` images, 255 for 8-bit).
        win_size: Odd window side.
        sigma: Window standard deviation.
        k1: :math:`K_1`.
        k2: :math:`K_2`.

    Returns:
        ``(B,)`` tensor.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import ssim
        >>> x = torch.rand(2, 3, 16, 16)
        >>> ssim(x, x, data_range=1.0)
        tensor([1., 1.])
    """
    _check_pair(x, ref, min_dim=4)
    if x.dim() != 4:
        raise ValueError(f"x and ref must have shape (B, C, H, W), got {tuple(x.shape)}")
    check_float("data_range", data_range, low=0.0, low_open=True)
    check_float("sigma", sigma, low=0.0, low_open=True)
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd int, got {win_size!r}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(
            f"images of size {tuple(x.shape[-2:])} are smaller than the SSIM window "
            f"win_size={win_size}; use larger images or a smaller win_size"
        )
    batch, channels = x.shape[:2]
    g = _gaussian_window(win_size, sigma, x.dtype, x.device)

    def blur(t: Tensor) -> Tensor:  # 'valid' separable Gaussian filtering
        t = t.reshape(-1, 1, *t.shape[-2:])
        t = F.conv2d(t, g.view(1, 1, -1, 1))
        return F.conv2d(t, g.view(1, 1, 1, -1))

    mu_x, mu_r, xx, rr, xr = blur(torch.stack([x, ref, x * x, ref * ref, x * ref])).chunk(5)
    var_x = xx - mu_x**2
    var_r = rr - mu_r**2
    cov = xr - mu_x * mu_r
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    num = (2 * mu_x * mu_r + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_r**2 + c1) * (var_x + var_r + c2)
    return (num / den).reshape(batch, channels, -1).mean(dim=(1, 2))


def ssim_standard(x: Tensor, ref: Tensor) -> Tensor:
    r"""SSIM of :math:`[-1, 1]` images in the usual convention: rescaled to :math:`[0, 1]`,
    data range 1,

    .. math::

        \mathrm{SSIM}_{\text{standard}}(x, r)
            = \mathrm{SSIM}_{L=1}\big(\tfrac{x + 1}{2}, \tfrac{r + 1}{2}\big),

    the value scikit-image's ``structural_similarity(..., data_range=1)`` gives for the
    mapped images (see :func:`ssim` for the options that match it). Not the same as
    ``ssim(x, ref, data_range=2.0)``: SSIM is not invariant to a shift.

    Args:
        x: ``(B, C, H, W)`` estimate in :math:`[-1, 1]`.
        ref: ``(B, C, H, W)`` reference in :math:`[-1, 1]`.

    Returns:
        ``(B,)`` tensor.
    """
    return ssim((x + 1) / 2, (ref + 1) / 2, data_range=1.0)
