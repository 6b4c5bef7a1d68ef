r"""A provably contractive DnCNN: every convolution normalised by its exact operator norm."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_float, check_int
from ._dncnn import _check_depth_width, _check_image
from ._lipschitz import circular_conv_norm
from ._operators import _check_kernel_size

__all__ = ["ContractiveDnCNN", "NormalizedConv2d"]


class NormalizedConv2d(nn.Module):
    r"""A zero-padded stride-1 convolution divided by an estimate of its operator norm.

    .. math::

        y = \frac{W}{\hat\sigma} * x + b, \qquad
        \hat\sigma = \|W \circledast u\|_2, \quad u \leftarrow
            \frac{W^\top \circledast (W \circledast u)}{\|W^\top \circledast (W \circledast u)\|_2},

    where :math:`u` is a persistent power-iteration vector sized by the input, and
    :math:`W \circledast` is the convolution with periodic boundaries on the
    ``(H + K - 1) x (W + K - 1)`` torus (``conv2d`` after circular padding; its adjoint is the
    correlation with the transposed, flipped kernel). Unlike torch's reshaped-matrix spectral
    norm, :math:`\hat\sigma` converges (from below) to the norm of the convolution as an
    operator on images, and the torus is chosen so that this norm bounds the zero-padded
    convolution's norm on ``H x W`` images (see
    :func:`~implicitlayers.imaging.circular_conv_norm`).

    The vector is (re)initialised and warmed up by ``warmup_iterations`` steps whenever the
    input's spatial size changes. Outside a deep equilibrium model it is advanced by
    ``power_iterations`` steps on every training-mode forward that records autograd (never
    under ``no_grad``). Inside :func:`~implicitlayers.nn.one_map`, which
    :class:`~implicitlayers.DEQ` enters on every forward, it follows the contract of torch's
    ``spectral_norm`` there: the steps are taken once, when the context is entered (in
    training mode, with autograd enabled, as for a plain forward), and the vector is then
    frozen until the context exits. Every call of the layer in one DEQ forward, the
    solver's under ``no_grad`` and the backward rule's differentiable ones, therefore
    divides by the same :math:`\hat\sigma`: the map whose gradient is taken is the map
    that was solved, and the residual the solver reports holds for the layer as it is left
    after the forward. (Advancing the vector in the differentiable call after the solve
    would give the gradient of another map.) Gradients flow through :math:`\hat\sigma`
    with the vector held fixed, as in torch's spectral norm.

    Args:
        in_channels: :math:`C_{in}`.
        out_channels: :math:`C_{out}`.
        kernel_size: Odd kernel size :math:`K`.
        power_iterations: Steps per recorded training forward (per DEQ forward inside
            :func:`~implicitlayers.nn.one_map`).
        warmup_iterations: Steps when the vector is (re)initialised.
    """

    u: Tensor
    #: Inside :func:`~implicitlayers.nn.one_map`: the vector is frozen (a class default, so
    #: modules pickled before the attribute existed load unfrozen).
    _frozen: bool = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        power_iterations: int = 1,
        warmup_iterations: int = 100,
    ) -> None:
        super().__init__()
        check_int("power_iterations", power_iterations, minimum=0)
        check_int("warmup_iterations", warmup_iterations, minimum=1)
        _check_kernel_size(kernel_size)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.kernel_size = kernel_size
        self.power_iterations = power_iterations
        self.warmup_iterations = warmup_iterations
        self.register_buffer("u", torch.zeros(0))

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The image size ``(H, W)`` the normalisation is calibrated for (``None`` before any
        input)."""
        if self.u.dim() != 4:
            return None
        extra = self.kernel_size - 1
        return (int(self.u.shape[-2]) - extra, int(self.u.shape[-1]) - extra)

    def calibrate(self, size: tuple[int, int], power_iterations: int | None = None) -> None:
        """Size the vector for ``(H, W)`` images and run ``power_iterations`` power steps (no
        grad; default: the warm-up for a new size, the layer's ``power_iterations`` otherwise)."""
        weight = self.conv.weight
        with torch.no_grad():
            if self.input_size != (int(size[0]), int(size[1])):
                extra = self.kernel_size - 1
                shape = (1, weight.shape[1], int(size[0]) + extra, int(size[1]) + extra)
                u = torch.randn(shape, dtype=weight.dtype, device=weight.device)
                self.u = u / u.norm()
                if power_iterations is None:
                    power_iterations = self.warmup_iterations
            if power_iterations is None:
                power_iterations = self.power_iterations
            self._power_step(power_iterations)

    def calibrate_exact(self, size: tuple[int, int] | None = None) -> None:
        r"""Set the vector to an exact top right singular vector of the circular convolution.

        The DFT block-diagonalises the convolution on the torus (see
        :func:`~implicitlayers.imaging.circular_conv_norm`): at the frequency
        :math:`\omega^\star` where :math:`\sigma_{\max}(\hat W(\omega))` is largest, with top
        right singular vector :math:`v`, the real plane wave
        :math:`u(p) = \operatorname{Re}(v\, e^{i \omega^\star \cdot p})` (or its imaginary
        part, or the conjugate's: the best of the four is kept) is a top singular vector of the
        real operator. Afterwards :math:`\hat\sigma` equals the norm up to rounding, so
        :meth:`lipschitz_ratio` is 1. Power iteration approaches the norm from below and can
        lag far behind an optimiser that grows another singular direction; call this after
        training (or periodically) to restore the certificate. Costs one batched SVD over the
        DFT grid: about 0.3 s for ``width=48`` at 64 x 64 on a CPU core.

        Args:
            size: ``(H, W)`` image size; default: the calibrated one.
        """
        if size is None:
            size = self.input_size
        if size is None:
            raise ValueError(
                "the normalisation is sized by the input: pass size=(H, W) or run a forward "
                "pass first"
            )
        weight = self.conv.weight
        extra = self.kernel_size - 1
        n1, n2 = int(size[0]) + extra, int(size[1]) + extra
        with torch.no_grad():
            w = weight.detach().to(torch.float64)
            mats = torch.fft.rfft2(w, s=(n1, n2)).permute(2, 3, 0, 1)  # (n1, n2 // 2 + 1, o, i)
            norms = torch.linalg.matrix_norm(mats, ord=2)
            k1, k2 = divmod(int(norms.argmax()), norms.shape[1])
            v = torch.linalg.svd(mats[k1, k2])[2][0].conj()  # top right singular vector
            p1 = torch.arange(n1, dtype=torch.float64, device=w.device)[:, None]
            p2 = torch.arange(n2, dtype=torch.float64, device=w.device)[None, :]
            theta = 2 * math.pi * (k1 * p1 / n1 + k2 * p2 / n2)
            best, best_gain = None, -1.0
            for sign in (1.0, -1.0):
                wave = v[:, None, None] * torch.exp(1j * sign * theta)[None]
                for part in (wave.real, wave.imag):
                    norm = float(part.norm())
                    if norm < 1e-12:
                        continue
                    u = (part / norm)[None].to(weight.dtype)
                    gain = float(self._circular(u, weight.detach()).norm())
                    if gain > best_gain:
                        best, best_gain = u, gain
            assert best is not None  # a nonzero v gives a nonzero real or imaginary part
            self.u = best.contiguous()

    def sigma(self) -> Tensor:
        r""":math:`\hat\sigma` for the current vector (differentiable in the weight)."""
        if self.input_size is None:
            raise ValueError(
                "the normalisation is sized by the input: run a forward pass or "
                "calibrate((H, W)) first"
            )
        sigma: Tensor = torch.linalg.vector_norm(self._circular(self.u.clone(), self.conv.weight))
        return sigma

    def forward(self, x: Tensor) -> Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if self.input_size != size:
            self.calibrate(size)
        elif not self._frozen and self._advances():
            self.calibrate(size, self.power_iterations)
        weight = self.conv.weight / self._current_sigma()
        return F.conv2d(x, weight, self.conv.bias, padding=self.conv.padding)

    def _advances(self) -> bool:
        """Whether a forward now takes power steps: training mode, autograd recording."""
        return self.training and torch.is_grad_enabled() and self.power_iterations > 0

    def _enter_one_map(self) -> None:
        """Called by :func:`~implicitlayers.nn.one_map` on entry: the steps of one forward
        now (a layer not yet calibrated takes its warm-up at its first call instead), then
        none until :meth:`_exit_one_map`."""
        size = self.input_size
        if size is not None and self._advances():
            self.calibrate(size, self.power_iterations)
        self._frozen = True

    def _exit_one_map(self) -> None:
        """Called by :func:`~implicitlayers.nn.one_map` on exit: plain forwards advance again."""
        self._frozen = False

    def _current_sigma(self) -> Tensor:
        """:meth:`sigma`, cached while nothing records autograd (the no-grad fixed-point solve
        calls every layer once per iteration with the same weight and vector: the cache saves
        one full-size convolution per layer and call). Keyed on the tensors' identities and
        in-place versions, so an optimiser step or power iteration invalidates it."""
        if torch.is_grad_enabled():
            return self.sigma()
        weight, u = self.conv.weight, self.u
        key = (weight.data_ptr(), weight._version, u.data_ptr(), u._version, weight.dtype)
        if getattr(self, "_sigma_key", None) != key:
            self._sigma_cache = self.sigma().detach()
            self._sigma_key = key
        return self._sigma_cache

    def lipschitz_ratio(self) -> float:
        r"""Certified :math:`\rho = \|W *\|_2 / \hat\sigma \ge` the normalised layer's
        Lipschitz constant on images of the calibrated size; tends to 1 as the power
        iteration converges."""
        size = self.input_size
        if size is None:
            raise ValueError(
                "the normalisation is sized by the input: run a forward pass or "
                "calibrate((H, W)) first"
            )
        with torch.no_grad():
            sigma = float(self.sigma())
        torus = (int(self.u.shape[-2]), int(self.u.shape[-1]))
        return circular_conv_norm(self.conv.weight, torus) / sigma

    def _circular(self, u: Tensor, weight: Tensor, *, adjoint: bool = False) -> Tensor:
        p = self.kernel_size // 2
        if adjoint:
            weight = weight.transpose(0, 1).flip(-2, -1)
        return F.conv2d(F.pad(u, (p, p, p, p), mode="circular"), weight)

    def _power_step(self, power_iterations: int) -> None:
        weight = self.conv.weight.detach()
        u = self.u
        for _ in range(power_iterations):
            u = self._circular(self._circular(u, weight), weight, adjoint=True)
            u = u / u.norm().clamp_min(torch.finfo(u.dtype).tiny)
        self.u.copy_(u)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        saved = state_dict.get(prefix + "u")
        if isinstance(saved, Tensor) and saved.shape != self.u.shape:
            self.u = torch.empty_like(saved, device=self.u.device, dtype=self.u.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ContractiveDnCNN(nn.Module):
    r"""A DnCNN-style denoiser :math:`D` with a certified Lipschitz bound below 1.

    A network :math:`N` with no batch norm, ReLU activations and every convolution a
    :class:`NormalizedConv2d`, mixed with the identity by a learned convex weight
    :math:`t = \operatorname{sigmoid}(\tau) \in (0, 1)` (``skip``: its initial value), under
    a final scale :math:`s` = ``lipschitz``:

    .. math::

        D(x) = s \big((1 - t)\, x + t\, N(x)\big), \qquad
        N = \tilde W_L \circ \mathrm{ReLU} \circ \tilde W_{L-1} \circ \cdots
            \circ \mathrm{ReLU} \circ \tilde W_1, \qquad \tilde W_l = W_l / \hat\sigma_l,

    or :math:`D = s N` with ``skip=None``.

    **The bound.** Biases do not change Lipschitz constants, ReLU is 1-Lipschitz,
    Lipschitz constants multiply under composition and add under sums, so

    .. math::

        \operatorname{Lip}(D) \le s \Big((1 - t) + t \prod_{l=1}^{L}
            \frac{\|W_l *\|_2}{\hat\sigma_l}\Big) = s \big((1 - t) + t \prod_l \rho_l\big).

    **Why the skip.** A layer-wise normalised ReLU network loses gain: the norm of each layer
    is reached only on its top singular vector and ReLU masks half of a signal, so on images
    :math:`N` has a local Lipschitz constant far below its bound (the identity initialisation
    below reaches :math:`N(x) \approx x / 2`). Without the skip :math:`D \approx s x / 2` and
    the regulariser :math:`R = I - D` pulls every image towards zero like a Tikhonov term of
    weight 0.55: the cell scored below the blurred input. With it, :math:`D \approx s x` at
    the start and :math:`R \approx (1 - s) x`, a pull of :math:`1 - s` that ``lipschitz``
    sets (0.01 at :math:`s = 0.99`), while :math:`\operatorname{Lip}(D) \le s` still holds.

    Each :math:`\hat\sigma_l` is a power-iteration estimate of the convolution's true operator
    norm *at the input size* (through ``conv2d``/``conv_transpose2d``), so
    :math:`\rho_l \to 1` and :math:`\operatorname{Lip}(D) \to s`. Torch's reshaped-matrix
    ``spectral_norm`` would not do: it can under-estimate a convolution's norm by up to a
    factor :math:`K` per layer. Because a power estimate approaches the norm from below,
    :meth:`lipschitz_bound` does not assume :math:`\rho_l = 1`: it returns
    :math:`s \prod_l \rho_l` with the numerator :math:`\|W_l *\|_2` bounded exactly through the
    DFT (:func:`~implicitlayers.imaging.circular_conv_norm`), a guaranteed bound for images
    of the calibrated size (and smaller). It is slightly above :math:`s` (a few
    tenths of a percent per layer after the warm-up), so :math:`s = 0.9` leaves room.

    **In a DEQ.** Each :class:`~implicitlayers.DEQ` forward enters
    :func:`~implicitlayers.nn.one_map`, so in training mode every layer takes its
    ``power_iterations`` steps once, before the solve, and the solve, the backward rule's
    differentiable calls (one for :class:`~implicitlayers.JFB` and implicit differentiation,
    :math:`k` for :class:`~implicitlayers.PhantomGradient`) and the reported residual all
    refer to the same map :math:`D`; its gradient is that of the map solved.

    Args:
        channels: Image channels :math:`C`.
        depth: Convolutions :math:`L \ge 2`.
        width: Hidden feature channels.
        lipschitz: The final scale :math:`s \in (0, 1)`.
        kernel_size: Odd convolution size :math:`K`.
        power_iterations: Power steps per recorded training forward, per layer; inside a
            :class:`~implicitlayers.DEQ` (through :func:`~implicitlayers.nn.one_map`), per DEQ
            forward, taken before the solve, so that the solve and the gradient see one map.
        warmup_iterations: Power steps when a layer first sees an input size.
        input_size: Calibrate for ``(H, W)`` images at construction (otherwise the first
            forward does).
        init: ``"identity"`` (default) starts near :math:`D(x) = s x / 2`: the first layer
            splits :math:`x` into :math:`(x, -x)` channels, hidden layers are identities, the
            last recombines :math:`\mathrm{ReLU}(x) - \mathrm{ReLU}(-x)` (the :math:`1/2` is
            the price of the split under layer-wise normalisation), each plus 10% of torch's
            default random init. Randomly initialised normalised layers lose most of a signal
            to misaligned singular vectors and ReLU masks (a local Lipschitz constant of
            :math:`10^{-2}` at depth 5, :math:`10^{-8}` at depth 17), which makes a useless
            denoiser. ``"default"`` keeps torch's init.
        skip: The initial share :math:`t \in (0, 1)` of the network in the convex mix (learned
            afterwards), or ``None`` for :math:`D = s N`.

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import ContractiveDnCNN
        >>> D = ContractiveDnCNN(channels=1, depth=4, width=8, input_size=(16, 16))
        >>> D(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 1, 16, 16])
        >>> 0.9 <= D.lipschitz_bound() < 1.0
        True
    """

    def __init__(
        self,
        channels: int = 3,
        depth: int = 17,
        width: int = 64,
        *,
        lipschitz: float = 0.9,
        kernel_size: int = 3,
        power_iterations: int = 1,
        warmup_iterations: int = 100,
        input_size: tuple[int, int] | None = None,
        init: str = "identity",
        skip: float | None = 0.1,
    ) -> None:
        super().__init__()
        _check_depth_width(channels, depth, width)
        check_float("lipschitz", lipschitz, low=0.0, high=1.0, low_open=True, high_open=True)
        if skip is not None:
            check_float("skip", skip, low=0.0, high=1.0, low_open=True, high_open=True)
        self.channels = channels
        self.depth = depth
        self.width = width
        self.kernel_size = kernel_size
        self.lipschitz = float(lipschitz)

        def conv(c_in: int, c_out: int) -> NormalizedConv2d:
            return NormalizedConv2d(
                c_in,
                c_out,
                kernel_size,
                power_iterations=power_iterations,
                warmup_iterations=warmup_iterations,
            )

        layers: list[nn.Module] = [conv(channels, width), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [conv(width, width), nn.ReLU()]
        layers.append(conv(width, channels))
        self.layers = nn.Sequential(*layers)
        self.raw_mix: nn.Parameter | None = None
        if skip is not None:  # t = sigmoid(raw_mix), learned
            self.raw_mix = nn.Parameter(torch.tensor(math.log(skip / (1 - skip))))
        if init == "identity":
            _split_identity_init(self.convs(), channels, width)
        elif init != "default":
            raise ValueError(f"init must be 'identity' or 'default', got {init!r}")
        if input_size is not None:
            self.calibrate(input_size)

    def convs(self) -> list[NormalizedConv2d]:
        """The normalised convolutions, first to last."""
        return [m for m in self.layers if isinstance(m, NormalizedConv2d)]

    def calibrate(self, input_size: tuple[int, int], power_iterations: int | None = None) -> None:
        """Size every layer's power vector for ``(H, W)`` images and run ``power_iterations``
        steps (default: the warm-up on a new size, each layer's ``power_iterations``
        otherwise)."""
        if len(input_size) != 2 or any(int(s) < 1 for s in input_size):
            raise ValueError(f"input_size must be (H, W) with H, W >= 1, got {input_size!r}")
        for conv in self.convs():
            conv.calibrate((int(input_size[0]), int(input_size[1])), power_iterations)

    def calibrate_exact(self, input_size: tuple[int, int] | None = None) -> None:
        """Give every layer its exact norm (:meth:`NormalizedConv2d.calibrate_exact`), so that
        :meth:`lipschitz_bound` equals ``lipschitz`` up to rounding.

        Training moves the weights faster than one power step per update can follow, and
        the certified bound then drifts above 1; calling this after training (or at each
        validation) restores it.

        Args:
            input_size: ``(H, W)``; default: each layer's calibrated size.
        """
        if input_size is None and any(conv.input_size is None for conv in self.convs()):
            raise ValueError(
                "the layers are not calibrated for any size yet: pass input_size=(H, W) or run "
                "a forward pass first"
            )
        for conv in self.convs():
            conv.calibrate_exact(input_size)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        _check_image(x, self.channels)
        out: Tensor = self.layers(x)
        if self.raw_mix is not None:
            t = torch.sigmoid(self.raw_mix)
            out = (1 - t) * x + t * out
        return self.lipschitz * out

    @property
    def mix(self) -> float | None:
        """The network's share :math:`t` in the convex skip (``None`` without one)."""
        return None if self.raw_mix is None else float(torch.sigmoid(self.raw_mix.detach()))

    def lipschitz_bound(self) -> float:
        r"""The guaranteed :math:`s ((1 - t) + t \prod_l \rho_l) \ge \operatorname{Lip}(D)` at
        the calibrated input size (exact per-layer norms by FFT and SVD: a few hundred
        milliseconds for ``width=64`` on a CPU, so call it to report, not in a training loop)."""
        log_bound = 0.0
        for conv in self.convs():
            log_bound += math.log(conv.lipschitz_ratio())
        t = 1.0 if self.mix is None else self.mix
        return self.lipschitz * ((1 - t) + t * math.exp(log_bound))


def _split_identity_init(convs: list[NormalizedConv2d], channels: int, width: int) -> None:
    """Near-identity init for ``ContractiveDnCNN``: x -> (x, -x) -> ... -> relu(x) - relu(-x)."""
    with torch.no_grad():
        for conv in convs:
            conv.conv.weight.mul_(0.1)
            if conv.conv.bias is not None:
                conv.conv.bias.zero_()
        c = convs[0].kernel_size // 2
        pairs = min(channels, width // 2)
        first, last = convs[0].conv.weight, convs[-1].conv.weight
        for i in range(pairs):
            first[2 * i, i, c, c] += 1.0
            first[2 * i + 1, i, c, c] -= 1.0
            last[i, 2 * i, c, c] += 1.0
            last[i, 2 * i + 1, c, c] -= 1.0
        for conv in convs[1:-1]:
            for i in range(width):
                conv.conv.weight[i, i, c, c] += 1.0
