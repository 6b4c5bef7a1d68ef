"""Monotone cells' contract: the parametrisation, the exact operators and the certificate.

Every constant of the certificate is recomputed here from the dense matrix of the layer
(built independently of the layer's own Fourier code for the convolution) with dense
eigen- and singular-value decompositions, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from monotone_zoo import F64, dense_M, dense_newton

import implicitlayers as il


def cells() -> list[tuple[il.nn.MonotoneCell, torch.Tensor]]:
    """(cell, input) pairs with random weights, scaled up so that ||W|| > 1."""
    torch.manual_seed(3)
    out: list[tuple[il.nn.MonotoneCell, torch.Tensor]] = []
    dense = il.nn.MonotoneLinear(3, 6, margin=0.2).double()
    lben = il.nn.LBEN(3, 6, 2, lipschitz=1.5, margin=0.3).double()
    conv = il.nn.MonotoneConv2d(1, 2, margin=0.4).double()
    with torch.no_grad():
        for p in (dense.A, dense.B, lben.V, lben.S, conv.A, conv.B):
            p.mul_(3.0)
    out.append((dense, torch.randn(4, 3, dtype=F64)))
    out.append((lben, torch.randn(4, 3, dtype=F64)))
    out.append((conv, torch.randn(4, 1, 3, 5, dtype=F64)))
    return out


CELLS = cells()
IDS = ["dense", "lben", "conv-3x5"]


# -- The parametrisation ----------------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.01, 0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_weight_is_the_monotone_parametrisation(margin: float, seed: int):
    torch.manual_seed(seed)
    cell = il.nn.MonotoneLinear(5, 9, margin=margin).double()
    A, B = cell.A.detach(), cell.B.detach()
    eye = torch.eye(9, dtype=F64)
    expected = (1 - margin) * eye - A.T @ A + B - B.T
    torch.testing.assert_close(cell.weight().detach(), expected)
    sym = eye - (expected + expected.T) / 2
    assert torch.linalg.eigvalsh(sym).min() >= margin - 1e-12


@pytest.mark.parametrize(
    ("size", "kernel_size"), [((8, 8), 3), ((7, 5), 3), ((1, 3), 3), ((2, 2), 5), ((6, 9), 5)]
)
def test_conv_operator_is_the_periodic_convolution(size: tuple[int, int], kernel_size: int):
    torch.manual_seed(0)
    cell = il.nn.MonotoneConv2d(2, 3, kernel_size=kernel_size, margin=0.3).double()
    shape = (3, *size)
    M = dense_M(cell, shape)
    z = torch.randn(2, *shape, dtype=F64)
    torch.testing.assert_close(cell.operator(shape)(z).reshape(2, -1), z.reshape(2, -1) @ M.T)
    # The layer's own dense W (through its Fourier code) agrees with the shifted convolutions.
    torch.testing.assert_close(cell.dense_weight(size), torch.eye(M.shape[0], dtype=F64) - M)
    # And the equilibrium map is ReLU(W z + U x + b) with U the zero-padded input convolution.
    x = torch.randn(2, 2, *size, dtype=F64)
    Wz = z.reshape(2, -1) @ (torch.eye(M.shape[0], dtype=F64) - M).T
    expected = torch.relu(Wz.reshape(2, *shape) + cell.U(x))
    torch.testing.assert_close(cell(z, x), expected)


@pytest.mark.parametrize(("cell", "x"), CELLS, ids=IDS)
def test_resolvent_solves_the_linear_system(cell: il.nn.MonotoneCell, x: torch.Tensor):
    shape = cell.state_shape(x)
    M = dense_M(cell, shape)
    v = torch.randn(3, *shape, dtype=F64)
    y = cell.resolvent(0.7, shape)(v).reshape(3, -1)
    lhs = y + 0.7 * y @ M.T
    torch.testing.assert_close(lhs, v.reshape(3, -1))


# -- The certificate, recomputed from the dense matrix -----------------------------------------


@pytest.mark.parametrize(("cell", "x"), CELLS, ids=IDS)
@pytest.mark.parametrize("solver", [il.nn.ForwardBackward(), il.nn.PeacemanRachford()])
def test_certificate_matches_dense_eigenvalues(cell, x, solver):
    shape = cell.state_shape(x)
    cert = cell.certificate(shape, solver)
    M = dense_M(cell, shape)
    n = M.shape[0]
    eye = torch.eye(n, dtype=F64)
    mu = torch.linalg.eigvalsh((M + M.T) / 2).min().item()
    L = torch.linalg.matrix_norm(M, 2).item()
    w_norm = torch.linalg.matrix_norm(eye - M, 2).item()
    close = dict(rel=1e-9, abs=1e-12)
    assert cert.monotonicity == pytest.approx(mu, **close)
    assert cert.lipschitz == pytest.approx(L, **close)
    assert cert.weight_norm == pytest.approx(w_norm, **close)
    assert cert.monotonicity >= cert.margin - 1e-12
    assert cert.weight_norm > 1.0  # these layers' z -> Wz is not a contraction
    a = cert.alpha
    if cert.splitting == "forward-backward":
        assert a == pytest.approx(mu / L**2, **close)
        rate = torch.linalg.matrix_norm(eye - a * M, 2).item()
        textbook = math.sqrt(1 - 2 * a * cert.margin + a**2 * L**2)
        factor = min(1 / (1 - rate), 1 + rate / (a * mu))
    else:
        assert a == pytest.approx(1 / L, **close)
        cayley = (eye - a * M) @ torch.linalg.inv(eye + a * M)
        rate = torch.linalg.matrix_norm(cayley, 2).item()
        textbook = math.sqrt(1 - 4 * a * cert.margin / (1 + 2 * a * cert.margin + a**2 * L**2))
        factor = 1 / (1 - rate)
    assert cert.rate == pytest.approx(rate, **close)
    assert cert.rate_from_margin == pytest.approx(textbook, **close)
    assert cert.rate <= cert.rate_from_margin < 1
    assert cert.error_factor == pytest.approx(factor, **close)
    assert cert.natural_factor == pytest.approx(1 + w_norm / mu, **close)
    assert cert.state_shape == shape


def splitting_operator(cell, shape, cert, c):
    """The splitting operator as MonotoneDEQ iterates it, written from its definition."""
    a = cert.alpha
    if cert.splitting == "forward-backward":
        M = cell.operator(shape)
        return lambda v: torch.relu(v - a * (M(v) - c))
    R = cell.resolvent(a, shape)

    def T(v):
        reflected = 2 * torch.relu(v) - v
        return 2 * R(reflected + a * c) - reflected

    return T


@pytest.mark.parametrize(("cell", "x"), CELLS, ids=IDS)
def test_splitting_operators_contract_at_the_certified_rate(cell, x):
    """||T(v) - T(v')|| <= rate ||v - v'|| for random pairs (T built as MonotoneDEQ builds it)."""
    shape = cell.state_shape(x)
    c = cell.inject(x).detach()
    for solver in (il.nn.ForwardBackward(), il.nn.PeacemanRachford(alpha=0.8)):
        cert = cell.certificate(shape, solver)
        T = splitting_operator(cell, shape, cert, c)
        with torch.no_grad():
            for _ in range(20):
                v1, v2 = 3 * torch.randn(2, *c.shape, dtype=F64)
                ratio = (T(v1) - T(v2)).flatten(1).norm(dim=1) / (v1 - v2).flatten(1).norm(dim=1)
                assert bool((ratio <= cert.rate * (1 + 1e-12)).all())


def test_certificate_iterations_and_bounds():
    cell = il.nn.MonotoneLinear(2, 4, margin=0.5).double()
    cert = cell.certificate((4,), il.nn.PeacemanRachford())
    c, g = cert.error_factor, cert.rate
    k = cert.iterations(1e-6, initial_residual=2.0)
    assert c * g**k * 2.0 <= 1e-6 < c * g ** (k - 1) * 2.0
    assert cert.error_after(k, 2.0) == pytest.approx(c * g**k * 2.0, rel=1e-12)
    assert cert.error_after(0, 2.0) == pytest.approx(2.0 * c)
    with pytest.raises(ValueError, match="iterations must be an int >= 0, got -1"):
        cert.error_after(-1, 2.0)
    assert cert.iterations(1e3, initial_residual=2.0) == 0
    torch.testing.assert_close(cert.error_bound(torch.tensor([1.0, 2.0])), torch.tensor([c, 2 * c]))
    with pytest.raises(ValueError, match="error must be > 0"):
        cert.iterations(0.0, 1.0)
    text = cert.summary()
    assert "contraction rate (exact)" in text and f"{cert.rate:.6g}" in text


def test_a_large_forward_backward_step_is_not_certified():
    torch.manual_seed(0)
    cell = il.nn.MonotoneLinear(2, 8, margin=0.1)
    cert = cell.certificate((8,), il.nn.ForwardBackward(alpha=10.0))
    assert not cert.certified and cert.rate >= 1
    # The monotonicity bound still holds for any step: the error factor stays finite.
    assert math.isfinite(cert.error_factor)
    with pytest.raises(ValueError, match="not certified"):
        cert.iterations(1e-3, 1.0)
    assert cert.error_after(10, 1.0) == math.inf
    pr = cell.certificate((8,), il.nn.PeacemanRachford(alpha=10.0))
    assert pr.certified  # every Peaceman-Rachford step is


# -- The a-posteriori bound for any state ------------------------------------------------------


@pytest.mark.parametrize(("cell", "x"), CELLS, ids=IDS)
def test_certify_bounds_the_error_of_any_state(cell, x):
    shape = cell.state_shape(x)
    M = dense_M(cell, shape)
    W = torch.eye(M.shape[0], dtype=F64) - M
    c = cell.inject(x).detach().reshape(len(x), -1)
    z_star = dense_newton(W, c)
    for scale in (1e-6, 1e-2, 1.0, 10.0):
        z = (z_star + scale * torch.randn_like(z_star)).reshape(len(x), *shape)
        error = (z.reshape(len(x), -1) - z_star).norm(dim=1)
        bound = cell.certify(z, x)
        assert bool((error <= bound * (1 + 1e-9) + 1e-13).all())
        assert bool((bound <= 1e3 * error).all())  # and not vacuous


# -- Shapes, dtypes and errors ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_odd_sizes_are_kept(dtype: torch.dtype):
    cell = il.nn.MonotoneConv2d(3, 4, margin=0.5).to(dtype)
    x = torch.randn(2, 3, 5, 7, dtype=dtype)
    z = torch.rand(2, 4, 5, 7, dtype=dtype)
    out = cell(z, x)
    assert out.dtype == dtype and out.shape == (2, 4, 5, 7)
    assert cell.certificate((4, 5, 7), il.nn.PeacemanRachford()).state_shape == (4, 5, 7)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: il.nn.MonotoneLinear(2, 4, margin=0.0), ValueError, r"margin must .*got margin=0"),
        (lambda: il.nn.MonotoneLinear(2, 4, margin=-1), ValueError, "margin=-1"),
        (lambda: il.nn.MonotoneLinear(2, 4, margin=math.nan), ValueError, "margin=nan"),
        (lambda: il.nn.MonotoneLinear(2, 4, margin="1"), TypeError, "margin must be a float"),
        (lambda: il.nn.MonotoneLinear(2, 4, margin=True), TypeError, "margin must be a float"),
        (lambda: il.nn.MonotoneLinear(2, 0), ValueError, "features must be >= 1, got 0"),
        (lambda: il.nn.MonotoneLinear(2.0, 4), TypeError, "in_features must be an int"),
        (lambda: il.nn.MonotoneConv2d(1, 4, kernel_size=4), ValueError, "kernel_size must be odd"),
        (lambda: il.nn.LBEN(2, 4, 1, lipschitz=0.0), ValueError, "lipschitz=0.0"),
        (lambda: il.nn.LBEN(2, 4, 1, lipschitz=None), TypeError, "lipschitz must be a float"),
        (lambda: il.nn.LBEN(2, 4, 1), TypeError, "lipschitz"),  # required
    ],
)
def test_bad_arguments_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_wrong_input_and_state_shapes_raise():
    cell = il.nn.MonotoneLinear(3, 5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\)"):
        cell(torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"state must have shape \(2, 5\)"):
        cell(torch.zeros(2, 4), torch.zeros(2, 3))
    conv = il.nn.MonotoneConv2d(1, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        conv.inject(torch.zeros(2, 8, 8))
