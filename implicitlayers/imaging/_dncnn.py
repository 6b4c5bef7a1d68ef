r"""The DnCNN regulariser (Zhang et al., 2017); the contractive variant is in ``_contractive``."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from .._validate import check_int
from ._operators import _check_kernel_size

__all__ = ["DnCNN"]


def _check_depth_width(channels: int, depth: int, width: int) -> None:
    check_int("channels", channels, minimum=1)
    check_int("depth", depth, minimum=2)
    check_int("width", width, minimum=1)


class DnCNN(nn.Module):
    r"""DnCNN (Zhang et al., 2017): the network :math:`N_\theta`, and the denoiser built on it.

    .. math::

        N_\theta = W_L \circ \big(\circ_{l=2}^{L-1}\, \mathrm{ReLU} \circ \mathrm{BN}_l \circ W_l
        \big) \circ \mathrm{ReLU} \circ W_1,

    with :math:`L` = ``depth`` stride-1 zero-padded convolutions :math:`W_l`. The module
    returns

    .. math::

        \text{residual=False:}\quad N_\theta(x), \qquad\qquad
        \text{residual=True:}\quad D_\theta(x) = x - N_\theta(x).

    ``residual=True`` is Zhang et al.'s residual learning: the network predicts the noise, and
    the module is a denoiser :math:`D_\theta` (train it to map noisy images to clean ones).
    In DE-GRAD (:class:`DEGRADCell`) with :math:`R = I - D`, the two read the same:
    ``DEGRADCell(A, DnCNN(residual=True), residual_regularizer=True)`` computes
    :math:`R(x) = x - D_\theta(x) = N_\theta(x)` (up to rounding), as does
    ``DEGRADCell(A, DnCNN(residual=False))`` with the same weights; the first form lets the
    same module be pretrained as a denoiser and then used in the cell.

    With ``spectral_norm=True`` every convolution gets torch's
    :func:`~torch.nn.utils.parametrizations.spectral_norm` parametrization, as in Gilton et al.
    and the JFB experiments. It normalises the ``(C_out, C_in K^2)`` reshaped weight, which can
    under-estimate the convolution's operator norm by up to a factor :math:`K`, and batch norm
    is not Lipschitz-controlled at all, so this network has no Lipschitz guarantee; use
    :class:`ContractiveDnCNN` for one. Note that in training mode torch's spectral norm takes a
    power-iteration step on every forward, including the ``no_grad`` evaluations inside a
    fixed-point solve, so the map moves slightly while the solver iterates (harmless in
    practice, but call ``.eval()`` for exact solves).

    Args:
        channels: Image channels :math:`C` (input and output).
        depth: Number of convolutions :math:`L \ge 2` (17 in the paper).
        width: Feature channels of the hidden layers.
        batch_norm: Batch norm after each hidden convolution (those then have no bias).
        spectral_norm: Spectral-normalise every convolution's weight.
        kernel_size: Odd convolution size :math:`K`.
        residual: Return :math:`x - N_\theta(x)` (a denoiser by residual learning) instead
            of :math:`N_\theta(x)`. The default, ``False``, is the plain network.

    Attributes:
        layers: The ``nn.Sequential`` of convolutions, batch norms and ReLUs (:math:`N_\theta`;
            the same parameters and ``state_dict`` keys for either ``residual``).
        residual: The constructor argument.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import DnCNN
        >>> net = DnCNN(channels=3, depth=5, width=16)
        >>> net(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 3, 16, 16])
        >>> denoiser = DnCNN(channels=3, depth=5, width=16, residual=True)
        >>> _ = denoiser.load_state_dict(net.state_dict())  # the same keys
        >>> x = torch.randn(2, 3, 16, 16)
        >>> torch.allclose(denoiser.eval()(x), x - net.eval()(x))
        True
    """

    def __init__(
        self,
        channels: int = 3,
        depth: int = 17,
        width: int = 64,
        *,
        batch_norm: bool = True,
        spectral_norm: bool = True,
        kernel_size: int = 3,
        residual: bool = False,
    ) -> None:
        super().__init__()
        _check_depth_width(channels, depth, width)
        _check_kernel_size(kernel_size)
        for name, flag in (
            ("batch_norm", batch_norm),
            ("spectral_norm", spectral_norm),
            ("residual", residual),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.channels = channels
        self.depth = depth
        self.width = width
        self.kernel_size = kernel_size
        self.residual = residual

        def conv(c_in: int, c_out: int, bias: bool = True) -> nn.Module:
            layer = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=bias)
            return _spectral_norm(layer) if spectral_norm else layer

        layers: list[nn.Module] = [conv(channels, width), nn.ReLU()]
        for _ in range(depth - 2):
            layers.append(conv(width, width, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
        layers.append(conv(width, channels))
        self.layers = nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return "residual=True" if self.residual else ""

    def forward(self, x: Tensor) -> Tensor:
        r""":math:`N_\theta(x)`, or :math:`x - N_\theta(x)` when ``residual``:
        ``(B, C, H, W) -> (B, C, H, W)``."""
        _check_image(x, self.channels)
        out: Tensor = self.layers(x)
        return x - out if self.residual else out


def _check_image(x: Tensor, channels: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"x has {x.shape[1]} channels but the network was built with channels={channels}; "
            f"build it with channels={x.shape[1]}"
        )
