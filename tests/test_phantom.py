"""Phantom gradients against their defining formulas and the closed-form implicit gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from zoo import Affine, AffineModule, TanhCell

import implicitlayers as il
from implicitlayers.backward import NeumannPhantom, PhantomGradient

TIGHT = il.Anderson(max_iter=300, atol=1e-14, rtol=1e-13)
F64 = torch.float64


def spectral_affine(eigenvalues: list[float], d: int = 3, seed: int = 0) -> Affine:
    """An affine map whose symmetric ``W`` has the given eigenvalues (a known spectrum)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    W = Q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ Q.T
    U = torch.randn(n, d, generator=g, dtype=F64)
    b = torch.randn(n, generator=g, dtype=F64)
    return Affine(W, U, b)


SPECTRUM = [0.8, 0.4, 0.1, -0.2, -0.5, -0.7]


@pytest.fixture
def setup():
    problem = spectral_affine(SPECTRUM)
    x = torch.randn(4, 3, dtype=F64)
    c = torch.randn(4, 6, dtype=F64)
    return problem, x, c


def deq_grads(rule, module, x, c, create_graph=False):
    """Run a DEQ with ``rule``; backpropagate ``sum(c * z)``; return ``(z, result, x)``."""
    x = x.clone().requires_grad_(True)
    deq = il.DEQ(module, solver=TIGHT, backward=rule)
    z, result = deq(x, z0=torch.zeros(x.shape[0], c.shape[1], dtype=x.dtype))
    (c * z).sum().backward(create_graph=create_graph)
    return z, result, x


def damped_steps(cell, x, z_star, k, lam):
    """The k damped steps of the definition, written out."""
    z = z_star.detach()
    for _ in range(k):
        z = (1 - lam) * z + lam * cell(z, x)
    return z


def row_series(c, W, k, lam):
    r"""Rows of :math:`\lambda \sum_{i<k} B^i c` with :math:`B = (1-\lambda) I + \lambda W^\top`
    (for row vectors, ``v B^T = v M`` with :math:`M = (1-\lambda) I + \lambda W`)."""
    M = (1 - lam) * torch.eye(W.shape[0], dtype=W.dtype) + lam * W
    term, total = c, c
    for _ in range(k - 1):
        term = term @ M
        total = total + term
    return lam * total


def check_affine_grads(u, module, x, z, problem, atol):
    torch.testing.assert_close(module.b.grad, u.sum(0), atol=atol, rtol=0)
    torch.testing.assert_close(module.W.grad, u.T @ z, atol=atol, rtol=0)
    torch.testing.assert_close(module.U.grad, u.T @ x.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(x.grad, u @ problem.U, atol=atol, rtol=0)


# --- PhantomGradient: backpropagation through k damped steps ---------------------------------


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("lam", [0.3, 0.5, 1.0])
def test_phantom_is_autograd_through_the_damped_steps(k, lam):
    cell = TanhCell(n=5, d=3, scale=0.6)
    x = torch.randn(4, 3, dtype=F64)
    c = torch.randn(4, 5, dtype=F64)
    z, result, xg = deq_grads(PhantomGradient(steps=k, mixing=lam), cell, x, c)
    got = [p.grad.clone() for p in cell.parameters()] + [xg.grad]

    cell.zero_grad()
    xh = x.clone().requires_grad_(True)
    (c * damped_steps(cell, xh, result.z, k, lam)).sum().backward()
    want = [p.grad for p in cell.parameters()] + [xh.grad]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
    assert torch.equal(z.detach(), result.z)


def test_phantom_value_is_exactly_the_fixed_point():
    # A loose solve: z_k differs from z* in value, the output must not.
    cell = TanhCell().float()
    x = torch.randn(3, 3)
    deq = il.DEQ(cell, solver=il.Picard(max_iter=4), backward=PhantomGradient(steps=3))
    z, result = deq(x, z0=torch.zeros(3, 5))
    assert z.requires_grad and z.dtype == torch.float32
    assert torch.equal(z.detach(), result.z)
    assert not torch.equal(result.z, damped_steps(cell, x, result.z, 3, 0.5).detach())
    z.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in cell.parameters())


def test_phantom_one_undamped_step_is_jfb(setup):
    problem, x, c = setup
    grads = []
    for rule in (PhantomGradient(steps=1, mixing=1.0), il.JFB()):
        module = AffineModule(problem)
        _, _, xg = deq_grads(rule, module, x, c)
        grads.append([module.W.grad, module.U.grad, module.b.grad, xg.grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_phantom_calls_f_steps_times_with_grad_whatever_the_forward_budget():
    cell = TanhCell()
    x = torch.randn(2, 3, dtype=F64)

    def run(max_iter):
        calls = {"grad": 0, "total": 0}

        def f(z, x):
            calls["total"] += 1
            calls["grad"] += torch.is_grad_enabled()
            return cell(z, x)

        saved = 0

        def pack(t):
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        solver = il.Picard(max_iter=max_iter, atol=0.0, rtol=1e-300, on_unconverged="ignore")
        deq = il.DEQ(f, solver=solver, backward=PhantomGradient(steps=4))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z, result = deq(x, z0=torch.zeros(2, 5, dtype=F64))
        during_forward = dict(calls)
        z.sum().backward()
        assert calls == during_forward  # the backward pass never calls f
        assert calls["total"] - calls["grad"] == result.n_f_evals  # the solve, without grad
        return calls["grad"], result.n_f_evals, saved

    short, long = run(3), run(20)
    assert short[0] == long[0] == 4  # the k differentiable steps
    assert short[1] < long[1]
    assert short[2] == long[2] > 0  # the graph does not grow with the forward iterations


def test_phantom_graph_grows_with_steps():
    cell = TanhCell()
    x = torch.randn(2, 3, dtype=F64)

    def saved(k):
        total = 0

        def pack(t):
            nonlocal total
            if not isinstance(t, nn.Parameter):
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            il.DEQ(cell, backward=PhantomGradient(steps=k))(x, z0=torch.zeros(2, 5, dtype=F64))
        return total

    # Linear in k: each further step keeps one more application of f.
    assert saved(12) - saved(8) == saved(8) - saved(4) > 0


def test_phantom_matches_neumann_phantom_at_an_exact_fixed_point(setup):
    problem, x, c = setup
    grads = []
    for rule in (PhantomGradient(steps=6, mixing=0.7), NeumannPhantom(terms=5, mixing=0.7)):
        module = AffineModule(problem)
        _, _, xg = deq_grads(rule, module, x, c)
        grads.append([module.W.grad, module.U.grad, module.b.grad, xg.grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_phantom_adjoint_is_the_neumann_phantom_vector():
    W = torch.randn(5, 5, dtype=F64) / 5
    g = torch.randn(3, 5, dtype=F64)
    u, result = PhantomGradient(steps=4, mixing=0.6).adjoint(lambda v: v @ W, g)
    v, _ = NeumannPhantom(terms=3, mixing=0.6).adjoint(lambda v: v @ W, g)
    assert result is None and torch.equal(u, v)
    torch.testing.assert_close(u, row_series(g, W, 4, 0.6), atol=1e-14, rtol=0)


@pytest.mark.parametrize("lam", [0.5, 0.8])
@pytest.mark.parametrize("rule_type", [PhantomGradient, NeumannPhantom])
def test_phantom_converges_to_the_implicit_gradient_at_the_predicted_rate(setup, lam, rule_type):
    problem, x, c = setup
    exact = problem.adjoint(c)  # rows of (I - W^T)^{-1} c
    eye = torch.eye(6, dtype=F64)
    M = (1 - lam) * eye + lam * problem.W
    rho = float(torch.linalg.eigvalsh(M).abs().max())  # = 1 - lam + lam * 0.8
    errors = {}
    for k in (1, 2, 4, 8, 16, 30, 31):
        module = AffineModule(problem)
        # PhantomGradient(steps=k) and NeumannPhantom(terms=k - 1) keep powers B^0 .. B^{k-1}.
        count = {"steps": k} if rule_type is PhantomGradient else {"terms": k - 1}
        deq_grads(rule_type(**count, mixing=lam), module, x, c)
        err = module.b.grad - exact.sum(0)
        # The error is exactly B^k (I - J^T)^{-1} g, summed over the batch.
        predicted = -(exact @ torch.linalg.matrix_power(M, k)).sum(0)
        torch.testing.assert_close(err, predicted, atol=1e-10, rtol=0)
        errors[k] = float(err.norm())
    values = list(errors.values())
    assert values == sorted(values, reverse=True)
    # Successive errors shrink by rho(B); the second eigenvalue's share fades as its ratio^k.
    ratio = errors[31] / errors[30]
    assert abs(ratio - rho) < 1e-6, (ratio, rho)


# --- NeumannPhantom: the damped Neumann series -------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("lam", [0.3, 0.5, 1.0])
def test_neumann_phantom_is_its_dense_formula(setup, k, lam):
    problem, x, c = setup
    module = AffineModule(problem)
    z, _, xg = deq_grads(NeumannPhantom(terms=k - 1, mixing=lam), module, x, c)
    check_affine_grads(row_series(c, problem.W, k, lam), module, xg, z.detach(), problem, 1e-12)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_neumann_phantom_undamped_is_neumann_with_the_same_terms(setup, k):
    problem, x, c = setup
    grads = []
    for rule in (NeumannPhantom(terms=k, mixing=1.0), il.Neumann(terms=k)):
        module = AffineModule(problem)
        _, _, xg = deq_grads(rule, module, x, c)
        grads.append([module.W.grad, module.U.grad, module.b.grad, xg.grad])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_neumann_phantom_value_is_exactly_the_fixed_point(setup):
    problem, x, _ = setup
    deq = il.DEQ(AffineModule(problem), solver=il.Picard(max_iter=3), backward=NeumannPhantom())
    z, result = deq(x, z0=torch.zeros(4, 6, dtype=F64))
    assert z.requires_grad and torch.equal(z.detach(), result.z)


# --- Second order ------------------------------------------------------------------------------


def test_phantom_second_order_is_autograd_through_the_steps():
    cell = TanhCell(n=5, d=3, scale=0.6)
    x = torch.randn(3, 3, dtype=F64)
    c = torch.randn(3, 5, dtype=F64)
    params = list(cell.parameters())

    def penalty(z_of_x):
        xg = x.clone().requires_grad_(True)
        z = z_of_x(xg)
        (gx,) = torch.autograd.grad((c * z).sum(), xg, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), params)

    deq = il.DEQ(cell, solver=TIGHT, backward=PhantomGradient(steps=3, mixing=0.6))
    z_star = deq(x, z0=torch.zeros(3, 5, dtype=F64)).z.detach()
    got = penalty(lambda xg: deq(xg, z0=torch.zeros(3, 5, dtype=F64)).z)
    want = penalty(lambda xg: damped_steps(cell, xg, z_star, 3, 0.6))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_neumann_phantom_second_order_is_its_formula_differentiated(setup):
    problem, x, c = setup
    k, lam = 4, 0.6
    module = AffineModule(problem)
    deq = il.DEQ(module, solver=TIGHT, backward=NeumannPhantom(terms=k - 1, mixing=lam))
    xg = x.clone().requires_grad_(True)
    z, _ = deq(xg, z0=torch.zeros(4, 6, dtype=F64))
    (gx,) = torch.autograd.grad((c * z).sum(), xg, create_graph=True)
    got = torch.autograd.grad(gx.square().sum(), [module.W, module.U])

    W = problem.W.clone().requires_grad_(True)
    U = problem.U.clone().requires_grad_(True)
    gx_dense = row_series(c, W, k, lam) @ U  # u^T df/dx, with z* held fixed
    torch.testing.assert_close(gx, gx_dense, atol=1e-12, rtol=0)
    want = torch.autograd.grad(gx_dense.square().sum(), [W, U])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


# --- States, names, validation ---------------------------------------------------------------


@pytest.mark.parametrize("rule", [PhantomGradient(steps=3), NeumannPhantom(terms=3)])
def test_phantom_rules_handle_tuple_states(rule):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5, dtype=F64))

        def forward(self, z, x):
            a, b = z
            return (self.scale * torch.tanh(b) + x, self.scale * torch.tanh(a))

    pair = Pair()
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    z0 = (torch.zeros(3, 4, dtype=F64), torch.zeros(3, 4, dtype=F64))
    z, result = il.DEQ(pair, solver=TIGHT, backward=rule)(x, z0=z0)
    assert isinstance(z, tuple) and torch.equal(z[0].detach(), result.z[0])
    (z[0].sum() + 2 * z[1].sum()).backward()
    if isinstance(rule, PhantomGradient):
        got = (x.grad.clone(), pair.scale.grad.clone())
        x.grad, pair.scale.grad = None, None
        a, b = (t.detach() for t in result.z)
        for _ in range(3):
            fa, fb = pair((a, b), x)
            a, b = 0.5 * a + 0.5 * fa, 0.5 * b + 0.5 * fb
        (a.sum() + 2 * b.sum()).backward()
        torch.testing.assert_close(got[0], x.grad, atol=1e-12, rtol=0)
        torch.testing.assert_close(got[1], pair.scale.grad, atol=1e-12, rtol=0)
    assert torch.isfinite(x.grad).all() and pair.scale.grad is not None


def test_phantom_by_name():
    deq = il.DEQ(TanhCell(), backward="phantom")
    assert deq.backward == PhantomGradient()
    with pytest.raises(ValueError, match="'phantom'"):
        il.DEQ(TanhCell(), backward="phantm")


def test_phantom_rules_are_frozen_keyword_only_and_print_compactly():
    assert repr(PhantomGradient()) == "PhantomGradient()"
    assert repr(PhantomGradient(steps=3, mixing=0.7)) == "PhantomGradient(steps=3, mixing=0.7)"
    assert repr(NeumannPhantom(terms=2)) == "NeumannPhantom(terms=2)"
    assert NeumannPhantom(terms=2) == NeumannPhantom(terms=2) != NeumannPhantom(terms=3)
    with pytest.raises(TypeError):
        PhantomGradient(3)  # type: ignore[misc]
    with pytest.raises(TypeError):
        NeumannPhantom(steps=3)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PhantomGradient().steps = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("rule", "kwargs", "error", "match"),
    [
        (PhantomGradient, {"steps": 0}, ValueError, r"steps must be >= 1, got 0"),
        (PhantomGradient, {"steps": 2.0}, TypeError, r"steps must be an int, got 2.0"),
        (PhantomGradient, {"steps": True}, TypeError, r"steps must be an int"),
        (PhantomGradient, {"mixing": 0.0}, ValueError, r"mixing must lie in \(0.0, 1.0\], got 0"),
        (PhantomGradient, {"mixing": 1.5}, ValueError, r"mixing must lie in \(0.0, 1.0\]"),
        (PhantomGradient, {"mixing": float("nan")}, ValueError, r"mixing must be finite"),
        (PhantomGradient, {"mixing": "0.5"}, TypeError, r"mixing must be a float"),
        (NeumannPhantom, {"terms": -1}, ValueError, r"terms must be >= 0, got -1"),
        (NeumannPhantom, {"mixing": -0.5}, ValueError, r"mixing must lie in \(0.0, 1.0\]"),
    ],
)
def test_phantom_rules_validate_their_arguments(rule, kwargs, error, match):
    with pytest.raises(error, match=match):
        rule(**kwargs)
