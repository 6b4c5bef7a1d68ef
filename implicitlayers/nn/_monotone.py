r"""Monotone operator equilibrium layers (monDEQ, Winston & Kolter, NeurIPS 2020).

The equilibrium :math:`z^\star = \sigma(W z^\star + U x + b)` exists and is unique for every
input when :math:`I - W` is strongly monotone and :math:`\sigma` is a proximal operator. The
parametrisation

.. math::

    W = (1 - m) I - A^\top A + B - B^\top

makes the symmetric part of :math:`I - W = m I + A^\top A - B + B^\top` at least :math:`m I`
for any :math:`A`, :math:`B`, so the guarantee holds throughout training. The layers here hold
the parametrisation and the exact operators the splitting solvers need;
:class:`~implicitlayers.MonotoneDEQ` solves them.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import _certificate
from ._certificate import MonotoneCertificate, Splitting

__all__ = ["MonotoneCell", "MonotoneConv2d", "MonotoneLinear"]

#: A batched linear map on states ``(B, *S) -> (B, *S)``.
Operator = Callable[[Tensor], Tensor]


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_margin(margin: object) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise TypeError(f"margin must be a float > 0, got {margin!r} ({type(margin).__name__})")
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(
            f"margin must be a finite float > 0, got margin={margin!r}: it is the m of "
            "W = (1 - m) I - A^T A + B - B^T, the strong monotonicity of I - W that makes the "
            "equilibrium unique (e.g. margin=0.5; larger is faster to solve, less expressive)"
        )
    return float(margin)


class MonotoneCell(nn.Module, abc.ABC):
    r"""Base class of the monotone equilibrium cells that
    :class:`~implicitlayers.MonotoneDEQ` solves.

    A cell defines :math:`M = I - W`, with symmetric part at least :math:`m I`
    (``margin``), the injection :math:`U x + b` and the nonlinearity :math:`\sigma`, a
    proximal operator (ReLU: the projection onto :math:`z \ge 0`). Called as ``cell(z, x)``
    it is the equilibrium map

    .. math::

        f(z, x) = \sigma(W z + U x + b),

    so it also works in a plain :class:`~implicitlayers.DEQ` with any solver (without a
    certified rate: :math:`\|W\|_2` may exceed 1). Subclasses implement :meth:`state_shape`,
    :meth:`inject`, :meth:`operator`, :meth:`resolvent` and :meth:`blocks`; override
    :meth:`prox` for another proximal nonlinearity.

    Attributes:
        margin: :math:`m > 0`.
    """

    margin: float

    @abc.abstractmethod
    def state_shape(self, x: Tensor) -> tuple[int, ...]:
        """The per-sample shape of the equilibrium :math:`z` for the input batch ``x``."""

    @abc.abstractmethod
    def inject(self, x: Tensor) -> Tensor:
        r"""The injection :math:`U x + b`, shaped ``(B, *state_shape(x))``."""

    @abc.abstractmethod
    def operator(self, state_shape: tuple[int, ...]) -> Operator:
        r"""The map :math:`z \mapsto M z = (I - W) z` on ``(B, *state_shape)`` batches, built
        once (under the caller's autograd mode) and applied at every iteration."""

    @abc.abstractmethod
    def resolvent(self, alpha: float, state_shape: tuple[int, ...]) -> Operator:
        r"""The exact map :math:`v \mapsto (I + \alpha M)^{-1} v`, built once per call."""

    @abc.abstractmethod
    def blocks(self, state_shape: tuple[int, ...]) -> Tensor:
        r"""``(K, n, n)`` float64 (or complex128) matrices of :math:`M` in an orthonormal
        basis that block-diagonalises it, detached: the input of the certificate."""

    def prox(self, v: Tensor, alpha: float) -> Tensor:
        r"""The nonlinearity, :math:`\mathrm{prox}_{\alpha g}(v)`: ReLU, the projection onto
        the non-negative orthant (the same for every :math:`\alpha`)."""
        return torch.relu(v)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        r"""The equilibrium map :math:`f(z, x) = \sigma(W z + U x + b)`.

        Args:
            z: ``(B, *state_shape(x))`` state.
            x: ``(B, ...)`` input.
        """
        shape = self.state_shape(x)
        _check_state(z, x, shape)
        return self.prox(z - self.operator(shape)(z) + self.inject(x), 1.0)

    def certificate(
        self, state_shape: tuple[int, ...], solver: object, *, alpha: float | None = None
    ) -> MonotoneCertificate:
        r"""The certificate for the current weights, states of shape ``state_shape`` and a
        splitting solver (:class:`~implicitlayers.nn.ForwardBackward` or
        :class:`~implicitlayers.nn.PeacemanRachford`), with its step ``alpha`` unless given.

        Costs a few dense eigen- and singular-value decompositions of the blocks of
        :math:`M` (:math:`O(n^3)` for a dense layer of width :math:`n`).
        """
        splitting = splitting_of(solver)
        step = getattr(solver, "alpha", None) if alpha is None else alpha
        with torch.no_grad():
            blocks = self.blocks(tuple(state_shape))
            extra = self._certificate_extras(blocks)
        return _certificate.build(
            blocks,
            splitting=splitting,
            alpha=step,
            margin=self.margin,
            state_shape=tuple(state_shape),
            **extra,
        )

    def _certificate_extras(self, blocks: Tensor) -> dict[str, float]:
        return {}

    def certified_alpha(self, state_shape: tuple[int, ...], solver: object) -> float:
        r"""The step ``alpha=None`` stands for: :math:`\mu / L^2` for forward-backward,
        :math:`1 / L` for Peaceman-Rachford, exactly for the current weights (only the
        constants it needs: cheaper than :meth:`certificate`)."""
        splitting = splitting_of(solver)
        with torch.no_grad():
            return _certificate.certified_alpha(splitting, self.blocks(tuple(state_shape)))

    def certify(self, z: Tensor, x: Tensor) -> Tensor:
        r"""``(B,)`` certified bounds on :math:`\|z - z^\star(x)\|_2` for *any* states ``z``,
        from the equilibrium map's residual :math:`r = \|f(z, x) - z\|_2`:

        .. math::

            \|z - z^\star\| \le \Big(1 + \frac{\|W\|_2}{\mu}\Big)\, r,

        by the monotonicity of :math:`\partial g` and the strong monotonicity :math:`\mu` of
        :math:`I - W`. Use it to check a solution from any solver (Anderson on the plain map,
        a warm start, a truncated solve).
        """
        shape = self.state_shape(x)
        with torch.no_grad():
            spec = _certificate.spectrum(self.blocks(shape))
            fz: Tensor = self(z, x)
            residual: Tensor = torch.linalg.vector_norm((fz - z).flatten(1), dim=1)
        return residual * (1.0 + spec.weight_norm / spec.monotonicity)


def splitting_of(solver: object) -> Splitting:
    """The splitting a solver object names, or a ``TypeError`` that says what to pass."""
    name = getattr(type(solver), "splitting", None)
    if name not in _certificate.SPLITTINGS:
        raise TypeError(
            f"a monotone cell is solved by a splitting solver, il.nn.ForwardBackward or "
            f"il.nn.PeacemanRachford; got {solver!r}. To run another solver on the cell's "
            "equilibrium map, use il.DEQ(cell, solver=...) (no certified rate) and "
            "cell.certify(z, x) to bound the error of its answer."
        )
    return name  # type: ignore[no-any-return]


def _check_state(z: Tensor, x: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(z.shape[1:]) != shape or z.shape[0] != x.shape[0]:
        raise ValueError(
            f"z has shape {tuple(z.shape)}, but for an input of shape {tuple(x.shape)} the "
            f"state must have shape {(x.shape[0], *shape)}"
        )


def _dense_resolvent(M: Tensor, alpha: float) -> Operator:
    r""":math:`v \mapsto (I + \alpha M)^{-1} v` for rows ``v``, by one LU factorisation."""
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    # Rows v: solve (I + aM) y = v for every row, i.e. Y = V (I + aM)^{-T}.
    inverse_t = torch.linalg.inv(eye + alpha * M).mT
    return lambda v: v @ inverse_t


class DenseMonotoneCell(MonotoneCell):
    """A cell whose :math:`M = I - W` is one dense ``(n, n)`` matrix, :meth:`operator_matrix`:
    its products, resolvent (a dense inverse) and certificate blocks follow from it."""

    features: int

    @abc.abstractmethod
    def operator_matrix(self) -> Tensor:
        """:math:`M = I - W`, differentiable, ``(n, n)``."""

    def weight(self) -> Tensor:
        """:math:`W = I - M`, differentiable, ``(n, n)``."""
        M = self.operator_matrix()
        return torch.eye(self.features, dtype=M.dtype, device=M.device) - M

    def operator(self, state_shape: tuple[int, ...]) -> Operator:
        M_t = self.operator_matrix().mT
        return lambda z: z @ M_t

    def resolvent(self, alpha: float, state_shape: tuple[int, ...]) -> Operator:
        return _dense_resolvent(self.operator_matrix(), alpha)

    def blocks(self, state_shape: tuple[int, ...]) -> Tensor:
        return self.operator_matrix().detach().to(torch.float64)[None]


class MonotoneLinear(DenseMonotoneCell):
    r"""A dense monotone equilibrium cell (monDEQ, [Winston2020]_).

    .. math::

        z^\star = \mathrm{ReLU}(W z^\star + U x + b), \qquad
        W = (1 - m) I - A^\top A + B - B^\top,

    with :math:`A, B \in \mathbb R^{n \times n}` free, so :math:`\tfrac12\big((I - W) +
    (I - W)^\top\big) = m I + A^\top A \succeq m I` and the equilibrium exists and is unique
    for every input and every weight. Solve it with :class:`~implicitlayers.MonotoneDEQ`.

    Args:
        in_features: Size :math:`d` of each input sample.
        features: Width :math:`n` of the equilibrium state.
        margin: :math:`m > 0` (the reference implementation's default is 1). Larger margins
            solve faster (the certified rate improves) and restrict :math:`W` more: its
            symmetric part is at most :math:`(1 - m) I`.

    Example:
        >>> import torch, implicitlayers as il
        >>> cell = il.nn.MonotoneLinear(8, 32, margin=0.5)
        >>> W = cell.weight()  # the dense W, (32, 32)
        >>> lam = torch.linalg.eigvalsh(torch.eye(32) - (W + W.T) / 2)
        >>> bool(lam.min() >= 0.5 - 1e-5)
        True
    """

    def __init__(self, in_features: int, features: int, *, margin: float = 1.0) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        self.features = check_positive_int("features", features)
        self.margin = check_margin(margin)
        self.U = nn.Linear(in_features, features)
        # As nn.Linear's weights (the reference implementation uses nn.Linear for A and B).
        self.A = nn.Parameter(nn.Linear(features, features, bias=False).weight.detach())
        self.B = nn.Parameter(nn.Linear(features, features, bias=False).weight.detach())

    def extra_repr(self) -> str:
        return f"in_features={self.U.in_features}, features={self.features}, margin={self.margin}"

    def state_shape(self, x: Tensor) -> tuple[int, ...]:
        if x.dim() != 2 or x.shape[1] != self.U.in_features:
            raise ValueError(
                f"x must have shape (B, {self.U.in_features}) (in_features), got {tuple(x.shape)}"
            )
        return (self.features,)

    def inject(self, x: Tensor) -> Tensor:
        self.state_shape(x)
        out: Tensor = self.U(x)
        return out

    def operator_matrix(self) -> Tensor:
        r""":math:`M = I - W = m I + A^\top A - B + B^\top`, differentiable, ``(n, n)``."""
        eye = torch.eye(self.features, dtype=self.A.dtype, device=self.A.device)
        return self.margin * eye + self.A.T @ self.A - self.B + self.B.T


class MonotoneConv2d(MonotoneCell):
    r"""A convolutional monotone equilibrium cell (monDEQ, [Winston2020]_).

    The state is a ``(C, H, W)`` feature map; :math:`A` and :math:`B` are ``kernel_size``
    convolutions with **periodic (circular) boundaries**, :math:`A^\top`, :math:`B^\top`
    their adjoints, and

    .. math::

        z^\star = \mathrm{ReLU}(W z^\star + U x + b), \qquad
        W = (1 - m) I - A^\top A + B - B^\top,

    with :math:`U` an ordinary ('same', zero-padded) convolution of the input. A periodic
    convolution is block-diagonalised by the 2-D discrete Fourier transform: at each spatial
    frequency :math:`\omega` of the ``H x W`` grid it acts on the channels as a
    :math:`C \times C` matrix :math:`\hat A(\omega)`, and

    .. math::

        \widehat{(I - W)}(\omega) = m I + \hat A(\omega)^H \hat A(\omega)
            - \hat B(\omega) + \hat B(\omega)^H.

    The layer applies :math:`W` and the resolvent :math:`(I + \alpha (I - W))^{-1}` this way,
    exactly (an FFT, one :math:`C \times C` product or inverse per frequency, an inverse FFT),
    as the monDEQ paper does; its certificate takes the extreme eigen- and singular values over
    the frequencies. Any image size works, odd sizes and sizes below the kernel's included.

    Args:
        in_channels: Channels of the input images.
        channels: Channels :math:`C` of the equilibrium state.
        kernel_size: Odd size of :math:`A` and :math:`B` (and of :math:`U`).
        margin: :math:`m > 0`.

    Example:
        >>> import torch, implicitlayers as il
        >>> cell = il.nn.MonotoneConv2d(1, 4, margin=0.5)
        >>> x = torch.randn(2, 1, 7, 5)
        >>> cell.state_shape(x)
        (4, 7, 5)
    """

    def __init__(
        self, in_channels: int, channels: int, *, kernel_size: int = 3, margin: float = 1.0
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        self.channels = check_positive_int("channels", channels)
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd (a centred kernel), got {kernel_size}; e.g. 3 or 5"
            )
        self.kernel_size = kernel_size
        self.margin = check_margin(margin)
        self.U = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2)

        def kernel() -> nn.Parameter:
            weight = nn.Conv2d(channels, channels, kernel_size, bias=False).weight.detach()
            return nn.Parameter(weight)

        self.A = kernel()
        self.B = kernel()

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.U.in_channels}, channels={self.channels}, "
            f"kernel_size={self.kernel_size}, margin={self.margin}"
        )

    def state_shape(self, x: Tensor) -> tuple[int, ...]:
        if x.dim() != 4 or x.shape[1] != self.U.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.U.in_channels}, H, W) (in_channels), "
                f"got {tuple(x.shape)}"
            )
        return (self.channels, int(x.shape[2]), int(x.shape[3]))

    def inject(self, x: Tensor) -> Tensor:
        self.state_shape(x)
        out: Tensor = self.U(x)
        return out

    def transfer(self, kernel: Tensor, size: tuple[int, int]) -> Tensor:
        r"""``(H, W // 2 + 1, C_out, C_in)`` matrices :math:`\hat K(\omega)` of the periodic
        cross-correlation with ``kernel`` on an ``H x W`` grid, on the real-input half of the
        frequencies, so that :math:`\widehat{K * z}(\omega) = \hat K(\omega)\, \hat z(\omega)`
        with ``torch.fft.rfft2``'s transform. Differentiable in ``kernel``.
        """
        h, w = size
        k = kernel.shape[-1]
        offsets = torch.arange(k, device=kernel.device, dtype=torch.float64) - k // 2
        # Cross-correlation reads z[p + d]: its symbol is sum_d K[d] exp(+2 pi i omega d / N).
        freq_h = torch.arange(h, device=kernel.device, dtype=torch.float64)
        freq_w = torch.arange(w // 2 + 1, device=kernel.device, dtype=torch.float64)
        phase_h = torch.polar(
            torch.ones(h, k, dtype=torch.float64, device=kernel.device),
            2 * math.pi * freq_h[:, None] * offsets[None, :] / h,
        )
        phase_w = torch.polar(
            torch.ones(w // 2 + 1, k, dtype=torch.float64, device=kernel.device),
            2 * math.pi * freq_w[:, None] * offsets[None, :] / w,
        )
        complex_dtype = torch.complex128 if kernel.dtype == torch.float64 else torch.complex64
        phase_h, phase_w = phase_h.to(complex_dtype), phase_w.to(complex_dtype)
        return torch.einsum("oiab,ha,wb->hwoi", kernel.to(complex_dtype), phase_h, phase_w)

    def operator_blocks(self, size: tuple[int, int]) -> Tensor:
        r"""``(H, W // 2 + 1, C, C)`` matrices of :math:`M = I - W` per frequency,
        differentiable."""
        a_hat = self.transfer(self.A, size)
        b_hat = self.transfer(self.B, size)
        eye = torch.eye(self.channels, dtype=a_hat.dtype, device=a_hat.device)
        return self.margin * eye + a_hat.mH @ a_hat - b_hat + b_hat.mH

    def _fourier_map(self, blocks: Tensor, size: tuple[int, int]) -> Operator:
        def apply(z: Tensor) -> Tensor:
            if z.shape[0] == 0:  # (MKL's FFT rejects an empty batch)
                return z * 0
            z_hat = torch.fft.rfft2(z)
            out_hat = torch.einsum("hwoi,bihw->bohw", blocks, z_hat)
            out: Tensor = torch.fft.irfft2(out_hat, s=size)
            return out

        return apply

    def operator(self, state_shape: tuple[int, ...]) -> Operator:
        size = (state_shape[1], state_shape[2])
        return self._fourier_map(self.operator_blocks(size), size)

    def resolvent(self, alpha: float, state_shape: tuple[int, ...]) -> Operator:
        size = (state_shape[1], state_shape[2])
        blocks = self.operator_blocks(size)
        eye = torch.eye(self.channels, dtype=blocks.dtype, device=blocks.device)
        return self._fourier_map(torch.linalg.inv(eye + alpha * blocks), size)

    def blocks(self, state_shape: tuple[int, ...]) -> Tensor:
        size = (state_shape[1], state_shape[2])
        with torch.no_grad():
            blocks = self.operator_blocks(size).to(torch.complex128)
        return blocks.reshape(-1, self.channels, self.channels)

    def dense_weight(self, size: tuple[int, int]) -> Tensor:
        r"""The dense matrix of :math:`W` on flattened ``(C, H, W)`` states, float64, by
        applying :math:`W` to every basis vector: for checks on small layers only."""
        c, (h, w) = self.channels, size
        n = c * h * w
        with torch.no_grad():
            basis = torch.eye(n, dtype=torch.float64).reshape(n, c, h, w)
            blocks = self.operator_blocks(size).to(torch.complex128)
            M_basis = self._fourier_map(blocks, size)(basis).reshape(n, n)
        return torch.eye(n, dtype=torch.float64) - M_basis.T
