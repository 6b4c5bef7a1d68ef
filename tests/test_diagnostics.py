"""Stability diagnostics against exact Jacobians: Hutchinson estimates and spectral radii."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from implicitlayers.diagnostics import (
    SpectralRadius,
    jacobian_frobenius,
    jacobian_penalty,
    spectral_radius,
    spectral_radius_of,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tanh_layer(n: int = 6, scale: float = 1.2, seed: int = 0, batch: int = 4):
    """``f(z, x) = tanh(W z + x)`` in float64, with a point ``z`` and inputs ``x``."""
    g = gen(seed)
    W = scale * torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(n)
    z = torch.randn(batch, n, generator=g, dtype=F64)
    x = torch.randn(batch, n, generator=g, dtype=F64)
    return W, z, x


def tanh_f(W: Tensor):
    return lambda z, x: torch.tanh(z @ W.T + x)


def per_sample_jacobians(f, z: Tensor, x: Tensor) -> Tensor:
    """``(B, n, n)``: the exact Jacobian of ``f(., x_b)`` at ``z_b`` for every sample."""
    return torch.stack(
        [
            torch.autograd.functional.jacobian(lambda zb, xb=xb: f(zb[None], xb[None])[0], zb)
            for zb, xb in zip(z, x, strict=True)
        ]
    )


def batched(A: Tensor):
    """``f(z, x) = A_b z_b + x_b`` for a ``(B, n, n)`` stack ``A``."""
    return lambda z, x: torch.einsum("bij,bj->bi", A, z) + x


def exact_radius(A: Tensor) -> Tensor:
    return torch.linalg.eigvals(A).abs().amax(dim=-1)


# --------------------------------------------------------------------------------------------
# Hutchinson estimate of ||J||_F^2
# --------------------------------------------------------------------------------------------


def test_hutchinson_with_many_probes_matches_exact_frobenius_norm():
    W, z, x = tanh_layer()
    f = tanh_f(W)
    exact = per_sample_jacobians(f, z, x).pow(2).sum(dim=(1, 2))

    zr = z.clone().requires_grad_()
    fz = f(zr, x)
    m = 4000
    estimate = jacobian_frobenius(fz, zr, n_probes=m, generator=gen(1))
    # The spread of single-probe samples, drawn from the same generator in sequence.
    g = gen(2)
    samples = torch.stack([jacobian_frobenius(fz, zr, generator=g) for _ in range(m)])
    stderr = samples.std(dim=0) / math.sqrt(m)

    assert estimate.shape == (4,)
    assert ((estimate - exact).abs() <= 4 * stderr).all(), (estimate, exact, stderr)
    # Same for the single-probe samples' mean; the spread is a real one, not a degenerate 0.
    assert ((samples.mean(dim=0) - exact).abs() <= 4 * stderr).all()
    assert (stderr > 1e-3 * exact).all() and (stderr < 0.05 * exact).all()


def test_single_probe_estimates_over_many_seeds_are_unbiased():
    W, z, x = tanh_layer(seed=3)
    f = tanh_f(W)
    exact = per_sample_jacobians(f, z, x).pow(2).sum(dim=(1, 2))
    seeds = 3000
    samples = torch.stack(
        [jacobian_penalty(f, z, x, generator=gen(seed)).detach() for seed in range(seeds)]
    )
    stderr = samples.std(dim=0) / math.sqrt(seeds)
    assert ((samples.mean(dim=0) - exact).abs() <= 4 * stderr).all()
    # Gaussian probes: Var ||eps^T J||^2 = 2 ||J J^T||_F^2 (Rademacher probes would differ).
    J = per_sample_jacobians(f, z, x)
    variance = 2 * (J @ J.mT).pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(samples.var(dim=0), variance, rtol=0.25, atol=0)


def test_normalize_divides_by_the_dimension_and_keeps_the_graph_of_fz():
    W, z, x = tanh_layer()
    W = W.clone().requires_grad_()
    zr = z.clone().requires_grad_()
    fz = torch.tanh(zr @ W.T + x)
    plain = jacobian_frobenius(fz, zr, n_probes=3, generator=gen(0))
    normalized = jacobian_frobenius(fz, zr, n_probes=3, generator=gen(0), normalize=True)
    torch.testing.assert_close(normalized, plain / 6, rtol=1e-14, atol=0)
    assert plain.requires_grad
    # fz's graph was not freed: a loss through it still backpropagates, penalty included.
    (fz.sum() + plain.mean()).backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()


def test_create_graph_false_returns_a_detached_equal_estimate():
    W, z, x = tanh_layer()
    W = W.clone().requires_grad_()
    zr = z.clone().requires_grad_()
    fz = torch.tanh(zr @ W.T + x)
    differentiable = jacobian_frobenius(fz, zr, n_probes=2, generator=gen(5))
    monitored = jacobian_frobenius(fz, zr, n_probes=2, generator=gen(5), create_graph=False)
    assert not monitored.requires_grad
    torch.testing.assert_close(monitored, differentiable.detach(), rtol=1e-14, atol=0)


def test_linear_map_gives_exact_frobenius_norm_in_expectation():
    # J = W for every sample; with probes eps, ||eps^T W||^2 is computable in closed form.
    W = torch.randn(5, 5, dtype=F64)
    z = torch.randn(3, 5, dtype=F64)
    estimate = jacobian_penalty(lambda z: z @ W.T, z, n_probes=4, generator=gen(7))
    eps = torch.randn((4, 3, 5), generator=gen(7), dtype=F64)
    torch.testing.assert_close(estimate, (eps @ W).pow(2).sum(-1).mean(0), rtol=1e-12, atol=0)


def test_jacobian_penalty_gradcheck_in_W_and_x():
    W, z, x = tanh_layer(n=5, batch=3)

    def penalty(W: Tensor, x: Tensor) -> Tensor:
        # Reseeded at every evaluation, so that gradcheck sees one deterministic function.
        return jacobian_penalty(tanh_f(W), z, x, n_probes=3, generator=gen(11))

    assert torch.autograd.gradcheck(penalty, (W.requires_grad_(), x.requires_grad_()))
    assert torch.autograd.gradgradcheck(penalty, (W, x))


def test_jacobian_penalty_does_not_backpropagate_into_z():
    W, z, x = tanh_layer()
    W = W.clone().requires_grad_()
    z = z.clone().requires_grad_()
    jacobian_penalty(tanh_f(W), z, x, generator=gen(0)).sum().backward()
    assert z.grad is None
    assert W.grad is not None and W.grad.abs().sum() > 0


def test_jacobian_penalty_accepts_tree_states():
    W, z, x = tanh_layer(n=6)
    f = tanh_f(W)

    def f_tree(state, x):
        flat = torch.cat([state["a"], state["b"].flatten(1)], dim=1)
        out = f(flat, x)
        return {"a": out[:, :2], "b": out[:, 2:].reshape(-1, 2, 2)}

    state = {"a": z[:, :2], "b": z[:, 2:].reshape(-1, 2, 2)}
    tree = jacobian_penalty(f_tree, state, x, n_probes=3, generator=gen(4))
    flat = jacobian_penalty(f, z, x, n_probes=3, generator=gen(4))
    torch.testing.assert_close(tree, flat, rtol=1e-14, atol=0)


def test_jacobian_penalty_under_no_grad_is_computed_and_detached():
    W, z, x = tanh_layer()
    W = W.clone().requires_grad_()
    with torch.no_grad():
        monitored = jacobian_penalty(tanh_f(W), z, x, n_probes=2, generator=gen(3))
    trained = jacobian_penalty(tanh_f(W), z, x, n_probes=2, generator=gen(3))
    assert not monitored.requires_grad and trained.requires_grad
    torch.testing.assert_close(monitored, trained.detach(), rtol=1e-14, atol=0)


def test_jacobian_penalty_of_a_map_constant_in_z_is_zero():
    b = torch.randn(4, requires_grad=True)
    out = jacobian_penalty(lambda z: torch.zeros_like(z) + b, torch.randn(3, 4))
    torch.testing.assert_close(out, torch.zeros(3))


# --------------------------------------------------------------------------------------------
# Spectral radius
# --------------------------------------------------------------------------------------------


def dense_test_maps(n: int = 64) -> Tensor:
    """Three ``(n, n)`` maps with known spectra, stacked to ``(3, n, n)`` (float64).

    0: symmetric, dominant eigenvalue -0.9 (a negative one, so the modulus matters);
    1: non-symmetric, real dominant eigenvalue 1.3;
    2: non-symmetric, dominant complex pair 0.7 e^{+-0.9i} (a rotation block) plus noise.
    """
    g = gen(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = torch.empty(n, dtype=F64).uniform_(-0.55, 0.55, generator=g)
    lam[0] = -0.9
    symmetric = q @ torch.diag(lam) @ q.T

    s = torch.eye(n, dtype=F64) + 0.3 * torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(n)
    mu = torch.empty(n, dtype=F64).uniform_(-0.8, 0.8, generator=g)
    mu[0] = 1.3
    real_dominant = s @ torch.diag(mu) @ torch.linalg.inv(s)

    rotation = torch.zeros(n, n, dtype=F64)
    c, si = math.cos(0.9), math.sin(0.9)
    rotation[:2, :2] = 0.7 * torch.tensor([[c, -si], [si, c]], dtype=F64)
    rest = torch.randn(n - 2, n - 2, generator=g, dtype=F64)
    rotation[2:, 2:] = 0.35 * rest / torch.linalg.eigvals(rest).abs().max()
    complex_pair = rotation + 0.01 * torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(n)
    return torch.stack([symmetric, real_dominant, complex_pair])


def test_dense_test_maps_have_the_intended_spectra():
    A = dense_test_maps()
    eig = torch.linalg.eigvals(A)
    top = eig.abs().argmax(dim=-1)
    dominant = eig[torch.arange(3), top]
    assert dominant[0].imag.abs() < 1e-12 and dominant[0].real < 0  # symmetric, -0.9
    assert dominant[1].imag.abs() < 1e-12 and dominant[1].real > 0  # real, 1.3
    assert dominant[2].imag.abs() > 0.5  # a complex pair: power iteration would oscillate
    torch.testing.assert_close(
        exact_radius(A), torch.tensor([0.9, 1.3, 0.7], dtype=F64), atol=0.01, rtol=0
    )


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_spectral_radius_matches_eigvals_on_dense_maps(mode):
    A = dense_test_maps()
    n = A.shape[-1]
    x = torch.randn(3, n, dtype=F64)
    est = spectral_radius(batched(A), torch.zeros(3, n, dtype=F64), x, mode=mode, generator=gen(0))
    exact = exact_radius(A)
    rel = (est.radius - exact).abs() / exact
    assert (rel < 0.01).all(), (est.radius, exact)
    assert est.converged.all()
    # It stopped by its tolerance, well before the Krylov space filled R^n (which is exact).
    assert (est.n_products < n).all(), est.n_products
    assert est.radius.dtype == F64 and est.n_products.dtype == torch.int64


def test_spectral_radius_of_low_level_matches_in_both_orientations():
    A = dense_test_maps()
    like = torch.zeros(3, A.shape[-1], dtype=F64)
    exact = exact_radius(A)
    for apply in (
        lambda v: torch.einsum("bij,bj->bi", A, v),  # A v
        lambda v: torch.einsum("bij,bi->bj", A, v),  # v^T A
    ):
        est = spectral_radius_of(apply, like, generator=gen(1))
        assert ((est.radius - exact).abs() / exact < 0.01).all()
        assert est.converged.all()


def test_spectral_radius_on_a_pure_rotation_where_power_iteration_fails():
    # Eigenvalues 0.8 e^{+-0.5i} (and 0.3): |A^k v| / |A^(k-1) v| never settles for power
    # iteration, and its Rayleigh quotient is not the modulus. Arnoldi finds the pair exactly.
    c, s = math.cos(0.5), math.sin(0.5)
    A = torch.tensor([[0.8 * c, -0.8 * s, 0.0], [0.8 * s, 0.8 * c, 0.0], [0.0, 0.0, 0.3]])
    est = spectral_radius_of(lambda v: v @ A.T, torch.zeros(2, 3), generator=gen(0))
    torch.testing.assert_close(est.radius, torch.full((2,), 0.8), rtol=1e-5, atol=0)
    assert est.converged.all()
    assert est.radius.dtype == torch.float32


def test_max_iter_two_on_a_hard_map_reports_not_converged():
    g = gen(3)
    A = torch.randn(2, 40, 40, generator=g, dtype=F64) / math.sqrt(40)  # a disc of eigenvalues
    x = torch.zeros(2, 40, dtype=F64)
    est = spectral_radius(batched(A), x, x, max_iter=2, generator=gen(0))
    assert not est.converged.any()
    assert (est.n_products == 2).all()
    assert torch.isfinite(est.radius).all() and (est.radius > 0).all()
    # With the full budget the same maps converge, to the eigenvalues.
    full = spectral_radius(batched(A), x, x, max_iter=40, generator=gen(0))
    assert full.converged.all()
    assert ((full.radius - exact_radius(A)).abs() / exact_radius(A) < 0.01).all()


def test_converged_is_trustworthy_on_random_maps_with_disc_spectra():
    # Random Gaussian maps: the outermost eigenvalues are not separated, the hard case for a
    # stopping rule. Stopping on a small change of the estimate alone reports 11 of these 64
    # samples converged, up to 39 % low; the Ritz-residual condition must prevent that.
    A = torch.randn(64, 32, 32, generator=gen(8), dtype=F64) / math.sqrt(32)
    est = spectral_radius_of(
        lambda v: torch.einsum("bij,bj->bi", A, v), A[:, 0], max_iter=30, generator=gen(9)
    )
    rel = (est.radius - exact_radius(A)).abs() / exact_radius(A)
    assert est.converged.sum() >= 32  # most settle before the cap (which is below n = 32)
    assert (rel[est.converged] < 0.01).all(), rel[est.converged].max()


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_spectral_radius_of_tanh_layer_matches_its_autograd_jacobian(mode):
    W, z, x = tanh_layer(n=16, scale=1.5, seed=5, batch=5)
    W = W.clone().requires_grad_()
    f = tanh_f(W)
    exact = exact_radius(per_sample_jacobians(f, z, x).detach())
    est = spectral_radius(f, z, x, mode=mode, generator=gen(2))
    rel = (est.radius - exact).abs() / exact
    assert (rel < 0.01).all(), (est.radius, exact)
    assert est.converged.all()
    # The samples differ (different points): per-sample, not one batch-wide radius.
    assert exact.max() - exact.min() > 0.05
    # No graph on f's parameters.
    assert not est.radius.requires_grad and W.grad is None


def test_spectral_radius_accepts_tuple_states():
    A = dense_test_maps(n=12)

    def f(state, x):
        flat = torch.cat(state, dim=1)
        out = batched(A)(flat, x)
        return out[:, :5], out[:, 5:]

    z = torch.zeros(3, 12, dtype=F64)
    est = spectral_radius(f, (z[:, :5], z[:, 5:]), z, generator=gen(0))
    flat = spectral_radius(batched(A), z, z, generator=gen(0))
    torch.testing.assert_close(est.radius, flat.radius, rtol=1e-12, atol=0)
    assert ((est.radius - exact_radius(A)).abs() / exact_radius(A) < 0.01).all()


def test_spectral_radius_of_zero_and_constant_maps_is_zero():
    z = torch.randn(2, 4)
    b = torch.randn(4, requires_grad=True)
    for f in (lambda z: 0.0 * z, lambda z: torch.zeros_like(z) + b):
        for mode in ("vjp", "jvp"):
            est = spectral_radius(f, z, mode=mode)
            torch.testing.assert_close(est.radius, torch.zeros(2))
            assert est.converged.all() and (est.n_products == 1).all()


def test_nonfinite_products_are_reported_not_raised():
    A = torch.eye(3).repeat(2, 1, 1)
    A[1, 0, 0] = float("nan")
    est = spectral_radius_of(lambda v: torch.einsum("bij,bj->bi", A, v), torch.zeros(2, 3))
    assert est.converged.tolist() == [True, False]
    assert est.radius[0] == pytest.approx(1.0) and torch.isnan(est.radius[1])


def test_spectral_radius_result_is_frozen_and_sized():
    est = spectral_radius_of(lambda v: 0.5 * v, torch.zeros(3, 2))
    assert isinstance(est, SpectralRadius) and est.batch_size == 3
    torch.testing.assert_close(est.radius, torch.full((3,), 0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.radius = torch.zeros(3)  # type: ignore[misc]


def test_each_option_changes_the_result():
    A = dense_test_maps()
    like = torch.zeros(3, A.shape[-1], dtype=F64)

    def apply(v):
        return torch.einsum("bij,bj->bi", A, v)

    loose = spectral_radius_of(apply, like, rtol=1e-1, generator=gen(0))
    tight = spectral_radius_of(apply, like, rtol=1e-6, generator=gen(0))
    assert (loose.n_products < tight.n_products).all()
    capped = spectral_radius_of(apply, like, max_iter=5, generator=gen(0))
    assert (capped.n_products <= 5).all()
    other_start = spectral_radius_of(apply, like, max_iter=5, generator=gen(1))
    assert not torch.equal(capped.radius, other_start.radius)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_validation_messages_name_the_argument():
    W, z, x = tanh_layer()
    f = tanh_f(W)
    zr = z.clone().requires_grad_()
    fz = f(zr, x)
    with pytest.raises(ValueError, match="n_probes must be >= 1, got 0"):
        jacobian_frobenius(fz, zr, n_probes=0)
    with pytest.raises(TypeError, match="n_probes must be an int"):
        jacobian_penalty(f, z, x, n_probes=2.0)
    with pytest.raises(ValueError, match="n_probes must be >= 1"):
        jacobian_penalty(f, z, x, n_probes=-1)
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        spectral_radius(f, z, x, max_iter=0)
    with pytest.raises(ValueError, match=r"rtol must lie in \(0.0, inf\], got 0"):
        spectral_radius(f, z, x, rtol=0.0)
    with pytest.raises(ValueError, match="rtol must lie in"):
        spectral_radius_of(lambda v: v, z, rtol=-1e-3)
    with pytest.raises(ValueError, match="mode must be one of 'vjp', 'jvp', got 'forward'"):
        spectral_radius(f, z, x, mode="forward")


def test_shape_and_graph_errors_say_what_to_do():
    W, z, x = tanh_layer()
    f = tanh_f(W)
    with pytest.raises(ValueError, match="z must require grad"):
        jacobian_frobenius(f(z, x), z)
    zr = z.clone().requires_grad_()
    with torch.no_grad():
        no_graph = f(zr, x)
    with pytest.raises(ValueError, match="fz has no autograd graph"):
        jacobian_frobenius(no_graph, zr)
    with pytest.raises(ValueError, match=r"z must be flat, of shape \(B, n\)"):
        jacobian_frobenius(f(zr, x), zr.reshape(4, 2, 3))
    with pytest.raises(ValueError, match="must share the batch size"):
        jacobian_frobenius(f(zr, x)[:2], zr)
    with pytest.raises(ValueError, match=r"returned \(B, 3\) for a state of structure \(B, 6\)"):
        jacobian_penalty(lambda z, x: f(z, x)[:, :3], z, x)
    with pytest.raises(ValueError, match=r"the same structure"):
        spectral_radius(lambda z, x: f(z, x)[:, :3], z, x)
    with pytest.raises(ValueError, match=r"like must have shape \(B, n\)"):
        spectral_radius_of(lambda v: v, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="apply\\(v\\) must return a tensor of the shape of v"):
        spectral_radius_of(lambda v: v[:, :1], torch.zeros(2, 3))
    with pytest.raises(TypeError, match="z must hold floating-point tensors"):
        spectral_radius(lambda z: z, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="f must be callable"):
        jacobian_penalty("f", z)  # type: ignore[arg-type]
