r"""The Gaussian blur of DE-GRAD (a :class:`LinearOperator` with an exact adjoint), and noise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_float, check_int
from ._linear_operator import LinearOperator

__all__ = ["GaussianBlur", "add_noise", "gaussian_kernel"]


def gaussian_kernel(
    kernel_size: int,
    std: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""A normalised, isotropic 2-D Gaussian kernel.

    .. math::

        k_{ij} = \frac{g_{ij}}{\sum_{ab} g_{ab}}, \qquad
        g_{ij} = \exp\!\Big(-\frac{(i - c)^2 + (j - c)^2}{2 \sigma^2}\Big),
        \quad c = \frac{\text{kernel\_size} - 1}{2}.

    It is nonnegative and sums to 1, so the blur it defines has operator norm at most 1
    (Young's inequality, :math:`\|k * x\|_2 \le \|k\|_1 \|x\|_2`).

    Args:
        kernel_size: Odd side length :math:`K` of the square kernel.
        std: Standard deviation :math:`\sigma > 0` in pixels.
        dtype: Floating dtype of the result (the values are computed in float64 first).
        device: Device of the result.

    Returns:
        ``(K, K)`` tensor summing to 1.

    Example:
        >>> from implicitlayers.imaging import gaussian_kernel
        >>> k = gaussian_kernel(5, 5.0)
        >>> k.shape, round(k.sum().item(), 6)
        (torch.Size([5, 5]), 1.0)
    """
    _check_kernel_size(kernel_size)
    check_float("std", std, low=0.0, low_open=True)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}; pass torch.float32/64")
    centre = (kernel_size - 1) / 2
    grid = torch.arange(kernel_size, dtype=torch.float64) - centre
    g1 = torch.exp(-(grid**2) / (2 * std**2))
    kernel = torch.outer(g1, g1)
    kernel = kernel / kernel.sum()
    return kernel.to(dtype=dtype, device=device)


class GaussianBlur(LinearOperator):
    r"""Per-channel Gaussian blur :math:`A`, with its exact adjoint :math:`A^\top`: a
    :class:`LinearOperator`.

    Each channel is correlated with the (symmetric) kernel :math:`k` of
    :func:`gaussian_kernel`. With ``circular=False`` (the default, and DE-GRAD's setting) the
    image is zero-padded to keep its size; with ``circular=True`` it is padded periodically,
    which makes :math:`A` diagonal in the Fourier basis (see :meth:`transfer_function` and
    :func:`~implicitlayers.imaging.direct_inverse`).

    .. math::

        (A x)_{c,i,j} = \sum_{a,b} k_{a,b}\, x_{c,\, i + a - p,\, j + b - p}, \qquad
        (A^\top y)_{c,i,j} = \sum_{a,b} k_{a,b}\, y_{c,\, i - a + p,\, j - b + p},

    with :math:`p = (K - 1) / 2` and out-of-range pixels read as zero (or wrapped when
    ``circular=True``). The adjoint is computed by ``conv_transpose2d`` (zero padding) or by a
    circular correlation with the flipped kernel, so :math:`\langle A x, y \rangle =
    \langle x, A^\top y \rangle` holds to rounding error for any kernel stored in
    :attr:`kernel`. Since the kernel is nonnegative and sums to 1, :math:`\|A\|_2 \le 1`
    (:meth:`norm_bound`).

    The kernel is a non-persistent buffer (it follows ``.to()`` but stays out of
    ``state_dict``); inputs of another floating dtype are blurred with the kernel cast to
    their dtype.

    Args:
        kernel_size: Odd kernel side :math:`K` (DE-GRAD: 5).
        std: Gaussian standard deviation :math:`\sigma` in pixels (DE-GRAD: 5.0).
        channels: Number of image channels :math:`C` the blur expects.
        circular: Periodic instead of zero boundary conditions.
        dtype: Dtype of the kernel buffer.
        device: Device of the kernel buffer.

    Attributes:
        kernel: ``(K, K)`` kernel buffer.
        kernel_size, std, channels, circular: The constructor arguments.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import GaussianBlur
        >>> A = GaussianBlur(kernel_size=5, std=5.0, channels=3)
        >>> x, y = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
        >>> torch.allclose((A(x) * y).sum(), (x * A.adjoint(y)).sum(), rtol=1e-4)
        True
    """

    kernel: Tensor

    def __init__(
        self,
        kernel_size: int = 5,
        std: float = 5.0,
        channels: int = 3,
        *,
        circular: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_int("channels", channels, minimum=1)
        if not isinstance(circular, bool):
            raise TypeError(f"circular must be a bool, got {circular!r}")
        self.kernel_size = kernel_size
        self.std = float(std)
        self.channels = channels
        self.circular = circular
        kernel = gaussian_kernel(kernel_size, std, dtype=dtype, device=device)
        self.register_buffer("kernel", kernel, persistent=False)

    def extra_repr(self) -> str:
        circular = ", circular=True" if self.circular else ""
        return f"kernel_size={self.kernel_size}, std={self.std}, channels={self.channels}{circular}"

    def forward(self, x: Tensor) -> Tensor:
        r"""Blur: :math:`A x` for ``x`` of shape ``(B, C, H, W)``."""
        self._check_input("x", x)
        weight = self._weight(x, flip=False)
        if self.circular:
            return F.conv2d(self._wrap(x), weight, groups=self.channels)
        return F.conv2d(x, weight, padding=self.kernel_size // 2, groups=self.channels)

    def adjoint(self, y: Tensor) -> Tensor:
        r"""The exact adjoint: :math:`A^\top y` for ``y`` of shape ``(B, C, H, W)``."""
        self._check_input("y", y)
        if self.circular:
            return F.conv2d(self._wrap(y), self._weight(y, flip=True), groups=self.channels)
        weight = self._weight(y, flip=False)
        return F.conv_transpose2d(y, weight, padding=self.kernel_size // 2, groups=self.channels)

    def norm_bound(self) -> float:
        r"""A guaranteed upper bound on :math:`\|A\|_2`: :math:`\|k\|_1` (1 for a Gaussian).

        Young's inequality bounds the blur on the infinite plane by :math:`\|k\|_1`; zero or
        periodic padding restricts it to a subspace (or a torus), which cannot raise the norm.
        """
        return float(self.kernel.abs().sum())

    def transfer_function(self, height: int, width: int) -> Tensor:
        r"""The blur's eigenvalues :math:`\hat h` in the 2-D DFT basis on an ``H x W`` torus.

        For ``circular=True``, :math:`A x = \mathcal{F}^{-1}(\hat h \odot \mathcal{F} x)`
        exactly, with :math:`\mathcal{F}` = ``torch.fft.fft2``; for zero padding it is the
        circular approximation, exact away from the borders.

        Returns:
            Complex ``(H, W)`` tensor.
        """
        check_int("height", height, minimum=self.kernel_size)
        check_int("width", width, minimum=self.kernel_size)
        k = self.kernel_size
        psf = self.kernel.new_zeros(height, width)
        # correlation with k == convolution with the flipped kernel, centred at pixel (0, 0)
        psf[:k, :k] = self.kernel.flip(-2, -1)
        psf = torch.roll(psf, shifts=(-(k // 2), -(k // 2)), dims=(0, 1))
        spectrum: Tensor = torch.fft.fft2(psf)
        return spectrum

    def _weight(self, x: Tensor, *, flip: bool) -> Tensor:
        kernel = self.kernel.to(dtype=x.dtype)
        if flip:
            kernel = kernel.flip(-2, -1)
        k = self.kernel_size
        return kernel.expand(self.channels, 1, k, k).contiguous()

    def _wrap(self, x: Tensor) -> Tensor:
        p = self.kernel_size // 2
        return F.pad(x, (p, p, p, p), mode="circular")

    def _check_input(self, name: str, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor of shape (B, C, H, W), got {type(x)}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must have shape (B, C, H, W), got {x.dim()}-D shape {tuple(x.shape)}; "
                "add a batch dimension with x[None] for a single image"
            )
        if x.shape[1] != self.channels:
            raise ValueError(
                f"{name} has {x.shape[1]} channels but the blur was built with "
                f"channels={self.channels}; pass GaussianBlur(channels={x.shape[1]})"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}; call x.float()")
        p = self.kernel_size // 2
        if self.circular and min(x.shape[-2:]) < p:
            raise ValueError(
                f"{name} of spatial size {tuple(x.shape[-2:])} is smaller than the kernel "
                f"radius {p}; circular padding needs images at least that large"
            )


def add_noise(
    y: Tensor,
    std: float,
    *,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
) -> Tensor:
    r"""Additive white Gaussian noise: :math:`d = y + \sigma \varepsilon`,
    :math:`\varepsilon \sim \mathcal{N}(0, I)`.

    With ``seeds``, sample :math:`b` gets its own noise
    :math:`\varepsilon_b` = ``torch.randn(y.shape[1:], generator=g_b, dtype=y.dtype)`` from a
    CPU generator :math:`g_b` seeded with ``seeds[b]``, moved to ``y``'s device afterwards. An
    image's measurement then depends only on its seed: not on the batch it is in, the batch
    size, the number of processes or the device, so every method (and a resumed run) sees the
    same measurements.

    Args:
        y: Clean measurements, any shape (``(B, *S)`` with ``seeds``).
        std: Noise standard deviation :math:`\sigma \ge 0` (DE-GRAD: 0.01 for images in
            :math:`[-1, 1]`).
        generator: Optional ``torch.Generator`` (on ``y``'s device) for reproducible noise.
        seeds: One integer seed per sample (``len(seeds) == y.shape[0]``), instead of
            ``generator``.

    Returns:
        Noisy measurements, same shape, dtype and device as ``y``.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import add_noise
        >>> g = torch.Generator().manual_seed(0)
        >>> d = add_noise(torch.zeros(1, 1, 64, 64), 0.01, generator=g)
        >>> abs(d.std().item() - 0.01) < 1e-3
        True
        >>> y = torch.zeros(3, 1, 8, 8)
        >>> batch = add_noise(y, 0.01, seeds=[7, 8, 9])
        >>> torch.equal(batch[1:2], add_noise(y[1:2], 0.01, seeds=[8]))
        True
    """
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor, got {type(y).__name__}")
    check_float("std", std, low=0.0)
    if seeds is None:
        noise = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        return y + std * noise
    if generator is not None:
        raise ValueError("pass either generator or seeds to add_noise, not both")
    seeds = list(seeds)
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise TypeError(f"seeds must be a sequence of ints, one per sample, got {seeds!r}")
    if y.dim() == 0 or len(seeds) != y.shape[0]:
        raise ValueError(
            f"seeds must hold one seed per sample (y.shape[0] of them): got {len(seeds)} "
            f"seeds for y of shape {tuple(y.shape)}"
        )
    draws = [
        torch.randn(y.shape[1:], generator=torch.Generator().manual_seed(s), dtype=y.dtype)
        for s in seeds
    ]
    noise = torch.stack(draws).to(y.device) if draws else torch.empty_like(y)
    return y + std * noise


def _check_kernel_size(kernel_size: int) -> None:
    check_int("kernel_size", kernel_size, minimum=1)
    if kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be odd so the kernel has a centre pixel, got {kernel_size}; "
            f"use {kernel_size + 1}"
        )
