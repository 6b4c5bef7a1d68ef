"""estimate_lipschitz, circular_conv_norm, and the contraction guarantees built on them."""

import math

import pytest
import torch
import torch.nn.functional as F

import implicitlayers as il
from implicitlayers.imaging import (
    ContractiveDnCNN,
    DEGRADCell,
    GaussianBlur,
    add_noise,
    circular_conv_norm,
    estimate_lipschitz,
)

F64 = torch.float64


def test_estimate_of_linear_and_nonlinear_maps():
    W = torch.randn(6, 6, dtype=F64)
    norm = float(torch.linalg.matrix_norm(W, ord=2))
    assert estimate_lipschitz(
        lambda x: x @ W.T, torch.randn(1, 6, dtype=F64), power_iterations=500
    ) == (pytest.approx(norm, rel=1e-6))
    # tanh(Wx) at 0 has Jacobian W; elsewhere the local norm is smaller (a lower bound)
    assert estimate_lipschitz(
        lambda x: torch.tanh(x @ W.T), torch.zeros(1, 6, dtype=F64), power_iterations=500
    ) == pytest.approx(norm, rel=1e-6)
    far = estimate_lipschitz(lambda x: torch.tanh(x @ W.T), 3 * torch.randn(1, 6, dtype=F64))
    assert far < norm
    assert estimate_lipschitz(lambda x: torch.ones_like(x), torch.randn(2, 3)) == 0.0
    A = GaussianBlur(5, 5.0, 2, dtype=F64)
    assert (
        0.9
        < estimate_lipschitz(A, torch.randn(1, 2, 16, 16, dtype=F64), power_iterations=100)
        <= 1.0
    )
    with pytest.raises(TypeError, match="fn must be callable"):
        estimate_lipschitz(3, torch.randn(2))


def _dense(apply, shape):
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n, dtype=F64).view(n, *shape)
    return apply(basis).reshape(n, -1).T


def test_circular_conv_norm_is_exact_and_bounds_zero_padding():
    weight = torch.randn(3, 2, 3, 3, dtype=F64)
    torus = (7, 6)

    def circular(x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), weight)

    dense_circ = _dense(circular, (2, *torus))
    exact = float(torch.linalg.matrix_norm(dense_circ, ord=2))
    assert circular_conv_norm(weight, torus) == pytest.approx(exact, rel=1e-10)
    dense_zero = _dense(lambda x: F.conv2d(x, weight, padding=1), (2, 5, 4))
    assert float(torch.linalg.matrix_norm(dense_zero, ord=2)) <= exact * (1 + 1e-12)


@pytest.fixture
def contractive_denoiser():
    D = ContractiveDnCNN(channels=1, depth=4, width=8, input_size=(16, 16))
    return D.eval()


def test_contractive_dncnn_estimates_respect_the_bound(contractive_denoiser):
    D = contractive_denoiser
    bound = D.lipschitz_bound()
    assert D.lipschitz <= bound < 0.95  # certified and barely above the nominal 0.9
    g = torch.Generator().manual_seed(1)
    for scale in (0.1, 1.0, 3.0):
        x = scale * torch.randn(2, 1, 16, 16, generator=g)
        est = estimate_lipschitz(D, x, power_iterations=30, generator=g)
        assert 0.05 < est <= bound
    # a smaller nominal constant scales the bound
    small = ContractiveDnCNN(channels=1, depth=4, width=8, lipschitz=0.5, input_size=(16, 16))
    assert 0.5 <= small.lipschitz_bound() < 0.53


def test_calibrate_exact_restores_the_certificate_after_training():
    torch.manual_seed(0)
    D = ContractiveDnCNN(channels=1, depth=4, width=8, input_size=(12, 12))
    opt = torch.optim.Adam(D.parameters(), lr=5e-2)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):  # an aggressive optimiser outruns one power step per forward
        x = torch.randn(4, 1, 12, 12, generator=g)
        opt.zero_grad()
        (-D(x).square().mean()).backward()  # push the gain up
        opt.step()
    drifted = D.lipschitz_bound()
    assert drifted > 1.0
    D.calibrate_exact()
    for conv in D.convs():
        assert conv.lipschitz_ratio() == pytest.approx(1.0, abs=1e-5)
    assert D.lipschitz_bound() == pytest.approx(D.lipschitz, rel=1e-5)
    est = estimate_lipschitz(
        D.eval(), torch.randn(2, 1, 12, 12, generator=g), power_iterations=30, generator=g
    )
    assert est <= D.lipschitz_bound()
    with pytest.raises(ValueError, match=r"pass input_size=\(H, W\)"):
        ContractiveDnCNN(channels=1, depth=2, width=4).calibrate_exact()


def test_contractive_cell_is_a_contraction_with_a_unique_fixed_point(contractive_denoiser):
    A = GaussianBlur(5, 5.0, 1)
    cell = DEGRADCell.contractive(A, contractive_denoiser, step_size=0.5)
    x_true = torch.rand(2, 1, 16, 16) * 2 - 1
    d = add_noise(A(x_true), 0.01)
    bound = cell.lipschitz_bound()
    assert bound < 1
    est = estimate_lipschitz(lambda z: cell(z, d), torch.rand(2, 1, 16, 16) * 2 - 1)
    assert 0.05 < est <= bound
    solver = il.Picard(max_iter=400, atol=1e-7, rtol=0.0)
    with torch.no_grad():
        a = il.fixed_point(cell, torch.zeros_like(d), d, solver=solver)
        b = il.fixed_point(cell, 2 * torch.rand_like(d) - 1, d, solver=solver)
    assert bool(a.converged.all()) and bool(b.converged.all())
    # ||z_a - z_b|| <= (r_a + r_b) / (1 - L) for a contraction with constant L
    gap = float((a.z - b.z).flatten(1).norm(dim=1).max())
    assert gap <= 2e-7 / (1 - bound) + 1e-6
    assert float((a.z - b.z).abs().max()) < 1e-5


def test_contractive_dncnn_skip_is_a_certified_convex_mix():
    """D(x) = s ((1 - t) x + t N(x)): the formula, Lip(D) <= s ((1 - t) + t prod rho_l) (=
    s after exact calibration), measured below it; skip=None is D = s N."""
    torch.manual_seed(0)
    D = ContractiveDnCNN(channels=1, depth=4, width=8, input_size=(12, 12), skip=0.3).double()
    D.eval()
    assert D.mix == pytest.approx(0.3)
    x = torch.randn(2, 1, 12, 12, dtype=F64)
    t = D.mix
    torch.testing.assert_close(D(x), D.lipschitz * ((1 - t) * x + t * D.layers(x)))
    ratios = math.prod(conv.lipschitz_ratio() for conv in D.convs())
    assert D.lipschitz_bound() == pytest.approx(D.lipschitz * ((1 - t) + t * ratios))
    D.calibrate_exact()
    assert D.lipschitz_bound() == pytest.approx(D.lipschitz, rel=1e-6)
    for scale in (0.1, 3.0):
        est = estimate_lipschitz(
            D, scale * torch.randn(2, 1, 12, 12, dtype=F64), power_iterations=50
        )
        assert 0.9 * D.lipschitz * (1 - t) < est <= D.lipschitz_bound()
    plain = ContractiveDnCNN(channels=1, depth=4, width=8, input_size=(12, 12), skip=None).eval()
    assert plain.mix is None and plain.raw_mix is None
    torch.testing.assert_close(plain(x.float()), plain.lipschitz * plain.layers(x.float()))
    with pytest.raises(ValueError, match="skip"):
        ContractiveDnCNN(channels=1, depth=3, width=4, skip=1.0)
