r"""Weight-tied (variational) dropout: one mask per forward, shared by every call of ``f``.

``nn.Dropout`` draws a new mask at every call, so inside a deep equilibrium model each solver
iteration would see a different map :math:`f` and the solve would chase a moving target. The
modules here draw their mask once and reuse it until ``reset_mask()``
(or :func:`implicitlayers.nn.one_map`, once per forward) draws a new one, as the hidden-state
dropout of the DEQ and MDEQ papers (Bai et al., 2019, 2020) and torchdeq's
``VariationalDropout`` do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["VariationalDropout", "VariationalDropout2d"]


class _VariationalDropoutBase(nn.Module):
    """Shared mask bookkeeping; subclasses choose the mask's shape from the input's."""

    mask: Tensor | None

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"p must be a float in [0, 1), got {p!r} of type {type(p).__name__}")
        if not (math.isfinite(p) and 0.0 <= p < 1.0):
            raise ValueError(
                f"p must be in [0, 1), got p={p!r}: p is the probability of dropping a unit "
                "(p=1 would drop every unit and the 1/(1-p) rescaling would divide by zero)"
            )
        self.p = float(p)
        # A buffer, so that ``module.to(device)`` moves a drawn mask with the module; not
        # persistent, so that a mask never enters ``state_dict``.
        self.register_buffer("mask", None, persistent=False)
        self._input_shape: tuple[int, ...] | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def reset_mask(self) -> None:
        """Forget the current mask; the next call in training mode draws a new one."""
        self.mask = None
        self._input_shape = None

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Multiply ``x`` by the current mask (drawn at the first call after a reset).

        Args:
            x: The input; its shape must equal the shape the current mask was drawn for.

        Returns:
            ``x * mask`` in training mode with ``p > 0``, else ``x`` itself.
        """
        if not self.training or self.p == 0.0:
            return x
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} needs a floating-point input, got dtype {x.dtype}"
            )
        shape = tuple(x.shape)
        mask = self.mask
        if mask is None:
            keep = 1.0 - self.p
            mask = torch.empty(self._mask_shape(x), dtype=x.dtype, device=x.device)
            mask.bernoulli_(keep).mul_(1.0 / keep)
            self.mask = mask
            self._input_shape = shape
        elif shape != self._input_shape:
            raise ValueError(
                f"{type(self).__name__} drew its mask for inputs of shape {self._input_shape} "
                f"but got an input of shape {shape}. Call reset_mask() before feeding a new "
                "shape (implicitlayers.nn.one_map does so once per forward). Inside a DEQ, "
                "independent_samples=True hands f a shrinking batch, which a per-sample mask "
                "cannot follow: use independent_samples=False with variational dropout."
            )
        if mask.dtype != x.dtype or mask.device != x.device:
            mask = mask.to(dtype=x.dtype, device=x.device)
        return x * mask


class VariationalDropout(_VariationalDropoutBase):
    r"""Dropout whose mask is drawn once and reused until ``reset_mask()``.

    In training mode, with a mask :math:`m` of the input's shape :math:`(B, *S)` drawn at the
    first call after a reset,

    .. math::

        y = x \odot m, \qquad m_i = \frac{b_i}{1 - p}, \quad b_i \sim \mathrm{Bernoulli}(1 - p),

    so :math:`\mathbb{E}[y] = x` (inverted dropout). Every later call reuses :math:`m`, so a
    fixed-point solver iterating :math:`z_{k+1} = f(z_k, x)` sees one map, and the
    differentiable application of ``f`` that attaches :math:`z^\star` to the graph uses the
    mask the solve converged with. :func:`implicitlayers.nn.one_map` resets the mask once on
    entry (``il.DEQ`` enters it on every forward), so each forward draws a new mask. In eval
    mode, or with ``p=0``, the module is the identity.

    The mask is drawn with the input's dtype and device from torch's global generator
    (``torch.manual_seed`` makes it reproducible). It is a non-persistent buffer: it moves with
    ``module.to(...)`` and never enters ``state_dict``.

    Args:
        p: Probability of dropping a unit, in :math:`[0, 1)`.

    Raises:
        ValueError: At a call whose input shape differs from the one the mask was drawn for
            (call ``reset_mask()`` first).

    Example:
        >>> import torch
        >>> from implicitlayers.nn import VariationalDropout
        >>> drop = VariationalDropout(p=0.5)
        >>> x = torch.ones(2, 8)
        >>> torch.equal(drop(x), drop(x))  # one mask until reset_mask()
        True
        >>> set(drop(x).unique().tolist()) <= {0.0, 2.0}  # kept units are scaled by 1/(1-p)
        True
        >>> drop.reset_mask()
        >>> drop.mask is None
        True
        >>> drop.eval()(x) is x  # identity in eval mode
        True
    """

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        return tuple(x.shape)


class VariationalDropout2d(_VariationalDropoutBase):
    r"""Channel dropout for feature maps, with one mask reused until ``reset_mask()``.

    The mask has shape :math:`(B, C, 1, 1)` and broadcasts over the spatial dimensions of an
    input :math:`(B, C, H, W)`: a dropped channel is zero at every pixel, as in MDEQ's
    ``VariationalHidDropout2d``,

    .. math::

        y_{bchw} = x_{bchw}\, m_{bc}, \qquad m_{bc} = \frac{b_{bc}}{1 - p}, \quad
        b_{bc} \sim \mathrm{Bernoulli}(1 - p).

    Otherwise it behaves as :class:`VariationalDropout`: drawn at the first call after a reset,
    reused by every later call, identity in eval mode or with ``p=0``.

    Args:
        p: Probability of dropping a channel, in :math:`[0, 1)`.

    Raises:
        ValueError: At a call with an input that is not 4-D, or whose shape differs from the
            one the mask was drawn for (call ``reset_mask()`` first).

    Example:
        >>> import torch
        >>> from implicitlayers.nn import VariationalDropout2d
        >>> drop = VariationalDropout2d(p=0.25)
        >>> y = drop(torch.ones(2, 3, 5, 5))
        >>> drop.mask.shape
        torch.Size([2, 3, 1, 1])
        >>> bool((y == y[:, :, :1, :1]).all())  # constant over the spatial dims
        True
    """

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        if x.dim() != 4:
            raise ValueError(
                f"VariationalDropout2d expects inputs of shape (B, C, H, W), got shape "
                f"{tuple(x.shape)}; use VariationalDropout for other shapes"
            )
        return (x.shape[0], x.shape[1], 1, 1)
