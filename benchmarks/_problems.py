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
def conv_operator_norm(
    weight: Tensor, shape: tuple[int, int, int], power_iterations: int = 60
) -> float:
    r"""Estimate :math:`\|A\|_2` of the zero-padded 'same' convolution with ``weight``.

    Power iteration on :math:`A^\top A` (``conv2d`` then ``conv_transpose2d``).

    Args:
        weight: ``(C_out, C_in, k, k)`` kernel, ``k`` odd.
        shape: ``(C_in, H, W)`` of the input.
        power_iterations: Power iterations.
    """
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn((1, *shape), generator=gen, dtype=weight.dtype).to(weight.device)
    pad = weight.shape[-1] // 2
    sigma_sq = 0.0
    for _ in range(power_iterations):
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


class MLPCell(nn.Module):
    r"""The smallest common DEQ cell, :math:`f(z, x) = \tanh(\tfrac12 W z + U x)`.

    ``W`` and ``U`` are ``nn.Linear(width, width)`` (PyTorch's default initialisation for
    ``U``); ``W``'s weight is set to :math:`2c\,Q` with :math:`Q` orthogonal (from the QR
    factorisation of its default weight), so :math:`\tfrac12 W` has every singular value
    equal to ``contraction`` and residuals shrink by about that factor per Picard step: far
    from both the tolerance and round-off over a few dozen iterations. One call costs two
    small matrix products (the one with ``U`` can be precomputed: ``x`` is fixed), which is
    the regime where the solver's bookkeeping, not ``f``, decides the speed.

    Args:
        width: Features per sample.
        contraction: The singular values of :math:`\tfrac12 W`.
        seed: Seed of the random initialisation.
    """

    def __init__(self, width: int = 64, contraction: float = 0.95, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.W = nn.Linear(width, width)
        self.U = nn.Linear(width, width)
        with torch.no_grad():
            self.W.weight.copy_(2 * contraction * torch.linalg.qr(self.W.weight)[0])
        self.contraction = contraction

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """Apply the cell."""
        return torch.tanh(0.5 * self.W(z) + self.U(x))


class GraphConvCell(nn.Module):
    r"""An implicit graph layer (IGNN-style), :math:`f(Z, X) = \tanh(\kappa\, \hat A Z W + X)`.

    :math:`\hat A = D^{-1/2} (A + I) D^{-1/2}` is the symmetrically normalised adjacency of a
    ring with ``extra_edges`` random chords, stored as a sparse COO matrix (its eigenvalues
    lie in :math:`[-1, 1]`), and :math:`W` is orthogonal, so :math:`f` contracts with factor
    at most :math:`\kappa`. ``Z`` has shape ``(B, nodes, features)``: the sparse product
    runs once per call on the ``(nodes, B * features)`` matrix.

    Args:
        nodes: Graph size.
        features: Features per node.
        contraction: :math:`\kappa`.
        extra_edges: Random chords added to the ring.
        seed: Seed of the graph and of :math:`W`.
    """

    def __init__(
        self,
        nodes: int = 256,
        features: int = 16,
        contraction: float = 0.9,
        extra_edges: int = 512,
        seed: int = 0,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        ring = torch.arange(nodes)
        src = torch.cat((ring, torch.randint(0, nodes, (extra_edges,), generator=gen)))
        dst = torch.cat(
            ((ring + 1) % nodes, torch.randint(0, nodes, (extra_edges,), generator=gen))
        )
        dense = torch.zeros(nodes, nodes)
        dense[src, dst] = 1.0
        dense = ((dense + dense.T) > 0).float() + torch.eye(nodes)
        scale = dense.sum(1).rsqrt()
        adjacency = (scale[:, None] * dense * scale[None, :]).to_sparse().coalesce()
        self.register_buffer("adjacency", adjacency)
        q, _ = torch.linalg.qr(torch.randn(features, features, generator=gen))
        self.weight = nn.Parameter(contraction * q)
        self.contraction = contraction

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """Apply the layer; ``z`` and ``x`` have shape ``(B, nodes, features)``."""
        batch, nodes, features = z.shape
        flat = z.transpose(0, 1).reshape(nodes, batch * features)
        mixed = torch.sparse.mm(self.adjacency, flat)
        mixed = mixed.reshape(nodes, batch, features).transpose(0, 1)
        return torch.tanh(mixed @ self.weight + x)


def mlp_problem(
    *,
    batch: int = 64,
    width: int = 64,
    contraction: float = 0.95,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Problem:
    """:class:`MLPCell` on a random input ``x`` of shape ``(batch, width)``, from zero."""
    cell = MLPCell(width, contraction, seed).eval()
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(seed + 1))
    info = {"family": "mlp", "batch": batch, "width": width, "contraction": contraction}
    problem = Problem(f"MLP {width}", cell, (x,), torch.zeros_like(x), info)
    return problem.to(device, dtype)


def graph_problem(
    *,
    batch: int = 8,
    nodes: int = 256,
    features: int = 16,
    contraction: float = 0.9,
    extra_edges: int = 512,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Problem:
    """:class:`GraphConvCell` on a random input of shape ``(batch, nodes, features)``."""
    cell = GraphConvCell(nodes, features, contraction, extra_edges, seed).eval()
    shape = (batch, nodes, features)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    info = {"family": "graph", "batch": batch, "nodes": nodes, "features": features}
    problem = Problem(f"graph {nodes}x{features}", cell, (x,), torch.zeros_like(x), info)
    return problem.to(device, dtype)


class _Map(nn.Module):
    """A fixed-point map given as a function of ``(z, *inputs)``, as a cell."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, z: Tensor, *inputs: Tensor) -> Tensor:
        """Apply the map."""
        out: Tensor = self.fn(z, *inputs)
        return out


def _robertson(y: Tensor) -> Tensor:
    """The Robertson chemical kinetics right-hand side (a stiff ODE), row by row."""
    k1, k2, k3 = 0.04, 3e7, 1e4
    a, b, c = y.unbind(dim=1)
    return torch.stack((-k1 * a + k3 * b * c, k1 * a - k2 * b**2 - k3 * b * c, k2 * b**2), dim=1)


def small_map_problems(*, batch: int = 4, seed: int = 19) -> list[Problem]:
    r"""Small float64 fixed-point maps with known character, for solver iteration counts.

    In the spirit of optimistix's and NLsolve.jl's fixed-point test problems (rebuilt here,
    in PyTorch, with a batch): scalar maps (:math:`\cos z`, :math:`e^{-z}`,
    :math:`\sqrt{10 / (z + 10)}`, :math:`0.3 \sin z + 1`), a :math:`0.1`-scaled softplus MLP,
    implicit-midpoint steps of a linear ODE and of the stiff Robertson kinetics, and
    :math:`\tanh(Az + x)` at :math:`\|A\| = 0.05, 0.1, 0.2`, which Picard solves in 5 to 12
    evaluations at ``rtol=1e-10`` (``info["picard_easy"]``), plus slow ones where
    acceleration pays (a symmetric tanh layer at 0.95, an affine map at 0.9, a ReLU layer at
    0.99).
    """
    dtype = torch.float64
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    n = 28
    M = randn(n, n)
    W1, b1, W2, b2 = randn(8, n) / math.sqrt(n), randn(8), randn(n, 8) / math.sqrt(8), randn(n)
    ones = 0.5 * torch.ones(batch, n, dtype=dtype) + 0.1 * randn(batch, n)
    y0 = torch.ones(batch, n, dtype=dtype)
    dt = 1 / 16
    r0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=dtype).repeat(batch, 1)
    r0 = r0 + 1e-5 * torch.rand(batch, 3, generator=gen, dtype=dtype)
    A = randn(64, 64)
    A = A / torch.linalg.matrix_norm(A, 2)
    x = randn(batch, 64)
    S = randn(64, 64)
    S = S + S.T
    S = 0.95 * S / torch.linalg.matrix_norm(S, 2)
    R = randn(64, 64)
    R = 0.99 * R / torch.linalg.matrix_norm(R, 2)
    zeros64 = torch.zeros(batch, 64, dtype=dtype)
    start5 = torch.ones(batch, 5, dtype=dtype) + 0.1 * randn(batch, 5)
    cases: list[tuple[str, Any, Tensor, bool]] = [
        ("cos z", torch.cos, ones, False),
        ("exp(-z)", lambda z: torch.exp(-z), ones, False),
        (
            "0.1 softplus MLP",
            lambda z: 0.1 * (F.softplus(z @ W1.T + b1) @ W2.T + b2),
            ones,
            True,
        ),
        ("midpoint, linear ODE", lambda z: y0 + dt * (0.5 * (y0 + z)) @ M.T, y0, False),
        ("Robertson midpoint h=1e-4", lambda y: r0 + 1e-4 * _robertson(0.5 * (r0 + y)), r0, True),
        ("Robertson midpoint h=1e-3", lambda y: r0 + 1e-3 * _robertson(0.5 * (r0 + y)), r0, False),
        ("tanh(Az + x), norm 0.05", lambda z: torch.tanh(0.05 * z @ A.T + x), zeros64, True),
        ("tanh(Az + x), norm 0.1", lambda z: torch.tanh(0.1 * z @ A.T + x), zeros64, True),
        ("tanh(Az + x), norm 0.2", lambda z: torch.tanh(0.2 * z @ A.T + x), zeros64, True),
        ("sqrt(10 / (z + 10))", lambda z: torch.sqrt(10 / (z + 10)), start5, True),
        ("0.3 sin z + 1", lambda z: 0.3 * torch.sin(z) + 1, start5, True),
        ("tanh(Sz + x), S sym., 0.95", lambda z: torch.tanh(z @ S.T + x), zeros64, False),
        ("0.9 Az + x", lambda z: 0.9 * z @ A.T + x, zeros64, False),
        ("relu(Rz + x), 0.99", lambda z: torch.relu(z @ R.T + x), zeros64, False),
    ]
    return [
        Problem(name, _Map(fn), (), z0, {"family": "small_map", "picard_easy": easy})
        for name, fn, z0, easy in cases
    ]
