"""Problems with known answers for the core tests.

The contract tests cross these with the registry's solvers, rules and paths
(``tests/registry.py``): :func:`make_problem` builds the problems every solver must solve,
and the maps below have closed-form iterates, per-sample failure statuses, or samples that
couple through the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

F64 = torch.float64


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


# --- Problems every solver solves ----------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """``f(z, *inputs)`` from ``z0``, with its fixed point where it has a closed form."""

    name: str
    f: Callable[..., Any]
    z0: Tensor
    inputs: tuple[Any, ...]
    solution: Tensor | None = None


#: The problems of :func:`make_problem`; those with a closed-form fixed point first.
CLOSED_FORM_PROBLEMS = ["affine", "affine-symmetric"]
PROBLEMS = [*CLOSED_FORM_PROBLEMS, "tanh", "conv"]


def make_problem(name: str) -> Problem:
    """A contractive float64 problem of the zoo: affine maps (closed form), a tanh layer,
    a convolutional layer on image states."""
    gen = torch.Generator().manual_seed(len(name))
    if name in CLOSED_FORM_PROBLEMS:
        if name == "affine":
            problem = Affine.make()
        else:  # slower, with a symmetric W (real eigenvalues up to 0.9)
            problem = Affine.make(n=8, d=3, contraction=0.9, symmetric=True)
        x = torch.randn(4, 3, generator=gen, dtype=F64)
        z0 = torch.zeros(4, problem.W.shape[0], dtype=F64)
        return Problem(name, problem, z0, (x,), problem.solution(x))
    if name == "tanh":
        x = torch.randn(5, 3, generator=gen, dtype=F64)
        return Problem(name, TanhCell(), torch.zeros(5, 5, dtype=F64), (x,))
    if name == "conv":
        x = torch.randn(5, 3, 6, 6, generator=gen, dtype=F64)
        return Problem(name, ConvCell().double(), torch.zeros_like(x), (x,))
    raise ValueError(name)


# --- Maps with closed-form iterates ---------------------------------------------------------


def half_plus_one(z: Tensor) -> Tensor:
    """``f(z) = z / 2 + 1``: fixed point 2, Picard iterates ``2 + (z0 - 2) / 2**k``."""
    return 0.5 * z + 1


def recording(f: Callable[..., Tensor]) -> tuple[Callable[..., Tensor], list[Tensor]]:
    """``f`` and the list of the iterates it is called at (copies, in call order)."""
    calls: list[Tensor] = []

    def g(z: Tensor, *inputs: Any) -> Tensor:
        calls.append(z.detach().clone())
        return f(z, *inputs)

    return g, calls


def tanh_map(n: int = 4, seed: int = 3, scale: float = 0.8):
    """``f(z) = tanh(W z + b)`` with ``||W|| = scale`` (nonlinear: no step solves it exactly),
    and the generator that made it (for a start drawn after it)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=F64)
    W = scale * W / torch.linalg.matrix_norm(W, 2)
    b = torch.randn(n, generator=g, dtype=F64)
    return (lambda z: torch.tanh(z @ W.T + b)), g


# --- Per-sample outcomes ------------------------------------------------------------------


def mixed_batch_map(z: Tensor, rates: Tensor, target: Tensor) -> Tensor:
    """Per-sample behaviour on ``(B, n)`` states: rates below 1 contract towards ``target``,
    1.5 has no fixed point (``z + 1 + z**2``, ``DIVERGED``), 0.99 turns NaN once
    ``sum |z| > 1.5`` (``NONFINITE``)."""
    out = target + rates[:, None] * (z - target)
    out = torch.where(rates[:, None] == 1.5, z + 1 + z**2, out)
    bad = (z.abs().sum(dim=1) > 1.5) & (rates == 0.99)
    return torch.where(bad[:, None], float("nan"), out)


# --- Samples coupled through the batch --------------------------------------------------------


def batch_mean(z: Tensor, x: Tensor) -> Tensor:
    """``0.5 z + x + 0.4 mean(z)`` over the batch: a sample that converged early can leave the
    tolerance as the others move. Fixed point ``2 (x + 4 mean(x))``."""
    return 0.5 * z + x + 0.4 * z.mean(0, keepdim=True)


def non_monotone(z: Tensor, x: Tensor) -> Tensor:
    """Contracts (spectral radius 0.6) but its norm is above 1: residuals rise before they
    fall, so the best iterate is often an earlier one."""
    A = torch.tensor([[0.6, 1.5], [0.0, 0.6]], dtype=z.dtype)
    return z @ A.T + x


def follower(z: Tensor) -> Tensor:
    """Two samples of one feature: sample 0 is sample 1's value plus ``5e-7``, sample 1 halves
    towards 0.004. From 0, sample 0 meets ``atol = 1e-6`` at once and loses it as sample 1
    moves (by ``0.002 / 2**k``): a frozen sample that must run again."""
    return torch.stack([z[1] + 5e-7, 0.5 * z[1] + 0.002])
