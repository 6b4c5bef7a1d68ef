"""LBEN's contract: the certified Lipschitz bound of x -> y holds, and is tight where it
should be."""

from __future__ import annotations

import pytest
import torch
from monotone_zoo import F64, dense_newton

import implicitlayers as il


def solve(cell: il.nn.LBEN, x: torch.Tensor) -> torch.Tensor:
    """y(x) at a Newton-polished equilibrium (float64)."""
    W = cell.weight().detach()
    z = dense_newton(W, cell.inject(x).detach())
    return cell.output(z).detach()


def jacobian(cell: il.nn.LBEN, x: torch.Tensor) -> torch.Tensor:
    r"""dy/dx = W_o (I - D W)^{-1} D U at each sample's equilibrium, ``(B, p, d)``."""
    W = cell.weight().detach()
    z = dense_newton(W, cell.inject(x).detach())
    D = ((z @ W.T + cell.inject(x).detach()) > 0).to(F64)
    eye = torch.eye(W.shape[0], dtype=F64)
    inner = torch.linalg.solve(eye - D[:, :, None] * W, D[:, :, None] * cell.U.detach())
    return cell.output_layer.weight.detach() @ inner


@pytest.mark.parametrize("gamma", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_lipschitz_bound_holds_for_random_weights(gamma: float, seed: int):
    torch.manual_seed(seed)
    cell = il.nn.LBEN(4, 12, 3, lipschitz=gamma, margin=0.05).double()
    with torch.no_grad():  # large, unstructured weights: the bound must hold for all of them
        for p in cell.parameters():
            p.normal_(0.0, 2.0)
    x = torch.randn(64, 4, dtype=F64)
    norms = torch.linalg.matrix_norm(jacobian(cell, x), ord=2)
    assert bool((norms <= gamma * (1 + 1e-9)).all())
    x2 = x + 0.3 * torch.randn_like(x)
    ratio = (solve(cell, x2) - solve(cell, x)).norm(dim=1) / (x2 - x).norm(dim=1)
    assert bool((ratio <= gamma * (1 + 1e-9)).all())
    # Along the equilibria's own worst directions the bound is approached, not vacuous.
    assert norms.max() > 0.05 * gamma


@pytest.mark.parametrize("gamma", [0.3, 4.0])
def test_bound_is_tight_on_the_extremal_scalar_layer(gamma: float):
    """n = d = p = 1, V = S = 0, U = W_o = sqrt(gamma): in the active region
    dy/dx = W_o U / (m + (W_o^2 + U^2) / (2 gamma)) = gamma / (1 + m / 1) -> gamma."""
    cell = il.nn.LBEN(1, 1, 1, lipschitz=gamma, margin=1e-6).double()
    with torch.no_grad():
        cell.V.zero_()
        cell.S.zero_()
        cell.U.fill_(gamma**0.5)
        cell.output_layer.weight.fill_(gamma**0.5)
        cell.bias.fill_(1.0)
        cell.output_layer.bias.zero_()
    x = torch.tensor([[0.5], [1.5]], dtype=F64)
    y = solve(cell, x)
    slope = float((y[1] - y[0]) / (x[1] - x[0]))
    assert slope == pytest.approx(gamma / (1 + 1e-6), rel=1e-9)
    deq = il.MonotoneDEQ(cell, solver=il.nn.PeacemanRachford(rtol=1e-12, atol=1e-14))
    with torch.no_grad():
        y_deq = cell.output(deq(x).z)
    torch.testing.assert_close(y_deq, y, rtol=1e-9, atol=1e-12)


def test_certificate_reports_the_bound_and_its_proof():
    torch.manual_seed(2)
    cell = il.nn.LBEN(3, 6, 2, lipschitz=1.5, margin=0.25).double()
    cert = cell.certificate((6,), il.nn.PeacemanRachford())
    assert cert.output_lipschitz == 1.5
    M = torch.eye(6, dtype=F64) - cell.weight().detach()
    w_o, U = cell.output_layer.weight.detach(), cell.U.detach()
    slack = M + M.T - (w_o.T @ w_o + U @ U.T) / 1.5
    assert cert.lmi_margin == pytest.approx(torch.linalg.eigvalsh(slack).min().item(), rel=1e-9)
    assert cert.lmi_margin >= 2 * 0.25 - 1e-12
    assert "Lipschitz bound of x -> y: 1.5" in cert.summary()
    # A monotone cell without an output has no such fields.
    plain = il.nn.MonotoneLinear(3, 6).certificate((6,), il.nn.PeacemanRachford())
    assert plain.output_lipschitz is None and plain.lmi_margin is None
