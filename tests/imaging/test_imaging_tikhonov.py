"""tikhonov_cg: the normal equations solved by linear.CG, against dense solves."""

import pytest
import torch

from implicitlayers.imaging import GaussianBlur, tikhonov_cg
from implicitlayers.linear import CG

F64 = torch.float64


def _dense(A, n):
    """The matrix of A on (1, 1, n, n) images: column j is A e_j."""
    basis = torch.eye(n * n, dtype=F64).view(n * n, 1, n, n)
    return A(basis).view(n * n, n * n).T


def _textbook_cg(apply, b, steps):
    """Hestenes-Stiefel on one flat system, ``steps`` updates from zero."""
    x, r = torch.zeros_like(b), b
    p, rs = r, r @ r
    for _ in range(steps):
        Mp = apply(p)
        alpha = rs / (p @ Mp)
        x, r = x + alpha * p, r - alpha * Mp
        rs, rs_old = r @ r, rs
        p = r + rs / rs_old * p
    return x


def test_tikhonov_cg_matches_a_dense_solve_per_sample():
    # (A^T A + lam I) x = A^T d, exactly; the second sample is 1e-3 times the first, so a
    # tolerance taken over the batch instead of per sample would stop it early.
    n, lam = 8, 0.05
    A = GaussianBlur(5, 2.0, 1, dtype=F64)
    M = _dense(A, n)
    d = torch.randn(1, 1, n, n, dtype=F64)
    d = torch.cat([d, 1e-3 * d])
    rhs = (M.T @ d.flatten(1).T).T
    exact = torch.linalg.solve(M.T @ M + lam * torch.eye(n * n, dtype=F64), rhs.T).T
    x = tikhonov_cg(A, d, lam=lam, atol=0.0, rtol=1e-13)
    torch.testing.assert_close(x.flatten(1), exact, rtol=1e-10, atol=1e-10 * 1e-3)
    assert float((x[1] - 1e-3 * x[0]).abs().max()) < 1e-13


def test_tikhonov_cg_budget_counts_products_as_linear_cg_does():
    # max_iter = k + 1 is k CG steps and the product that measures the residual; rtol=0
    # runs the whole budget: the textbook iteration's k-th iterate.
    n, lam, k = 6, 0.01, 5
    A = GaussianBlur(5, 5.0, 1, dtype=F64)
    M = _dense(A, n)
    normal = M.T @ M + lam * torch.eye(n * n, dtype=F64)
    d = torch.randn(1, 1, n, n, dtype=F64)
    want = _textbook_cg(lambda v: normal @ v, M.T @ d.flatten(), k)
    x = tikhonov_cg(A, d, lam=lam, max_iter=k + 1, rtol=0.0)
    torch.testing.assert_close(x.flatten(), want, rtol=1e-9, atol=1e-11)  # round-off
    solved = CG(max_iter=k + 1, rtol=0.0).solve(lambda v: A.normal(v) + lam * v, A.adjoint(d))
    assert torch.equal(x, solved.z) and solved.n_steps.tolist() == [k + 1]
    assert float((tikhonov_cg(A, d, lam=lam, max_iter=k, rtol=0.0) - x).abs().max()) > 1e-6


def test_tikhonov_cg_starts_from_x0():
    A = GaussianBlur(5, 5.0, 3, dtype=F64)
    d = torch.randn(2, 3, 12, 12, dtype=F64)
    exact = tikhonov_cg(A, d, lam=0.02, atol=0.0, rtol=1e-13)
    # one product for the first residual, one for the last: no step taken, x0 returned
    assert torch.equal(tikhonov_cg(A, d, lam=0.02, x0=exact, max_iter=2, rtol=0.0), exact)
    assert float((tikhonov_cg(A, d, lam=0.02, max_iter=2, rtol=0.0) - exact).abs().max()) > 1e-3


def test_tikhonov_cg_stops_at_its_tolerance():
    A = GaussianBlur(5, 5.0, 3, dtype=F64)
    d = torch.randn(2, 3, 16, 16, dtype=F64)
    rhs = A.adjoint(d)
    for rtol in (1e-4, 1e-9):
        x = tikhonov_cg(A, d, lam=0.01, atol=0.0, rtol=rtol)
        residual = (A.normal(x) + 0.01 * x - rhs).flatten(1).norm(dim=1)
        assert (residual <= rtol * rhs.flatten(1).norm(dim=1)).all()
        assert (residual > 1e-3 * rtol * rhs.flatten(1).norm(dim=1)).all()  # no more than asked


def test_tikhonov_cg_validation_names_the_argument():
    A, d = GaussianBlur(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="lam"):
        tikhonov_cg(A, d, lam=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        tikhonov_cg(A, d, max_iter=0)
    with pytest.raises(TypeError, match="max_iter"):
        tikhonov_cg(A, d, max_iter=1.5)
    with pytest.raises(ValueError, match="atol and rtol are both 0"):
        tikhonov_cg(A, d, atol=0.0, rtol=0.0)
    with pytest.raises(ValueError, match="rtol"):
        tikhonov_cg(A, d, rtol=-1.0)
    with pytest.raises(ValueError, match="x0 must have rhs's shape"):
        tikhonov_cg(A, d, x0=torch.zeros(3))
    with pytest.raises(TypeError, match="d must be a floating-point tensor"):
        tikhonov_cg(A, torch.ones(1, 3, 8, 8, dtype=torch.long))
