"""conjugate_gradient and tikhonov_cg against dense solves."""

import pytest
import torch

from implicitlayers.imaging import GaussianBlur, conjugate_gradient, tikhonov_cg

F64 = torch.float64


def _random_spd(batch, n, cond=50.0):
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=F64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=F64)
    return q @ torch.diag_embed(eig.expand(batch, n)) @ q.transpose(1, 2)


def test_cg_solves_batched_spd_systems():
    M = _random_spd(3, 20)  # a different matrix per sample
    b = torch.randn(3, 20, dtype=F64)
    x = conjugate_gradient(lambda v: (M @ v[..., None])[..., 0], b, steps=60)
    exact = torch.linalg.solve(M, b)
    assert float((x - exact).norm() / exact.norm()) < 1e-8


def test_cg_per_sample_inner_products_on_image_shapes():
    # M acts per sample with very different scales: a batch-global inner product would fail
    scales = torch.tensor([1e-3, 1.0, 1e3], dtype=F64).view(3, 1, 1, 1)
    diag = scales * (1 + torch.rand(3, 2, 4, 4, dtype=F64))
    b = torch.randn(3, 2, 4, 4, dtype=F64)
    x = conjugate_gradient(lambda v: diag * v, b, steps=40)
    torch.testing.assert_close(x, b / diag, rtol=1e-9, atol=0)


def test_cg_tolerance_stops_early_and_x0_is_used():
    M = _random_spd(2, 30, cond=10.0)
    calls = []

    def op(v):
        calls.append(1)
        return (M @ v[..., None])[..., 0]

    b = torch.randn(2, 30, dtype=F64)
    x = conjugate_gradient(op, b, steps=100, tol=1e-6)
    assert len(calls) < 40
    assert float(((op(x) - b).norm(dim=1) / b.norm(dim=1)).max()) <= 1e-6
    exact = torch.linalg.solve(M, b)
    calls.clear()
    x = conjugate_gradient(op, b, x0=exact, steps=10, tol=1e-12)
    assert len(calls) == 1  # only the initial residual
    torch.testing.assert_close(x, exact)


def test_tikhonov_cg_satisfies_normal_equations():
    A = GaussianBlur(5, 5.0, 3, dtype=F64)
    d = torch.randn(2, 3, 16, 16, dtype=F64)
    x = tikhonov_cg(A, d, lam=0.01, steps=200)
    residual = A.normal(x) + 0.01 * x - A.adjoint(d)
    assert float(residual.norm() / A.adjoint(d).norm()) < 1e-9


def test_tikhonov_cg_matches_dense_solve():
    A = GaussianBlur(5, 2.0, 1, dtype=F64)
    n = 8
    basis = torch.eye(n * n, dtype=F64).view(n * n, 1, n, n)
    dense = A(basis).view(n * n, n * n).T  # column j = A e_j
    d = torch.randn(1, 1, n, n, dtype=F64)
    lam = 0.05
    exact = torch.linalg.solve(
        dense.T @ dense + lam * torch.eye(n * n, dtype=F64), dense.T @ d.flatten()
    )
    x = tikhonov_cg(A, d, lam=lam, steps=n * n)
    torch.testing.assert_close(x.flatten(), exact, rtol=1e-8, atol=1e-10)


def test_cg_validation():
    b = torch.randn(2, 3)
    with pytest.raises(TypeError, match="steps"):
        conjugate_gradient(lambda v: v, b, steps=1.5)
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(lambda v: v, b, steps=3, tol=-1.0)
    with pytest.raises(ValueError, match="x0 must have b's shape"):
        conjugate_gradient(lambda v: v, b, steps=3, x0=torch.zeros(3))
    with pytest.raises(ValueError, match="lam"):
        tikhonov_cg(GaussianBlur(), torch.randn(1, 3, 8, 8), lam=-1.0)
