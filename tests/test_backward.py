"""Backward rules: the contract every registered rule meets, then each rule's own options.

Every row of ``registry.RULE_ROWS`` (each library rule, and exact differentiation with GMRES
and with every registered solver as its adjoint solver) is checked against its own formula
for :math:`u` on the zoo's affine map, whose Jacobian is known: the gradients to ``b``, ``W``,
``U`` and ``x`` are :math:`\\sum u`, :math:`u^\\top z^\\star`, :math:`u^\\top x` and
:math:`u U`. Second order differentiates the rule's formula (exactly, for an exact rule).
"""

from __future__ import annotations

import functools
import gc
import warnings

import pytest
import torch
from registry import EXACT_RULE_PARAMS, FORMULAS, RULE_PARAMS, RULE_TAGS
from torch import nn
from zoo import Affine, AffineModule, TanhCell

import implicitlayers as il
from implicitlayers import Status

F64 = torch.float64
TIGHT = il.Anderson(max_iter=300, rtol=1e-13, atol=1e-14)


def affine_grads(rule, problem, x, c, solver=TIGHT):
    """A DEQ of the affine ``problem`` with ``rule``; backpropagates ``sum(c * z)``."""
    module = AffineModule(problem)
    x = x.clone().requires_grad_(True)
    deq = il.DEQ(module, solver=solver, backward=rule)
    z, _ = deq(x, z0=torch.zeros(x.shape[0], problem.W.shape[0], dtype=F64))
    (z * c).sum().backward()
    return module, x, z.detach(), deq


def check_against(u, module, x, z, problem, atol):
    """The affine map's gradients for the rule's vector ``u`` (rows)."""
    torch.testing.assert_close(module.b.grad, u.sum(0), atol=atol, rtol=0)
    torch.testing.assert_close(module.W.grad, u.T @ z, atol=atol, rtol=0)
    torch.testing.assert_close(module.U.grad, u.T @ x.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(x.grad, u @ problem.U, atol=atol, rtol=0)


@pytest.fixture
def setup():
    problem = Affine.make(n=6, d=3, contraction=0.8)
    x = torch.randn(4, 3, dtype=F64)
    c = torch.randn(4, 6, dtype=F64)
    return problem, x, c


def cubic_grads(rule):
    """z* = 2x for f = z / 2 + x; L = sum z^3: (dL/dx, d(sum dL/dx)/dx) at x = 1."""
    x = torch.ones(1, 1, dtype=F64, requires_grad=True)
    deq = il.DEQ(lambda z, x: 0.5 * z + x, solver=TIGHT, backward=rule)
    z, _ = deq(x)
    (grad,) = torch.autograd.grad((z**3).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    return grad.item(), second.item()


# --- The contract of every rule -----------------------------------------------------------------


def test_every_library_rule_has_its_formula_in_the_registry():
    missing = [name for name, cls in il.backward.BACKWARDS.items() if cls not in FORMULAS]
    assert not missing, f"add the formula of {missing} to tests/registry.py's FORMULAS"
    assert set(RULE_TAGS) <= set(FORMULAS)


@pytest.mark.parametrize("rule", RULE_PARAMS)
def test_every_rule_gives_the_gradients_of_its_own_formula(setup, rule):
    problem, x, c = setup
    module, xg, z, deq = affine_grads(rule.rule, problem, x, c)
    torch.testing.assert_close(z, problem.solution(x), atol=1e-10, rtol=0)
    check_against(rule.u(problem.W, c), module, xg, z, problem, atol=rule.tolerance)
    # An adjoint solve is reported; a rule without one reports none.
    if rule.reports_adjoint:
        assert deq.last_backward_result.converged.all()
        assert deq.last_backward_result.n_f_evals > 1
    else:
        assert deq.last_backward_result is None


@pytest.mark.parametrize("rule", RULE_PARAMS)
def test_every_rule_returns_the_solution_itself(setup, rule):
    # A loose solve, so that no step of f from z* lands on it: the value is z*, exactly.
    problem, x, _ = setup
    deq = il.DEQ(AffineModule(problem), solver=il.Picard(max_iter=3), backward=rule.rule)
    z, result = deq(x, z0=torch.zeros(4, 6, dtype=F64))
    assert z.requires_grad and torch.equal(z.detach(), result.z)


@pytest.mark.parametrize("rule", RULE_PARAMS)
def test_every_rule_second_order_differentiates_its_own_formula(rule):
    # The rule's derivative of z* for f = z / 2 + x is c = u(J = 1/2, g = 1); dL/dx = 3 z^2 c
    # and its derivative is 6 z c^2 (z* held fixed in J; an exact rule's c = 2 is the exact
    # dz*/dx, so 12 c^2 = 48 is the exact second derivative): 12 c and 12 c^2 at x = 1.
    c = rule.u(torch.tensor([[0.5]], dtype=F64), torch.ones(1, 1, dtype=F64)).item()
    grad, second = cubic_grads(rule.rule)
    assert grad == pytest.approx(12.0 * c, rel=1e-10)
    assert second == pytest.approx(12.0 * c**2, rel=1e-10)


@pytest.mark.parametrize("rule", EXACT_RULE_PARAMS)
def test_every_exact_rule_passes_gradcheck_on_a_tanh_layer(rule):
    cell = TanhCell(n=4, d=3, scale=0.6)
    solver = il.Anderson(max_iter=200, atol=1e-14, rtol=1e-14)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    W = cell.W.detach().clone().requires_grad_(True)

    def fn(x, W):
        f = lambda z, x: torch.tanh(z @ W.T + x @ cell.U.T + cell.b)  # noqa: E731
        z, _ = il.DEQ(f, solver=solver, backward=rule.rule)(x, z0=torch.zeros(2, 4).double())
        return z

    # (Within the rule's own accuracy: the default GMRES adjoint stops at rtol 1e-6.)
    atol = max(1e-7, rule.tolerance)
    assert torch.autograd.gradcheck(fn, (x, W), eps=1e-6, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("rule", RULE_PARAMS)
def test_every_rule_leaks_nothing_across_steps(rule):
    cell = TanhCell()
    deq = il.DEQ(cell, solver=il.Picard(max_iter=10), backward=rule.rule)
    x = torch.randn(8, 3, dtype=F64)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # gc.get_objects touches deprecated torch attributes
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    def step():
        z, _ = deq(x, z0=torch.zeros(8, 5, dtype=F64))
        z.sum().backward()

    step()
    before = live_tensors()
    for _ in range(10):
        step()
    assert live_tensors() - before <= 1  # e.g. a grad buffer; no graph per step


def test_a_plug_in_rule_gives_the_gradients_of_its_formula(setup):
    problem, x, c = setup

    class Scaled(il.AbstractBackward):
        """u = 2 g: a toy rule to show the extension point."""

        def adjoint(self, vjp, grad):
            return 2 * grad, None

    module, xg, z, _ = affine_grads(Scaled(), problem, x, c)
    check_against(2 * c, module, xg, z, problem, atol=1e-10)


# --- JFB and Neumann ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_neumann_is_the_truncated_series_to_second_order(setup, k):
    problem, x, c = setup
    module, xg, z, _ = affine_grads(il.Neumann(terms=k), problem, x, c)
    u, term = c.clone(), c.clone()
    for _ in range(k):
        term = term @ problem.W  # (W^T)^i c for row vectors
        u = u + term
    check_against(u, module, xg, z, problem, atol=1e-10)
    # Second order: c = sum_{i <= k} 0.5^i for f = z / 2 + x (see the contract above).
    c = sum(0.5**i for i in range(k + 1))
    grad, second = cubic_grads(il.Neumann(terms=k))
    assert grad == pytest.approx(12.0 * c, rel=1e-10)
    assert second == pytest.approx(12.0 * c**2, rel=1e-10)


def test_neumann_approaches_implicit_as_terms_grow(setup):
    problem, x, c = setup
    exact = problem.adjoint(c).sum(0)
    errors = []
    for k in (0, 2, 8, 32):
        module, *_ = affine_grads(il.Neumann(terms=k), problem, x, c)
        errors.append(float((module.b.grad - exact).norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-2 * errors[0]


# --- Implicit differentiation: the adjoint solve ------------------------------------------------


def test_the_default_adjoint_solver_is_the_documented_gmres():
    rule = il.ImplicitDifferentiation()
    assert rule.solver == il.GMRES(max_iter=200, rtol=1e-6, atol=1e-10, restart=20)
    assert rule.fallback_to_jfb is True and rule.on_unconverged == "warn"
    assert il.ImplicitDifferentiation(solver="gmres") == rule


def test_the_default_gmres_adjoint_gives_the_closed_form_gradient():
    problem = Affine.make(n=5, d=3, contraction=0.8, seed=2)
    module = AffineModule(problem)
    deq = il.DEQ(module, solver=TIGHT, backward=il.ImplicitDifferentiation())
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    c = torch.randn(2, 5, dtype=F64)
    z, _ = deq(x, z0=torch.zeros(2, 5, dtype=F64))
    (z * c).sum().backward()
    u = problem.adjoint(c)  # (I - W^T)^-1 c per sample
    torch.testing.assert_close(x.grad, u @ problem.U, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(module.b.grad, u.sum(0), rtol=1e-7, atol=1e-9)
    assert deq.last_backward_result.converged.all()


def _poisson(N: int = 16):
    """Jacobi for the 2-D Poisson equation on an N x N grid: f(u) = (S u + h^2 (b + x)) / 4."""
    T = torch.diag(torch.ones(N - 1, dtype=F64), 1)
    T = T + T.T
    eye = torch.eye(N, dtype=F64)
    J = (torch.kron(T, eye) + torch.kron(eye, T)) / 4  # rho(J) = cos(pi / (N + 1)) ~ 0.983
    h2 = 1.0 / (N + 1) ** 2

    class Jacobi(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.randn(N * N, dtype=F64))

        def forward(self, u, x):
            return u @ J.T + h2 * (self.b + x) / 4

    return Jacobi(), J, h2


def test_the_default_implicit_gradient_is_exact_on_a_slowly_contracting_poisson_solve():
    torch.manual_seed(0)
    cell, J, h2 = _poisson()
    n = J.shape[0]
    x = torch.randn(2, n, dtype=F64)
    c = torch.randn(2, n, dtype=F64)
    forward = il.Anderson(max_iter=500, rtol=1e-11, atol=0.0, history_size=10)
    deq = il.DEQ(cell, solver=forward, backward=il.ImplicitDifferentiation())
    z, result = deq(x)
    assert result.converged.all()
    (z * c).sum().backward()
    u = torch.linalg.solve(torch.eye(n, dtype=F64) - J.T, c.T).T
    exact = h2 * u.sum(0) / 4
    error = ((cell.b.grad - exact).norm() / exact.norm()).item()
    assert error < 1e-5, error
    assert deq.last_backward_result.converged.all()


def test_a_failed_adjoint_falls_back_to_jfb_or_raises(setup):
    _problem, x, c = setup
    # An expanding adjoint iteration: Picard on u = J^T u + g with J^T of norm > 1 diverges.
    bad = Affine.make(n=6, d=3, contraction=1.5, symmetric=True)
    module = AffineModule(bad)
    rule = il.ImplicitDifferentiation(solver=il.Picard(max_iter=200, divergence_ratio=10.0))
    # The forward still converges: Broyden finds the fixed point of a non-contractive linear map.
    deq = il.DEQ(module, solver=il.Broyden(max_iter=100, atol=1e-12, rtol=1e-12), backward=rule)
    z0 = torch.zeros(4, 6, dtype=F64)
    z, result = deq(x, z0=z0)
    assert result.converged.all()
    with pytest.warns(il.ConvergenceWarning, match="adjoint solve did not converge"):
        (z * c).sum().backward()
    assert (deq.last_backward_result.status == Status.DIVERGED).all()
    torch.testing.assert_close(module.b.grad, c.sum(0))  # the JFB gradient
    strict = il.ImplicitDifferentiation(
        solver=il.Picard(max_iter=200, divergence_ratio=10.0),
        fallback_to_jfb=False,
        on_unconverged="raise",
    )
    z, _ = il.DEQ(AffineModule(bad), solver=deq.solver, backward=strict)(x, z0=z0)
    with pytest.raises(il.ConvergenceError):
        (z * c).sum().backward()


def test_fallback_to_jfb_keeps_the_best_iterate_of_an_adjoint_that_ran_out_of_steps():
    # The adjoint u = W^T u + c by Picard from u0 = c, three evaluations: its best iterate is
    # the Neumann partial sum u2 = c + W^T c + (W^T)^2 c (residuals shrink by ||W|| = 0.7),
    # status MAX_ITER, which the fallback must keep (only failed solves fall back to u = c).
    problem = Affine.make(n=4, d=3, contraction=0.7)
    module = AffineModule(problem)
    rule = il.ImplicitDifferentiation(
        solver=il.Picard(max_iter=3), fallback_to_jfb=True, on_unconverged="ignore"
    )
    deq = il.DEQ(module, solver=il.Anderson(max_iter=100, atol=0, rtol=1e-12), backward=rule)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    c = torch.randn(2, 4, dtype=F64)
    z, _ = deq(x, z0=torch.zeros(2, 4, dtype=F64))
    (z * c).sum().backward()
    W, U = problem.W, problem.U
    u = c + c @ W + c @ W @ W  # rows: (W^T)^i c
    torch.testing.assert_close(x.grad, u @ U, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.b.grad, u.sum(0), rtol=1e-12, atol=1e-12)
    adjoint = deq.last_backward_result
    assert adjoint.status.tolist() == [Status.MAX_ITER] * 2
    assert adjoint.n_steps.tolist() == [3, 3] and adjoint.n_f_evals == 3


def test_the_adjoint_solver_own_policies_are_replaced_by_on_unconverged():
    problem = Affine.make(n=4, d=3, contraction=0.7)
    x = torch.randn(2, 3, dtype=F64)
    z0 = torch.zeros(2, 4, dtype=F64)
    # max_iter: a Picard adjoint that would raise on its own runs out quietly.
    picky = il.Picard(max_iter=2, on_unconverged="raise")
    rule = il.ImplicitDifferentiation(solver=picky, on_unconverged="ignore")
    z, _ = il.DEQ(AffineModule(problem), solver=TIGHT, backward=rule)(x, z0=z0)
    z.sum().backward()

    # Non-finite products: f's Jacobian products are NaN (0 * the infinite slope of sqrt at 0),
    # the adjoint (default on_nonfinite="raise") is NONFINITE and falls back to u = g quietly.
    def f(z, x):
        return 0.5 * z + x + 0.0 * torch.sqrt((z - z.detach()).abs())

    xg = torch.ones(2, 4, dtype=F64, requires_grad=True)
    rule = il.ImplicitDifferentiation(solver=il.Picard(), on_unconverged="ignore")
    deq = il.DEQ(f, solver=TIGHT, backward=rule)
    z, _ = deq(xg)
    z.sum().backward()
    assert deq.last_backward_result.status.tolist() == [Status.NONFINITE] * 2
    torch.testing.assert_close(xg.grad, torch.ones(2, 4, dtype=F64), rtol=0, atol=0)


def _warning_of(rule):
    problem = Affine.make(n=4, d=3, contraction=0.7)
    z, _ = il.DEQ(AffineModule(problem), solver=TIGHT, backward=rule)(
        torch.randn(2, 3, dtype=F64), z0=torch.zeros(2, 4, dtype=F64)
    )
    with pytest.warns(il.ConvergenceWarning) as caught:
        z.sum().backward()
    return str(caught[0].message)


def test_an_unconverged_adjoint_warns_with_advice_for_its_solver():
    rule = il.ImplicitDifferentiation(solver=il.Picard(max_iter=2))
    assert _warning_of(rule) == (
        f"{rule!r}: the adjoint solve did not converge for some samples, so their gradients "
        f"are inexact (DEQ.last_backward_result holds the statuses). MAX_ITER: "
        f"{Status.MAX_ITER.message} On the adjoint equation u = J^T u + g a fixed-point solver "
        "needs rho(J) < 1 (implicitlayers.diagnostics.spectral_radius estimates it); GMRES "
        "(solver='gmres') needs only I - J^T invertible."
    )
    rule = il.ImplicitDifferentiation(solver=il.GMRES(max_iter=3, restart=2))
    message = _warning_of(rule)
    assert message == (
        f"{rule!r}: the adjoint solve did not converge for some samples, so their gradients "
        f"are inexact (DEQ.last_backward_result holds the statuses). MAX_ITER: "
        f"{Status.MAX_ITER.linear_message}"
    )
    assert "use GMRES" not in message


def test_an_unconverged_adjoint_warns_once_and_can_raise_with_its_summary_and_result():
    cell, _, _ = _poisson()
    x = torch.randn(2, 256, dtype=F64)
    short = il.ImplicitDifferentiation(solver=il.Anderson(max_iter=10))
    deq = il.DEQ(cell, solver=il.Anderson(max_iter=500, rtol=1e-10), backward=short)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            deq(x)[0].sum().backward()
    relevant = [w for w in caught if issubclass(w.category, il.ConvergenceWarning)]
    assert len(relevant) == 1 and "adjoint solve did not converge" in str(relevant[0].message)
    assert not deq.last_backward_result.converged.any()
    rule = il.ImplicitDifferentiation(solver=il.Picard(max_iter=2), on_unconverged="raise")
    x = torch.ones(1, 2, dtype=F64, requires_grad=True)
    z, _ = il.DEQ(lambda z, x: 0.5 * z + x, solver=TIGHT, backward=rule)(x)
    with pytest.raises(il.ConvergenceError) as caught:
        z.sum().backward()
    result = caught.value.result
    assert isinstance(result, il.SolverResult) and result.status.tolist() == [Status.MAX_ITER]
    assert str(caught.value).endswith(
        "needs only I - J^T invertible.\n" + f"1/1 MAX_ITER: {Status.MAX_ITER.message}"
    )


@pytest.mark.parametrize("order", [1, 2])
def test_attach_reports_the_rule_and_its_adjoint_result_to_its_callback(order):
    rule = il.ImplicitDifferentiation(solver=TIGHT)
    x = torch.ones(1, 2, dtype=F64, requires_grad=True)
    seen = []
    z = rule.attach(
        lambda z: 0.5 * z + x,
        torch.full((1, 2), 2.0, dtype=F64),
        lambda r, res: seen.append((r, res)),
        leaves=[x],
    )
    (g,) = torch.autograd.grad(z.sum(), x, create_graph=order == 2)
    assert len(seen) == 1 and seen[0][0] is rule and seen[0][1].converged.all()
    torch.testing.assert_close(g, torch.full((1, 2), 2.0, dtype=F64), rtol=1e-10, atol=0)


def test_half_precision_gradients_through_the_default_adjoint_keep_the_state_dtype():
    # bfloat16 state, GMRES adjoint (solved in float32): the adjoint result and the gradient
    # come back in bfloat16, at the closed form (I - W^T)^-1 1 = 2 for W = I / 2. (The default
    # rtol 1e-6 is below what bfloat16 products resolve, so the solve reports MAX_ITER.)
    x = torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=True)
    deq = il.DEQ(
        lambda z, x: 0.5 * z + x,
        solver=il.Picard(rtol=1e-2, max_iter=100),
        backward=il.ImplicitDifferentiation(on_unconverged="ignore"),
    )
    z, _ = deq(x)
    z.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert deq.last_backward_result.z.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), torch.full((2, 3), 2.0), rtol=1e-2, atol=0)


def test_the_implicit_gradient_under_bfloat16_autocast_and_on_bfloat16_states():
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


# --- Implicit differentiation: exact second order -----------------------------------------------


def unrolled(f, z0, *inputs, steps=200):
    """``f`` iterated ``steps`` times under autograd: a reference for the fixed point's
    derivatives when ``f`` contracts fast."""
    z = z0
    for _ in range(steps):
        z = f(z, *inputs)
    return z


class SplitCell(torch.nn.Module):
    """``tanh(z W^T) + x U^T``: ``U``'s gradient does not depend on ``z``, ``c`` is unused."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.W = torch.nn.Parameter(0.4 * torch.randn(4, 4, generator=g, dtype=F64) / 2)
        self.U = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=F64))
        self.c = torch.nn.Parameter(torch.zeros(1, dtype=F64))  # never used

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T) + x @ self.U.T


def second_order(z_of, wrt, of):
    """Gradients of ``sum(z^2)`` w.r.t. ``of`` (with a graph), then of their sum w.r.t. ``wrt``."""
    z = z_of()
    grads = torch.autograd.grad((z**2).sum(), of, create_graph=True)
    return torch.autograd.grad(sum(g.sum() for g in grads), wrt)


EXACT = il.ImplicitDifferentiation(solver=TIGHT)


def test_exact_second_order_with_parameters_independent_of_z_and_unused_ones():
    cell = SplitCell()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(2, 4, dtype=F64)
    deq = il.DEQ(cell, solver=TIGHT, backward=EXACT)
    params = [cell.W, cell.U]
    got = second_order(lambda: deq(x, z0=z0).z, [x, *params], params)
    ref = second_order(lambda: unrolled(cell, z0, x), [x, *params], params)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # The adjoint solve of the double backward is recorded like the first-order one.
    deq.last_backward_result = None
    second_order(lambda: deq(x, z0=z0).z, [x], [x])
    assert deq.last_backward_result is not None and deq.last_backward_result.converged.all()


def test_exact_second_order_when_no_gradient_depends_on_z():
    # f = z / 2 + x U^T: the parameter's gradient u^T x does not involve z at all.
    U = (0.5 * torch.ones(4, 3, dtype=F64)).requires_grad_()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)

    def f(z, x, U):
        return 0.5 * z + x @ U.T

    z0 = torch.zeros(2, 4, dtype=F64)
    deq = il.DEQ(f, solver=TIGHT, backward=EXACT)
    got = second_order(lambda: deq(x, U, z0=z0).z, [x, U], [U])
    ref = second_order(lambda: unrolled(f, z0, x, U), [x, U], [U])
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_exact_second_order_through_an_input_computed_by_another_module():
    # x = encoder(x0): the leaf check stops at x (an input of the DEQ), so the encoder's
    # weight, which f never touches directly, is not reported as a hidden closure.
    encoder = torch.nn.Linear(3, 3, dtype=F64)
    cell = SplitCell()
    x0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(2, 4, dtype=F64)
    deq = il.DEQ(cell, solver=TIGHT, backward=EXACT)
    got = second_order(lambda: deq(encoder(x0), z0=z0).z, [x0], [encoder.weight])
    ref = second_order(lambda: unrolled(cell, z0, encoder(x0)), [x0], [encoder.weight])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-8, atol=1e-10)


def test_exact_second_order_through_a_closure_matches_central_differences():
    # A tensor a plain f closes over is one the library sees: exact second order.
    gen = torch.Generator().manual_seed(3)
    W = (0.3 * torch.randn(4, 4, generator=gen, dtype=F64)).requires_grad_()
    deq = il.DEQ(lambda z, x: torch.tanh(z @ W.T + x), solver=TIGHT, backward="implicit")
    x = torch.randn(2, 4, generator=gen, dtype=F64, requires_grad=True)
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


#: A tensor f reaches only through a global.
HIDDEN: dict = {}


def hidden_cell(z, x, shift):
    return torch.tanh(z @ HIDDEN["W"].T + x) + shift


def test_a_tensor_reached_through_a_global_is_refused_for_second_order_only():
    # The constant added last puts a None edge at the top of f's graph (it needs no grad).
    # W reaches f through a global, where the library cannot see it.
    HIDDEN["W"] = (0.3 * torch.eye(4, dtype=F64)).requires_grad_()
    shift = torch.ones(4, dtype=F64)
    deq = il.DEQ(functools.partial(hidden_cell, shift=shift), solver=TIGHT, backward="implicit")
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError) as caught:
        torch.autograd.grad(deq(x).z.sum(), x, create_graph=True)
    assert str(caught.value) == (
        "a second-order gradient through ImplicitDifferentiation needs to know every tensor f "
        "differentiates, but f uses one (shape (4, 4)) that is none of the tensors the library "
        "can see: the inputs of the DEQ (however nested), the parameters, buffers and tensor "
        "attributes of an nn.Module f, the closure of a plain f. Reached through a global? "
        "Pass it as an input, deq(x, w) with f(z, x, w), or hold it in an nn.Module f."
    )
    # First order stays available: its gradient reaches W, as through a closure.
    W = HIDDEN["W"]
    closed = il.DEQ(lambda z, x: torch.tanh(z @ W.T + x) + shift, solver=TIGHT, backward="implicit")
    (gW,) = torch.autograd.grad(deq(x).z.sum(), W)
    (want,) = torch.autograd.grad(closed(x).z.sum(), W)
    assert gW.abs().sum() > 0
    torch.testing.assert_close(gW, want, rtol=1e-9, atol=1e-12)


def test_the_leaf_check_visits_each_node_of_a_shared_graph_once():
    # 60 layers each using the previous value twice: 2^60 paths, 180 nodes.
    def f(z, x):
        y = z
        for _ in range(60):
            y = 0.5 * y + 0.5 * y
        return 0.5 * y + x

    x = torch.ones(1, 2, dtype=F64, requires_grad=True)
    deq = il.DEQ(f, solver=TIGHT, backward=EXACT)
    (g,) = torch.autograd.grad((deq(x).z ** 2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    # z* = 2x, L = 4 |x|^2: dL/dx = 8x, and the derivative of its sum is 8 per entry.
    torch.testing.assert_close(g, 8 * x.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(h, torch.full((1, 2), 8.0, dtype=F64), rtol=1e-10, atol=0)


def _tanh_fn(x, W):
    f = lambda z, x, W: torch.tanh(z @ W.T + x)  # noqa: E731
    z, _ = il.DEQ(f, solver=TIGHT, backward=EXACT)(x, W)
    return z


def _tuple_fn(x, W):
    def f(z, x, W):
        a, b = z
        return torch.tanh(a @ W.T + 0.5 * b + x), 0.5 * torch.sin(a)

    zeros = torch.zeros_like(x)
    z, _ = il.DEQ(f, solver=TIGHT, backward=EXACT)(x, W, z0=(zeros, zeros.clone()))
    return z


@pytest.mark.parametrize("fn", [_tanh_fn, _tuple_fn], ids=["tanh", "tuple"])
def test_implicit_gradgradcheck(fn):
    torch.manual_seed(0)
    W = (0.4 * torch.randn(4, 4, dtype=F64) / 2).requires_grad_()
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, W))
    assert torch.autograd.gradgradcheck(fn, (x, W), atol=1e-6)


def test_implicit_gradgradcheck_with_module_parameters():
    cell = TanhCell(n=4, d=3, scale=0.6)
    deq = il.DEQ(cell, solver=TIGHT, backward=EXACT)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(2, 4, dtype=F64)
    assert torch.autograd.gradgradcheck(lambda x: deq(x, z0=z0)[0], (x,), atol=1e-6)
    # Second derivatives reach the parameters too: Hessian-vector product against autograd
    # through a long unrolled solve.
    z, _ = deq(x, z0=z0)
    (gW,) = torch.autograd.grad((z**2).sum(), cell.W, create_graph=True)
    (hv,) = torch.autograd.grad(gW.sum(), x)
    zu = torch.zeros(2, 4, dtype=F64)
    for _ in range(200):
        zu = cell(zu, x)
    (gWu,) = torch.autograd.grad((zu**2).sum(), cell.W, create_graph=True)
    (hvu,) = torch.autograd.grad(gWu.sum(), x)
    torch.testing.assert_close(hv, hvu, rtol=1e-8, atol=1e-10)


def test_third_order_is_refused_with_the_documented_message():
    x = torch.ones(1, 1, dtype=F64, requires_grad=True)
    deq = il.DEQ(lambda z, x: torch.tanh(0.5 * z + x), solver=TIGHT, backward="implicit")
    (g1,) = torch.autograd.grad(deq(x).z.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError) as caught:
        torch.autograd.grad(g1.sum(), x, create_graph=True)
    assert str(caught.value) == (
        "third- and higher-order gradients through ImplicitDifferentiation are not supported; "
        "first and second order are exact"
    )
