"""Backward rules against closed forms, gradcheck and their defining formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import Affine, AffineModule, TanhCell

import implicitlayers as il

TIGHT = il.Anderson(max_iter=200, atol=1e-14, rtol=1e-13)


def affine_grads(rule, problem, x, c):
    module = AffineModule(problem)
    x = x.clone().requires_grad_(True)
    deq = il.DEQ(module, solver=TIGHT, backward=rule)
    z, _ = deq(x, z0=torch.zeros(x.shape[0], 6, dtype=torch.float64))
    (z * c).sum().backward()
    return module, x, z.detach(), deq


@pytest.fixture
def setup():
    problem = Affine.make(n=6, d=3, contraction=0.8)
    x = torch.randn(4, 3, dtype=torch.float64)
    c = torch.randn(4, 6, dtype=torch.float64)
    return problem, x, c


def check_against(u, module, x, z, problem, atol):
    torch.testing.assert_close(module.b.grad, u.sum(0), atol=atol, rtol=0)
    torch.testing.assert_close(module.W.grad, u.T @ z, atol=atol, rtol=0)
    torch.testing.assert_close(module.U.grad, u.T @ x.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(x.grad, u @ problem.U, atol=atol, rtol=0)


@pytest.mark.parametrize("adjoint", [il.Picard, il.Anderson, il.Broyden])
def test_implicit_matches_closed_form_gradient(setup, adjoint):
    problem, x, c = setup
    rule = il.ImplicitDifferentiation(solver=adjoint(max_iter=500, atol=1e-14, rtol=1e-13))
    module, xg, z, deq = affine_grads(rule, problem, x, c)
    torch.testing.assert_close(z, problem.solution(x), atol=1e-10, rtol=0)
    check_against(problem.adjoint(c), module, xg, z, problem, atol=1e-6)
    # The adjoint solve is reported.
    assert deq.last_backward_result is not None and deq.last_backward_result.converged.all()
    assert deq.last_backward_result.n_f_evals > 1


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_neumann_is_the_truncated_series(setup, k):
    problem, x, c = setup
    module, xg, z, _ = affine_grads(il.Neumann(terms=k), problem, x, c)
    u, term = c.clone(), c.clone()
    for _ in range(k):
        term = term @ problem.W  # (W^T)^i c for row vectors
        u = u + term
    check_against(u, module, xg, z, problem, atol=1e-10)


def test_jfb_is_its_defining_formula(setup):
    problem, x, c = setup
    module, xg, z, deq = affine_grads(il.JFB(), problem, x, c)
    check_against(c, module, xg, z, problem, atol=1e-10)
    assert deq.last_backward_result is None


def test_neumann_approaches_implicit_as_terms_grow(setup):
    problem, x, c = setup
    exact = problem.adjoint(c).sum(0)
    errors = []
    for k in (0, 2, 8, 32):
        module, *_ = affine_grads(il.Neumann(terms=k), problem, x, c)
        errors.append(float((module.b.grad - exact).norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-2 * errors[0]


def test_gradcheck_implicit_on_tanh_layer():
    cell = TanhCell(n=4, d=3, scale=0.6)
    rule = il.ImplicitDifferentiation(solver=il.Anderson(max_iter=200, atol=1e-14, rtol=1e-14))
    solver = il.Anderson(max_iter=200, atol=1e-14, rtol=1e-14)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    W = cell.W.detach().clone().requires_grad_(True)

    def fn(x, W):
        f = lambda z, x: torch.tanh(z @ W.T + x @ cell.U.T + cell.b)  # noqa: E731
        z, _result = il.DEQ(f, solver=solver, backward=rule)(x, z0=torch.zeros(2, 4).double())
        return z

    assert torch.autograd.gradcheck(fn, (x, W), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_backward_rule_applies_in_eval_mode():
    cell = TanhCell()
    deq = il.DEQ(cell, backward="implicit").eval()
    z, _ = deq(torch.randn(3, 3, dtype=torch.float64), z0=torch.zeros(3, 5, dtype=torch.float64))
    z.sum().backward()
    assert cell.W.grad is not None and cell.W.grad.abs().sum() > 0
    assert deq.last_backward_result is not None


def test_no_graph_without_grad():
    cell = TanhCell()
    with torch.no_grad():
        z, _ = il.DEQ(cell)(torch.randn(3, 3).double(), z0=torch.zeros(3, 5).double())
    assert not z.requires_grad


def test_parameters_get_gradients_under_autocast():
    # The solve calls f under no_grad; autocast must not reuse its weight casts, made without
    # history, in the application of f that attaches z* (pytorch/pytorch#112583, older torch).
    cell, inject = nn.Linear(16, 16), nn.Linear(16, 16)
    with torch.no_grad():
        cell.weight.mul_(0.5 / torch.linalg.matrix_norm(cell.weight, 2))

    def f(z, x):
        return torch.tanh(cell(z) + inject(x))

    deq = il.DEQ(f, solver=il.Anderson(max_iter=50, rtol=1e-2), backward="jfb")
    x = torch.randn(4, 16)
    params = [*cell.parameters(), *inject.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, result = deq(x)
        z.float().square().sum().backward()
        grads = [p.grad for p in params]
        assert all(g is not None for g in grads)
        # JFB's gradient: one application of f at the detached fixed point, fed dL/dz = 2 z.
        for p in params:
            p.grad = None
        f(result.z, x).backward(2 * z.detach())
    for g, p in zip(grads, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-2, atol=1e-4)


def test_output_value_is_the_solution_for_every_rule(setup):
    problem, x, _ = setup
    values = []
    for rule in (il.JFB(), il.Neumann(terms=2), il.ImplicitDifferentiation()):
        deq = il.DEQ(AffineModule(problem), solver=TIGHT, backward=rule)
        z, result = deq(x, z0=torch.zeros(4, 6, dtype=torch.float64))
        assert z.requires_grad
        assert torch.equal(z.detach(), result.z)
        values.append(z.detach())
    assert torch.equal(values[0], values[1]) and torch.equal(values[0], values[2])


def test_adjoint_failure_falls_back_to_jfb(setup):
    _problem, x, c = setup
    # An expanding adjoint iteration: Picard on u = J^T u + g with J^T of norm > 1 diverges.
    bad = Affine.make(n=6, d=3, contraction=1.5, symmetric=True)
    module = AffineModule(bad)
    rule = il.ImplicitDifferentiation(solver=il.Picard(max_iter=200, divergence_ratio=10.0))
    # The forward still converges: Broyden finds the fixed point of a non-contractive linear map.
    deq = il.DEQ(module, solver=il.Broyden(max_iter=100, atol=1e-12, rtol=1e-12), backward=rule)
    z0 = torch.zeros(4, 6, dtype=torch.float64)
    z, result = deq(x, z0=z0)
    assert result.converged.all()
    with pytest.warns(il.ConvergenceWarning, match="adjoint solve did not converge"):
        (z * c).sum().backward()
    assert (deq.last_backward_result.status == il.Status.DIVERGED).all()
    torch.testing.assert_close(module.b.grad, c.sum(0))  # the JFB gradient
    strict = il.ImplicitDifferentiation(
        solver=il.Picard(max_iter=200, divergence_ratio=10.0),
        fallback_to_jfb=False,
        on_unconverged="raise",
    )
    z, _ = il.DEQ(AffineModule(bad), solver=deq.solver, backward=strict)(x, z0=z0)
    with pytest.raises(il.ConvergenceError):
        (z * c).sum().backward()


def test_custom_backward_rule_plugs_in(setup):
    problem, x, c = setup

    class Scaled(il.AbstractBackward):
        """u = 2 g: a toy rule to show the extension point."""

        def adjoint(self, vjp, grad):
            return 2 * grad, None

    module, xg, z, _ = affine_grads(Scaled(), problem, x, c)
    check_against(2 * c, module, xg, z, problem, atol=1e-10)


def test_memory_does_not_grow_with_iterations():
    cell = AffineModule(Affine.make(n=16, d=3, contraction=0.99, symmetric=True))
    x = torch.randn(4, 3, dtype=torch.float64)

    def saved_bytes(max_iter):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        solver = il.Picard(max_iter=max_iter, atol=0.0, rtol=1e-12)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _z, result = il.DEQ(cell, solver=solver)(x, z0=torch.zeros(4, 16).double())
        assert result.n_f_evals == max_iter
        return total

    assert saved_bytes(5) == saved_bytes(100) > 0


def test_parameters_registered_and_state_dict_round_trips():
    cell = TanhCell()
    deq = il.DEQ(cell, solver=il.Anderson(max_iter=7), backward=il.Neumann(terms=2))
    assert {n for n, _ in deq.named_parameters()} == {"f.W", "f.U", "f.b"}
    other = il.DEQ(TanhCell(seed=3))
    other.load_state_dict(deq.state_dict())
    assert torch.equal(other.f.W, cell.W)
    assert "Anderson(max_iter=7)" in repr(deq) and "Neumann(terms=2)" in repr(deq)


def test_per_call_solver_override():
    cell = TanhCell()
    deq = il.DEQ(cell, solver=il.Picard(max_iter=2))
    x = torch.randn(2, 3, dtype=torch.float64)
    z0 = torch.zeros(2, 5, dtype=torch.float64)
    _, short = deq(x, z0=z0)
    _, long = deq(x, z0=z0, solver=il.Picard(max_iter=100, rtol=1e-10))
    assert short.n_f_evals == 2 and not short.converged.any()
    assert long.converged.all()


def test_deq_wraps_modules_with_tuple_state():
    class Pair(nn.Module):
        def forward(self, z, x):
            a, b = z
            return (0.5 * torch.tanh(b) + x, 0.5 * torch.tanh(a))

    x = torch.randn(3, 4, requires_grad=True)
    z, result = il.DEQ(Pair(), backward="implicit")(x, z0=(torch.zeros(3, 4), torch.zeros(3, 4)))
    assert isinstance(z, tuple) and result.converged.all()
    (z[0].sum() + z[1].sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("rule", [il.JFB(), il.Neumann(terms=2), il.ImplicitDifferentiation()])
def test_backward_leaks_nothing_across_steps(rule):
    import gc
    import warnings

    cell = TanhCell()
    deq = il.DEQ(cell, solver=il.Picard(max_iter=10), backward=rule)
    x = torch.randn(8, 3, dtype=torch.float64)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # gc.get_objects touches deprecated torch attributes
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    def step():
        z, _ = deq(x, z0=torch.zeros(8, 5, dtype=torch.float64))
        z.sum().backward()

    step()
    before = live_tensors()
    for _ in range(10):
        step()
    assert live_tensors() - before <= 1  # e.g. a grad buffer; no graph per step
