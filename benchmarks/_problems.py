"""The problems the suites solve: small tanh DEQ layers and the DE-GRAD deblurring cell.

Every cell is an ``nn.Module`` called as ``f(z, *inputs)``. Contractivity is set by scaling
the convolution to a chosen operator norm (power iteration on the convolution and its
adjoint), so the contraction factor is known rather than hoped for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Unavailable(RuntimeError):
    """A problem cannot be built here (e.g. ``implicitlayers.imaging`` is missing)."""


@torch.no_grad()
def conv_operator_norm(weight: Tensor, shape: tuple[int, int, int], iters: int = 60) -> float:
    r"""Estimate :math:`\|A\|_2` of the zero-padded 'same' convolution with ``weight``.

    Power iteration on :math:`A^\top A` (``conv2d`` then ``conv_transpose2d``).

    Args:
        weight: ``(C_out, C_in, k, k)`` kernel, ``k`` odd.
        shape: ``(C_in, H, W)`` of the input.
        iters: Power iterations.
    """
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn((1, *shape), generator=gen, dtype=weight.dtype).to(weight.device)
    pad = weight.shape[-1] // 2
    sigma_sq = 0.0
    for _ in range(iters):
        x = x / torch.linalg.vector_norm(x)
        x = F.conv_transpose2d(F.conv2d(x, weight, padding=pad), weight, padding=pad)
        sigma_sq = float(torch.linalg.vector_norm(x))
    return math.sqrt(sigma_sq)


class TanhConvCell(nn.Module):
    r"""A standard convolutional DEQ layer, :math:`f(z, x) = \tanh(W * z + x)`.

    The 3x3 convolution :math:`W` is scaled to operator norm ``contraction``, so ``f`` is a
    contraction in :math:`z` with at most that factor (``tanh`` is 1-Lipschitz).

    Args:
        channels: Channels of :math:`z` and :math:`x`.
        size: Height and width of :math:`z`.
        contraction: Operator norm given to the convolution.
        seed: Seed of the random initialisation.
    """

    def __init__(self, channels: int, size: int, contraction: float = 0.9, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(channels, channels, 3, 3, generator=gen)
        weight *= contraction / conv_operator_norm(weight, (channels, size, size))
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(0.1 * torch.randn(channels, generator=gen))
        self.contraction = contraction

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """Apply the layer."""
        return torch.tanh(F.conv2d(z, self.weight, self.bias, padding=1) + x)


class PerSampleContractionCell(nn.Module):
    r"""A conv layer whose contraction differs per sample: :math:`f(z, x, c) = c\tanh(W*z) + x`.

    :math:`W` is a 3x3 convolution whose only nonzero tap, the centre, is a random orthogonal
    channel mixing, so :math:`W` is orthogonal (every singular value 1) yet costs a full 3x3
    convolution, and sample :math:`i` contracts at a rate close to :math:`c_i` (keep :math:`x`
    small so ``tanh`` stays near its linear range). A batch with :math:`c` spread over
    ``0.3 .. 0.98`` then needs very different iteration counts.

    Args:
        channels: Channels of :math:`z`.
        size: Height and width.
        seed: Seed of the random initialisation.
    """

    def __init__(self, channels: int, size: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=gen))
        weight = torch.zeros(channels, channels, 3, 3)
        weight[:, :, 1, 1] = q
        self.weight = nn.Parameter(weight)
        del size  # the contraction does not depend on the image size

    def forward(self, z: Tensor, x: Tensor, c: Tensor) -> Tensor:
        """Apply the layer; ``c`` has shape ``(B,)``."""
        return c.view(-1, 1, 1, 1) * torch.tanh(F.conv2d(z, self.weight, padding=1)) + x


class ResidualBlockCell(nn.Module):
    r"""An MDEQ-style residual block (Bai et al., 2020), the usual convolutional DEQ cell.

    .. math::

        f(z, x) = \mathrm{GN}_3\bigl(\mathrm{ReLU}\bigl(z + \mathrm{GN}_2(W_2 *
            \mathrm{ReLU}(\mathrm{GN}_1(W_1 * z)) + x)\bigr)\bigr),

    with 3x3 convolutions and GroupNorm (``groups`` groups, affine). Unlike
    :class:`TanhConvCell`, one application saves several state-sized activations for backward
    (two convolution inputs, three GroupNorm inputs, two ReLU outputs), as DEQ cells in the
    literature do. Contractivity is not enforced; the memory suite forces the iteration count.

    Args:
        channels: Channels of :math:`z` and :math:`x`.
        groups: GroupNorm groups.
        seed: Seed of the random initialisation.
    """

    def __init__(self, channels: int, groups: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, channels)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.gn3 = nn.GroupNorm(groups, channels)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """Apply the block."""
        y = F.relu(self.gn1(self.conv1(z)))
        y = self.gn2(self.conv2(y) + x)
        out: Tensor = self.gn3(F.relu(z + y))
        return out


class Counted(nn.Module):
    """Wrap a cell to count its forward calls and the reverse passes through it.

    A reverse pass is counted each time a gradient flows back through an output of the cell
    (one per vector-Jacobian product, whoever computes it), which counts our and torchdeq's
    adjoint iterations the same way.

    Args:
        inner: The cell.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.forward_calls = 0
        self.reverse_calls = 0

    def reset(self) -> None:
        """Zero both counters."""
        self.forward_calls = 0
        self.reverse_calls = 0

    def _count_reverse(self, grad: Tensor) -> None:
        self.reverse_calls += 1

    def forward(self, z: Tensor, *inputs: Any) -> Tensor:
        """Call the cell and count."""
        self.forward_calls += 1
        out: Tensor = self.inner(z, *inputs)
        if out.requires_grad:
            out.register_hook(self._count_reverse)
        return out


@dataclass
class Problem:
    """A fixed-point problem ready to solve.

    Attributes:
        name: Short label for tables.
        cell: ``f`` as an ``nn.Module`` (in eval mode, so it is deterministic).
        inputs: Extra arguments of ``f`` after ``z``.
        z0: Initial iterate ``(B, *S)``.
        info: Sizes and settings for the records.
    """

    name: str
    cell: nn.Module
    inputs: tuple[Tensor, ...]
    z0: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """Unknowns per sample."""
        return int(self.z0[0].numel())

    def f(self, z: Tensor) -> Tensor:
        """``f`` with the inputs bound."""
        out: Tensor = self.cell(z, *self.inputs)
        return out

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Problem:
        """A copy of the problem on ``device`` (and ``dtype``)."""
        import copy

        cell = copy.deepcopy(self.cell).to(device=device, dtype=dtype)
        inputs = tuple(x.to(device=device, dtype=dtype) for x in self.inputs)
        z0 = self.z0.to(device=device, dtype=dtype)
        return Problem(self.name, cell, inputs, z0, dict(self.info))


def tanh_conv_problem(
    *,
    batch: int,
    channels: int,
    size: int,
    contraction: float = 0.9,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Problem:
    """The standard DEQ layer :class:`TanhConvCell` with a random input ``x``."""
    cell = TanhConvCell(channels, size, contraction, seed).eval()
    info = {"family": "tanh_conv", "contraction": contraction}
    shape = (batch, channels, size, size)
    return _injected(f"tanh-conv {channels}x{size}x{size}", cell, shape, seed, info).to(
        device, dtype
    )


def _injected(
    name: str, cell: nn.Module, shape: tuple[int, int, int, int], seed: int, info: dict[str, Any]
) -> Problem:
    """A problem ``f(z, x)`` with a random ``x ~ N(0, 1)`` of ``shape``, started from zero."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    batch, channels, size, _ = shape
    sizes = {"batch": batch, "channels": channels, "size": size}
    return Problem(name, cell, (x,), torch.zeros_like(x), {**info, **sizes})


def imaging_available() -> str | None:
    """``None`` when ``implicitlayers.imaging`` has what DE-GRAD needs, else the reason."""
    try:
        from implicitlayers import imaging
    except Exception as err:  # any import failure means "not here"
        return f"implicitlayers.imaging cannot be imported: {type(err).__name__}: {err}"
    missing = [
        name
        for name in ("GaussianBlur", "ContractiveDnCNN", "DEGRADCell")
        if not hasattr(imaging, name)
    ]
    if missing:
        return f"implicitlayers.imaging lacks {', '.join(missing)}"
    return None


def degrad_problem(
    *,
    batch: int,
    size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    depth: int = 5,
    width: int = 32,
    step_size: float = 0.1,
    seed: int = 0,
) -> Problem:
    r"""The DE-GRAD deblurring operator around a randomly initialised contractive DnCNN.

    ``f(x, d) = DEGRADCell.contractive(GaussianBlur(5, 5.0, 3), ContractiveDnCNN(3, depth,
    width, lipschitz=0.9), step_size=0.1, clamp=None)(x, d)``, i.e. :math:`T(x) = x - \eta
    (A^\top(Ax - d) + x - D(x))` with :math:`\operatorname{Lip}(T) \le 1 - \eta (1 - 0.9)`,
    on a blurred noisy random image ``d`` of shape ``(B, 3, size, size)``, started from the
    adjoint initial point :math:`A^\top d`. The cell is in eval mode, so ``f`` is deterministic
    (the DnCNN's power iterations only run in training mode).

    Raises:
        Unavailable: When ``implicitlayers.imaging`` is missing or incomplete.
    """
    reason = imaging_available()
    if reason is not None:
        raise Unavailable(reason)
    from implicitlayers import imaging

    torch.manual_seed(seed)
    operator = imaging.GaussianBlur(kernel_size=5, std=5.0, channels=3)
    denoiser = imaging.ContractiveDnCNN(channels=3, depth=depth, width=width, lipschitz=0.9)
    cell = imaging.DEGRADCell.contractive(operator, denoiser, step_size=step_size, clamp=None)
    cell = cell.eval().to(device=device, dtype=dtype)
    denoiser.calibrate((size, size))  # the power-iteration warm-up, on the target device
    gen = torch.Generator().manual_seed(seed + 1)
    clean = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device, dtype)
    noise = torch.randn(clean.shape, generator=gen).to(device, dtype)
    with torch.no_grad():
        d = operator(clean) + 0.01 * noise
        z0 = cell.initial_point(d, method="adjoint")
    return Problem(
        name=f"DE-GRAD {size}x{size}",
        cell=cell,
        inputs=(d,),
        z0=z0,
        info={
            "family": "degrad",
            "batch": batch,
            "size": size,
            "dnn_depth": depth,
            "dnn_width": width,
            "step_size": step_size,
            "dim": 3 * size * size,
        },
    )


def residual_block_problem(
    *,
    batch: int,
    channels: int,
    size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Problem:
    """The MDEQ-style :class:`ResidualBlockCell` with a random injection ``x``."""
    cell = ResidualBlockCell(channels, seed=seed).eval()
    shape = (batch, channels, size, size)
    name = f"residual block {channels}x{size}x{size}"
    return _injected(name, cell, shape, seed, {"family": "residual_block"}).to(device, dtype)
