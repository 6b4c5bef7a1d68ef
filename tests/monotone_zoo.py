"""Dense references for the monotone cells' tests: the layer as a matrix, Newton's solution."""

from __future__ import annotations

import torch

import implicitlayers as il

F64 = torch.float64


def dense_circular_conv(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The dense matrix of the periodic cross-correlation with ``kernel`` on flattened
    ``(C, H, W)`` states, built by shifting (independent of the layer's transfer function)."""
    c_out, c_in, k, _ = kernel.shape
    h, w = size
    n_in = c_in * h * w
    basis = torch.eye(n_in, dtype=F64).reshape(n_in, c_in, h, w)
    out = torch.zeros(n_in, c_out, h, w, dtype=F64)
    for a in range(k):
        for b in range(k):
            # y[p] += K[a, b] z[p + (a - k//2, b - k//2)]
            shifted = torch.roll(basis, shifts=(k // 2 - a, k // 2 - b), dims=(2, 3))
            out += torch.einsum("oi,nihw->nohw", kernel[:, :, a, b].to(F64), shifted)
    return out.reshape(n_in, -1).T  # (n_out, n_in)


def dense_M(cell: il.nn.MonotoneCell, shape: tuple[int, ...]) -> torch.Tensor:
    """I - W of a cell as a dense float64 matrix."""
    if isinstance(cell, il.nn.MonotoneConv2d):
        size = (shape[1], shape[2])
        A = dense_circular_conv(cell.A.detach(), size)
        B = dense_circular_conv(cell.B.detach(), size)
        eye = torch.eye(A.shape[0], dtype=F64)
        return cell.margin * eye + A.T @ A - B + B.T
    return torch.eye(shape[0], dtype=F64) - cell.weight().detach().to(F64)


def dense_newton(W: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The equilibrium z = ReLU(W z + c) by semismooth Newton, float64, checked."""
    z = torch.zeros_like(c)
    eye = torch.eye(W.shape[0], dtype=F64)
    for _ in range(100):
        p = z @ W.T + c
        g = z - torch.relu(p)
        if g.norm(dim=1).max() < 1e-14:
            break
        J = eye - (p > 0).to(F64)[:, :, None] * W
        z = z - torch.linalg.solve(J, g.unsqueeze(-1)).squeeze(-1)
    assert (z - torch.relu(z @ W.T + c)).norm(dim=1).max() < 1e-12
    return z
