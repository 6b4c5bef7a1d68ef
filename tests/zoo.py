"""Problems with known answers for the core tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Affine:
    r"""``f(z, x) = W z + U x + b`` with ``||W||_2 = contraction < 1`` (float64).

    Fixed point :math:`z^\star = (I - W)^{-1} (U x + b)`; for a loss
    :math:`L = \sum c \cdot z^\star`, :math:`u = (I - W^\top)^{-1} c` and
    :math:`\partial L / \partial b = \sum_b u`, :math:`\partial L / \partial W = u^\top z^\star`,
    :math:`\partial L / \partial U = u^\top x`, :math:`\partial L / \partial x = u U`.
    """

    W: Tensor
    U: Tensor
    b: Tensor

    @classmethod
    def make(
        cls, n: int = 6, d: int = 3, contraction: float = 0.7, seed: int = 0, symmetric=False
    ) -> Affine:
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=torch.float64)
        if symmetric:
            W = W + W.T
        W = contraction * W / torch.linalg.matrix_norm(W, 2)
        U = torch.randn(n, d, generator=g, dtype=torch.float64)
        b = torch.randn(n, generator=g, dtype=torch.float64)
        return cls(W, U, b)

    def __call__(self, z: Tensor, x: Tensor) -> Tensor:
        return z @ self.W.T + x @ self.U.T + self.b

    def solution(self, x: Tensor) -> Tensor:
        eye = torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return torch.linalg.solve(eye - self.W, (x @ self.U.T + self.b).T).T

    def adjoint(self, c: Tensor) -> Tensor:
        eye = torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return torch.linalg.solve(eye - self.W.T, c.T).T


class AffineModule(nn.Module):
    """The affine map with trainable ``W``, ``U``, ``b`` (copies of an :class:`Affine`)."""

    def __init__(self, problem: Affine) -> None:
        super().__init__()
        self.W = nn.Parameter(problem.W.clone())
        self.U = nn.Parameter(problem.U.clone())
        self.b = nn.Parameter(problem.b.clone())

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return z @ self.W.T + x @ self.U.T + self.b


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + U x + b)`` with ``||W||_2 <= scale`` (contractive)."""

    def __init__(self, n: int = 5, d: int = 3, scale: float = 0.6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(scale * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(n, d, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class ConvCell(nn.Module):
    """A small contractive convolutional cell on ``(B, C, H, W)`` states."""

    def __init__(self, channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.3 / self.conv.weight.abs().sum(dim=(1, 2, 3), keepdim=True))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(z) + x)


def scaled_map(rates: Tensor, target: Tensor):
    """``f(z) = target + rates * (z - target)``: per-sample contraction ``rates`` (B,)."""

    def f(z: Tensor) -> Tensor:
        return target + rates.view(-1, *([1] * (z.dim() - 1))) * (z - target)

    return f
