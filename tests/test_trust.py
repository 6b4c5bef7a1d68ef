"""No wrong answer reported as a success: coupled batches, second order, failed samples."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from zoo import TanhCell

import implicitlayers as il

SOLVERS = [il.Picard, il.Anderson, il.Broyden]
IDS = ["picard", "anderson", "broyden"]


def residual_at(f, result, *inputs):
    z = result.z
    return torch.linalg.vector_norm((f(z, *inputs) - z).reshape(z.shape[0], -1), dim=1)


def within_tolerance(f, result, solver, *inputs):
    z = result.z
    fz = f(z, *inputs)
    res = torch.linalg.vector_norm((fz - z).reshape(z.shape[0], -1), dim=1)
    bound = solver.atol + solver.rtol * torch.linalg.vector_norm(fz.reshape(z.shape[0], -1), dim=1)
    return res <= bound * (1 + 1e-9)


# --- 1. Samples coupled through the batch --------------------------------------------------


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_batch_mean_coupling_succeeds_only_at_the_returned_batch(cls):
    f = lambda z, x: 0.5 * z + x + 0.4 * z.mean(0, keepdim=True)  # noqa: E731
    x = torch.tensor([[1.0], [2.0], [3.0], [40.0]], dtype=torch.float64)
    solver = cls(max_iter=300, rtol=1e-6, atol=0.0)
    result = il.fixed_point(f, torch.zeros(4, 1, dtype=torch.float64), x, solver=solver)
    assert result.converged.all()
    assert within_tolerance(f, result, solver, x).all()
    # z = 0.5 z + x + 0.4 m with m = mean(z): m = 0.5 m + mean(x) + 0.4 m => m = 10 mean(x)
    exact = 2 * (x + 0.4 * 10 * x.mean())
    torch.testing.assert_close(result.z, exact, rtol=1e-4, atol=0)
    torch.testing.assert_close(result.residual, residual_at(f, result, x), rtol=1e-6, atol=1e-12)


def test_unbatched_state_whose_components_couple():
    A = torch.tensor([[0.0, 0.9], [0.0, 0.9]], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    result = il.fixed_point(
        lambda z: A @ z + b, torch.zeros(2, dtype=torch.float64), solver=il.Picard(max_iter=500)
    )
    assert result.converged.all()
    torch.testing.assert_close(
        result.z, torch.tensor([9.0, 10.0], dtype=torch.float64), rtol=1e-2, atol=0
    )
    fz = A @ result.z + b
    assert ((fz - result.z).abs() <= 1e-6 + 1e-4 * fz.abs()).all()


def test_a_sample_that_returns_an_earlier_iterate_is_measured_at_the_returned_batch():
    # Sample 1 diverges and returns its best (first) iterate; sample 0 couples to it, so
    # sample 0's convergence next to the diverging iterate does not hold at the returned batch.
    def f(z):
        return torch.cat((0.5 * z[:1] + 0.1 * z[1:], 3.0 * z[1:] + 1.0))

    solver = il.Picard(max_iter=40, divergence_ratio=1e3)
    result = il.fixed_point(f, torch.zeros(2, 1, dtype=torch.float64), solver=solver)
    assert result.statuses() == [il.Status.MAX_ITER, il.Status.DIVERGED]
    fz = f(result.z)
    res = torch.linalg.vector_norm(fz - result.z, dim=1)
    torch.testing.assert_close(result.residual, res, rtol=1e-12, atol=0)
    assert result.n_f_evals == int(result.n_steps.max()) + 1  # the evaluation at the batch


class _MixAcross(nn.Module):
    """``f(z, x) = tanh(0.5 z + M z_batch + x)``: a fixed mixing matrix across the batch."""

    def __init__(self, batch: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(batch, batch, generator=g, dtype=torch.float64)
        self.M = 0.3 * M / torch.linalg.matrix_norm(M, 2)

    def forward(self, z, x):
        return torch.tanh(0.5 * z + self.M @ z + x)


class _BatchNormCell(nn.Module):
    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(n, n).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, 2))
        self.norm = nn.BatchNorm1d(n, momentum=None, track_running_stats=False).double()
        self.train()

    def forward(self, z, x):
        return 0.5 * torch.tanh(self.norm(self.lin(z) + x))


@settings(max_examples=25, deadline=None)
@given(
    coupling=st.sampled_from(["mean", "mix", "batchnorm"]),
    cls=st.sampled_from(SOLVERS),
    batch=st.integers(2, 6),
    seed=st.integers(0, 1000),
    spread=st.floats(0.1, 30.0),
    rtol=st.sampled_from([1e-3, 1e-6]),
    max_iter=st.integers(3, 60),
)
def test_every_success_is_within_tolerance_at_the_returned_batch_for_coupled_maps(
    coupling, cls, batch, seed, spread, rtol, max_iter
):
    g = torch.Generator().manual_seed(seed)
    n = 3
    x = spread * torch.randn(batch, n, generator=g, dtype=torch.float64)
    x[0] *= 10  # one sample far from the others, as in the report
    if coupling == "mean":
        f = lambda z, x: 0.5 * z + x + 0.4 * z.mean(0, keepdim=True)  # noqa: E731
    elif coupling == "mix":
        f = _MixAcross(batch, seed)
    else:
        f = _BatchNormCell(n, seed)
    solver = cls(max_iter=max_iter, rtol=rtol, atol=0.0)
    result = il.fixed_point(f, torch.zeros(batch, n, dtype=torch.float64), x, solver=solver)
    with torch.no_grad():
        ok = within_tolerance(f, result, solver, x)
        torch.testing.assert_close(
            result.residual, residual_at(f, result, x), rtol=1e-8, atol=1e-12
        )
    assert bool(ok[result.converged].all())


# --- 2. Second order ---------------------------------------------------------------------------

TIGHT = il.Anderson(max_iter=300, rtol=1e-13, atol=1e-14)


def _half_identity_grads(rule):
    """z* = 2x for f = z (0.5 I)^T + x; L = sum z^3; returns (dL/dx, d(sum dL/dx)/dx) at x=1."""
    eye = torch.eye(1, dtype=torch.float64)
    x = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(lambda z, x: z @ (0.5 * eye).T + x, solver=TIGHT, backward=rule)
    z, _ = deq(x)
    (grad,) = torch.autograd.grad((z**3).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    return grad.item(), second.item()


def test_implicit_second_derivative_matches_the_closed_form():
    # dL/dx = 3 z^2 dz/dx = 24 x^2, d/dx = 48 x.
    grad, second = _half_identity_grads(il.ImplicitDifferentiation(solver=TIGHT))
    assert grad == pytest.approx(24.0, rel=1e-10)
    assert second == pytest.approx(48.0, rel=1e-10)


@pytest.mark.parametrize("terms", [0, 1, 3])
def test_neumann_and_jfb_second_order_differentiate_their_own_formula(terms):
    # The rule's surrogate derivative of z* is c = sum_{i<=k} 0.5^i (JFB: c = 1), z* held
    # fixed in J; dL/dx = c 3 z^2 and its derivative is c * 6 z * c = 12 c^2 x at z = 2x.
    c = sum(0.5**i for i in range(terms + 1))
    rule = il.JFB() if terms == 0 else il.Neumann(terms=terms)
    grad, second = _half_identity_grads(rule)
    assert grad == pytest.approx(12.0 * c, rel=1e-10)
    assert second == pytest.approx(12.0 * c**2, rel=1e-10)


def _tanh_fn(x, W):
    f = lambda z, x, W: torch.tanh(z @ W.T + x)  # noqa: E731
    z, _ = il.DEQ(f, solver=TIGHT, backward=il.ImplicitDifferentiation(solver=TIGHT))(x, W)
    return z


def _tuple_fn(x, W):
    def f(z, x, W):
        a, b = z
        return torch.tanh(a @ W.T + 0.5 * b + x), 0.5 * torch.sin(a)

    zeros = torch.zeros_like(x)
    deq = il.DEQ(f, solver=TIGHT, backward=il.ImplicitDifferentiation(solver=TIGHT))
    z, _ = deq(x, W, z0=(zeros, zeros.clone()))
    return z


@pytest.mark.parametrize("fn", [_tanh_fn, _tuple_fn], ids=["tanh", "tuple"])
def test_implicit_gradgradcheck(fn):
    torch.manual_seed(0)
    W = (0.4 * torch.randn(4, 4, dtype=torch.float64) / 2).requires_grad_()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, W))
    assert torch.autograd.gradgradcheck(fn, (x, W), atol=1e-6)


def test_implicit_gradgradcheck_with_module_parameters():
    cell = TanhCell(n=4, d=3, scale=0.6)
    deq = il.DEQ(cell, solver=TIGHT, backward=il.ImplicitDifferentiation(solver=TIGHT))
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    z0 = torch.zeros(2, 4, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda x: deq(x, z0=z0)[0], (x,), atol=1e-6)
    # Second derivatives reach the parameters too: Hessian-vector product against autograd
    # through a long unrolled solve.
    z, _ = deq(x, z0=z0)
    (gW,) = torch.autograd.grad((z**2).sum(), cell.W, create_graph=True)
    (hv,) = torch.autograd.grad(gW.sum(), x)
    zu = torch.zeros(2, 4, dtype=torch.float64)
    for _ in range(200):
        zu = cell(zu, x)
    (gWu,) = torch.autograd.grad((zu**2).sum(), cell.W, create_graph=True)
    (hvu,) = torch.autograd.grad(gWu.sum(), x)
    torch.testing.assert_close(hv, hvu, rtol=1e-8, atol=1e-10)


def test_second_order_through_a_closure_is_exact_and_a_global_is_refused():
    # A tensor a plain f closes over is one the library sees: exact second order.
    gen = torch.Generator().manual_seed(3)
    W = (0.3 * torch.randn(4, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    deq = il.DEQ(lambda z, x: torch.tanh(z @ W.T + x), solver=TIGHT, backward="implicit")
    x = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x: deq(x).z, (x,))
    # d/dW of d(sum z*)/dx, exact (the closure's W moves z* too), against central differences.
    (gx,) = torch.autograd.grad(deq(x).z.sum(), x, create_graph=True)
    (mixed,) = torch.autograd.grad(gx.pow(2).sum(), W)
    eps, numeric = 1e-6, torch.zeros_like(W)
    for i in range(4):
        for j in range(4):
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    W[i, j] += sign * eps
                (g,) = torch.autograd.grad(deq(x).z.sum(), x)
                values.append(g.pow(2).sum())
                with torch.no_grad():
                    W[i, j] -= sign * eps
            numeric[i, j] = (values[0] - values[1]) / (2 * eps)
    torch.testing.assert_close(mixed, numeric, rtol=1e-5, atol=1e-8)
    # One reached through a global is not: second order raises, naming the tensor.
    GLOBALS["W"] = W
    hidden = il.DEQ(_global_cell, solver=TIGHT, backward="implicit")
    with pytest.raises(RuntimeError, match=r"one \(shape \(4, 4\)\) that is none of the"):
        torch.autograd.grad(hidden(x).z.sum(), x, create_graph=True)
    # First order stays available: its gradient reaches W all the same.
    (gW,) = torch.autograd.grad(hidden(x).z.sum(), W)
    (want,) = torch.autograd.grad(deq(x).z.sum(), W)
    torch.testing.assert_close(gW, want, rtol=1e-9, atol=1e-12)


#: A tensor f reaches through a global.
GLOBALS: dict = {}


def _global_cell(z, x):
    return torch.tanh(z @ GLOBALS["W"].T + x)


def test_third_order_is_refused_by_name():
    x = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    deq = il.DEQ(lambda z, x: torch.tanh(0.5 * z + x), solver=TIGHT, backward="implicit")
    z, _ = deq(x)
    (g1,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third- and higher-order"):
        torch.autograd.grad(g1.sum(), x, create_graph=True)


# --- 5. The exact gradient is exact by default, or says it is not --------------------------


def _poisson(N: int = 16):
    """Jacobi for the 2-D Poisson equation on an N x N grid: f(u) = (S u + h^2 (b + x)) / 4."""
    T = torch.diag(torch.ones(N - 1, dtype=torch.float64), 1)
    T = T + T.T
    eye = torch.eye(N, dtype=torch.float64)
    J = (torch.kron(T, eye) + torch.kron(eye, T)) / 4  # rho(J) = cos(pi / (N + 1)) ~ 0.983
    h2 = 1.0 / (N + 1) ** 2

    class Jacobi(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.randn(N * N, dtype=torch.float64))

        def forward(self, u, x):
            return u @ J.T + h2 * (self.b + x) / 4

    return Jacobi(), J, h2


def test_default_implicit_gradient_is_exact_on_a_slowly_contracting_poisson_solve():
    torch.manual_seed(0)
    cell, J, h2 = _poisson()
    n = J.shape[0]
    x = torch.randn(2, n, dtype=torch.float64)
    c = torch.randn(2, n, dtype=torch.float64)
    forward = il.Anderson(max_iter=500, rtol=1e-11, atol=0.0, history_size=10)
    deq = il.DEQ(cell, solver=forward, backward=il.ImplicitDifferentiation())
    z, result = deq(x)
    assert result.converged.all()
    (z * c).sum().backward()
    u = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - J.T, c.T).T
    exact = h2 * u.sum(0) / 4
    error = ((cell.b.grad - exact).norm() / exact.norm()).item()
    assert error < 1e-5, error
    assert deq.last_backward_result.converged.all()


def test_an_unconverged_adjoint_warns_once_and_can_raise():
    cell, _, _ = _poisson()
    x = torch.randn(2, 256, dtype=torch.float64)
    short = il.ImplicitDifferentiation(solver=il.Anderson(max_iter=10))
    deq = il.DEQ(cell, solver=il.Anderson(max_iter=500, rtol=1e-10), backward=short)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            deq(x)[0].sum().backward()
    relevant = [w for w in caught if issubclass(w.category, il.ConvergenceWarning)]
    assert len(relevant) == 1 and "adjoint solve did not converge" in str(relevant[0].message)
    assert not deq.last_backward_result.converged.any()
    strict = dataclasses.replace(short, on_unconverged="raise")
    deq = il.DEQ(cell, solver=il.Anderson(max_iter=500, rtol=1e-10), backward=strict)
    with pytest.raises(il.ConvergenceError, match="adjoint solve did not converge"):
        deq(x)[0].sum().backward()


# --- 6. One bad sample does not poison the batch's gradient --------------------------------


class _Scale(nn.Module):
    """f(z, x) = rate * z + p x per sample: rate 2 diverges, p the one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, z, x, rate):
        return rate[:, None] * z + self.p * x


@pytest.mark.parametrize(
    "rule",
    [il.JFB(), il.Neumann(terms=10), il.ImplicitDifferentiation()],
    ids=["jfb", "neumann", "implicit"],
)
def test_a_diverging_sample_gets_no_gradient_and_leaves_the_others_exact(rule):
    x = torch.ones(3, 1, dtype=torch.float64)
    rate = torch.tensor([0.5, 0.5, 2.0], dtype=torch.float64)
    cell = _Scale()
    deq = il.DEQ(cell, solver=il.Picard(max_iter=60, on_unconverged="ignore"), backward=rule)
    z, result = deq(x, rate)
    assert result.statuses()[2] == il.Status.DIVERGED
    z.sum().backward()
    # Each good sample: z* = 2 p x, d z*/dp = 2 (exact); JFB: x = 1; Neumann(10): sum 0.5^i.
    per_sample = {"JFB": 1.0, "Neumann": sum(0.5**i for i in range(11))}.get(
        type(rule).__name__, 2.0
    )
    assert cell.p.grad.item() == pytest.approx(2 * per_sample, rel=1e-6)


def test_a_nan_input_sample_with_on_nonfinite_ignore_leaves_parameter_gradients_clean():
    cell = TanhCell(n=5, d=3)
    x = torch.randn(4, 3, dtype=torch.float64)
    x_bad = x.clone()
    x_bad[2, 1] = float("nan")
    solver = il.Anderson(max_iter=100, rtol=1e-10, on_nonfinite="ignore")
    z0 = torch.zeros(4, 5, dtype=torch.float64)
    for rule in (il.JFB(), il.ImplicitDifferentiation()):
        deq = il.DEQ(cell, solver=solver, backward=rule)
        cell.zero_grad()
        z, result = deq(x_bad, z0=z0)
        assert result.statuses()[2] == il.Status.NONFINITE
        z[[0, 1, 3]].sum().backward()
        bad_grads = [p.grad.clone() for p in cell.parameters()]
        cell.zero_grad()
        keep = [0, 1, 3]
        deq(x[keep], z0=z0[keep])[0].sum().backward()
        for got, want in zip(bad_grads, cell.parameters(), strict=True):
            torch.testing.assert_close(got, want.grad)


# --- 8. SUCCESS comes with an error estimate -----------------------------------------------


@pytest.mark.parametrize("g", [0.9, 0.99, 0.999, 0.9999])
@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_error_estimate_tracks_the_true_error_where_the_residual_does_not(cls, g):
    solver = cls(max_iter=100000)
    result = il.fixed_point(
        lambda z: g * z + 1, torch.zeros(1, 1, dtype=torch.float64), solver=solver
    )
    assert result.converged.all()
    error = (result.z - 1 / (1 - g)).abs().item()
    estimate = result.error_estimate.item()
    if error > 1e-9:  # accelerated solvers may land on the fixed point exactly
        assert estimate == pytest.approx(error, rel=0.05)
    assert result.rate.item() == pytest.approx(g, rel=1e-6)


# --- Found by a new user -------------------------------------------------------------------


def test_implicit_gradient_under_bfloat16_autocast_and_on_bfloat16_states():
    torch.manual_seed(0)
    cell, inject = nn.Linear(8, 8), nn.Linear(8, 8)
    rule = il.ImplicitDifferentiation(solver=il.GMRES(rtol=1e-2), on_unconverged="ignore")
    deq = il.DEQ(
        lambda z, x: torch.tanh(0.5 * cell(z) + inject(x)),
        solver=il.Anderson(max_iter=50, rtol=1e-2),
        backward=rule,
    )
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, _ = deq(x)
    z.float().square().mean().backward()
    grad_amp = cell.weight.grad.clone()
    cell.zero_grad()
    z32, _ = il.DEQ(deq.f, solver=il.Anderson(max_iter=50, rtol=1e-6), backward="implicit")(x)
    z32.square().mean().backward()
    cosine = torch.nn.functional.cosine_similarity(
        grad_amp.flatten(), cell.weight.grad.flatten(), 0
    )
    assert cosine > 0.98  # bfloat16 products, float32 solve: the same gradient to bf16 accuracy
    xb = torch.randn(3, 4).bfloat16().requires_grad_()
    out = il.DEQ(
        lambda z, x: torch.tanh(0.5 * z + x), solver=il.Anderson(rtol=1e-2), backward=rule
    )(xb)
    out.z.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()


def test_f_that_drops_samples_is_an_error_not_a_broadcast_success():
    x = torch.randn(3, 4)
    for z0 in (torch.zeros(3, 4), (torch.zeros(3, 4),)):
        f = (
            (lambda z, x: (0.5 * z + x)[:1])
            if isinstance(z0, Tensor)
            else (lambda z, x: ((0.5 * z[0] + x)[:1],))
        )
        with pytest.raises(ValueError, match="batch of 1 samples for a state of 3"):
            il.fixed_point(f, z0, x)
    with pytest.raises(ValueError, match="batch of 1 samples for a state of 3"):
        il.DEQ(lambda z, x: (0.5 * z + x)[:1])(x)


def test_f_returning_a_pair_without_has_aux_is_told_about_has_aux():
    with pytest.raises(ValueError, match="has_aux=True"):
        il.DEQ(lambda z, x: (0.5 * z + x, z.sum()))(torch.randn(2, 3))
