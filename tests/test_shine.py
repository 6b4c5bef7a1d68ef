r"""SHINE: the forward solver's inverse estimate in the backward pass.

The closed form: on the cyclic affine map :math:`z = c P z + e_1` (:math:`P` the cyclic shift
of :math:`n` coordinates) Broyden's steps run along :math:`e_1, e_2, \dots, e_n`, each
orthogonal to the previous ones, so every secant condition survives the later updates and
after :math:`n` good steps its estimate is :math:`(I - J)^{-1}` itself: SHINE's gradient is
the exact one, to round-off. Anderson's multisecant estimate is exact once its history spans
the space. Elsewhere the estimate is checked by its adjoint residual and a poor one falls
back to the exact solve, reported per sample.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from registry import PATH_PARAMS
from torch.func import grad, jacfwd, jacrev, vmap
from zoo import Affine, AffineModule

import implicitlayers as il

F64 = torch.float64
N = 5
EYE = torch.eye(N, dtype=F64)
SHIFT = torch.roll(EYE, 1, dims=0)  # SHIFT e_i = e_{i+1}
SCALES = torch.tensor([0.5, 0.8, -0.7], dtype=F64)
#: Per-sample Jacobians c P of the cyclic map.
CYCLIC = SCALES[:, None, None] * SHIFT
BROYDEN = il.Broyden(max_iter=50, rtol=1e-12, atol=0.0, history_size=N)
ANDERSON = il.Anderson(max_iter=50, rtol=1e-12, atol=0.0, history_size=N + 1, regularization=0.0)


def cyclic(z, x):
    return torch.einsum("bij,bj->bi", CYCLIC, z) + x


def start():
    x = torch.zeros(3, N, dtype=F64)
    x[:, 0] = 1.0
    return x


def exact_u(J, g):
    r""":math:`(I - J^\top)^{-1} g` per sample (``J`` of shape ``(B, n, n)`` or ``(n, n)``)."""
    J = J.expand(g.shape[0], *J.shape[-2:])
    return torch.linalg.solve(torch.eye(g.shape[1], dtype=F64) - J.transpose(1, 2), g)


def shine_grad(f, x, g, solver, rule, **options):
    """``d (g . z*) / d x`` through SHINE (the DEQ returned too)."""
    x = x.clone().requires_grad_(True)
    deq = il.DEQ(f, solver=solver, backward=rule, **options)
    z, result = deq(x, z0=torch.zeros_like(x))
    (z * g).sum().backward()
    return x.grad, deq, result


# --- The estimate is the exact inverse after n good steps -------------------------------------


# Broyden's estimate is exact to round-off; Anderson's solves a small Gram system of secants
# of shrinking size, which costs it a few digits.
@pytest.mark.parametrize(
    ("solver", "atol"), [(BROYDEN, 1e-13), (ANDERSON, 1e-9)], ids=["broyden", "anderson"]
)
def test_after_n_good_steps_shine_is_the_exact_gradient(solver, atol):
    g = torch.randn(3, N, dtype=F64, generator=torch.Generator().manual_seed(0))
    dx, deq, forward = shine_grad(cyclic, start(), g, solver, il.SHINE(max_residual=1e-9))
    assert forward.converged.all()
    torch.testing.assert_close(dx, exact_u(CYCLIC, g), rtol=0, atol=atol)
    report = deq.last_backward_result
    assert isinstance(report, il.backward.SHINEResult)
    assert report.used_estimate.all() and not report.fell_back.any()
    # One VJP per sample: the check of the estimate's residual; no solve.
    assert report.n_f_evals == 1 and report.n_steps.tolist() == [1, 1, 1]
    assert (report.estimate_residual < atol).all()


def test_broyden_s_n_steps_are_the_coordinate_axes():
    # What makes the closed form hold: n + 1 iterates, then z* exactly (Broyden's update on
    # orthogonal steps keeps every earlier secant condition, so after n it knows J).
    x = start()
    result = il.fixed_point(cyclic, torch.zeros_like(x), x, solver=BROYDEN)
    assert result.n_steps.tolist() == [N + 2] * 3
    z_star = torch.linalg.solve(EYE - CYCLIC, x)
    torch.testing.assert_close(result.z, z_star, rtol=0, atol=1e-14)


def test_a_sample_that_stops_early_keeps_its_estimate():
    # Sample 0 (cyclic, converges at iteration n + 1) freezes while sample 1 (a slow map)
    # runs on; the steps a frozen sample still takes would restart its Broyden memory, so
    # the loop keeps each sample's memory as it stops.
    slow = Affine.make(n=N, d=3, contraction=0.95).W
    J = torch.stack((CYCLIC[0], slow))

    def f(z, x):
        return torch.einsum("bij,bj->bi", J, z) + x

    x = start()[:2]
    g = torch.randn(2, N, dtype=F64, generator=torch.Generator().manual_seed(1))
    solver = il.Broyden(max_iter=200, rtol=1e-12, atol=0.0, history_size=N)
    dx, deq, forward = shine_grad(f, x, g, solver, il.SHINE(max_residual=1e-10))
    assert forward.n_steps[0] == N + 2 < forward.n_steps[1]
    report = deq.last_backward_result
    assert bool(report.used_estimate[0]) and report.estimate_residual[0] < 1e-12
    torch.testing.assert_close(dx, exact_u(J, g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_every_path_of_the_loop_hands_over_the_same_estimate(path):
    g = torch.randn(3, N, dtype=F64, generator=torch.Generator().manual_seed(2))
    rule = il.SHINE(max_residual=1e-10)
    dx, deq, _ = shine_grad(cyclic, start(), g, BROYDEN, rule, **path.options)
    assert deq.last_backward_result.used_estimate.all()
    torch.testing.assert_close(dx, exact_u(CYCLIC, g), rtol=0, atol=1e-11)


# --- The check and the fallback ---------------------------------------------------------------


def _reported_residual(J, g, u):
    r""":math:`\|g - (I - J^\top) u\|` per sample, dense."""
    Ju = torch.einsum("bji,bj->bi", J.expand(g.shape[0], *J.shape[-2:]), u)
    return torch.linalg.vector_norm(g - u + Ju, dim=1)


def test_an_accepted_estimate_is_reported_with_its_true_residual():
    # A 6-dimensional affine map and a loose threshold: the estimate is inexact but used,
    # and what the report says about it is measured, not assumed.
    problem = Affine.make(n=6, d=3, contraction=0.5)
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    g = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(4))
    module = AffineModule(problem)
    deq = il.DEQ(module, solver=il.Broyden(rtol=1e-10), backward=il.SHINE(max_residual=10.0))
    z, _ = deq(x.requires_grad_(True), z0=torch.zeros(4, 6, dtype=F64))
    (z * g).sum().backward()
    report = deq.last_backward_result
    assert report.used_estimate.all() and report.converged.all()
    u = report.z
    true = _reported_residual(problem.W, g, u)
    torch.testing.assert_close(report.residual, true, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        report.estimate_residual, true / torch.linalg.vector_norm(g, dim=1), rtol=1e-10, atol=0
    )
    assert (true > 1e-6).all()  # inexact, as said
    # The gradients are those of u, the returned vector: dL/dx = u U.
    torch.testing.assert_close(x.grad, u @ problem.U, rtol=0, atol=1e-12)


def test_a_poor_estimate_falls_back_to_the_exact_solve_and_says_so():
    problem = Affine.make(n=6, d=3, contraction=0.8)
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    g = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(6))
    module = AffineModule(problem)
    rule = il.SHINE(solver=il.GMRES(rtol=1e-12, atol=1e-14))
    # One stored update: too little to be within 0.1 of the adjoint.
    deq = il.DEQ(module, solver=il.Broyden(history_size=1, rtol=1e-10), backward=rule)
    z, _ = deq(x.requires_grad_(True), z0=torch.zeros(4, 6, dtype=F64))
    (z * g).sum().backward()
    report = deq.last_backward_result
    assert report.fell_back.all() and not report.used_estimate.any()
    assert (report.estimate_residual > rule.max_residual).all()
    assert report.converged.all() and report.n_f_evals > 2
    torch.testing.assert_close(x.grad, exact_u(problem.W, g) @ problem.U, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        report.residual, _reported_residual(problem.W, g, report.z), rtol=1e-6, atol=1e-13
    )


def test_the_fallback_is_per_sample():
    # Sample 0's estimate is exact (the cyclic map), sample 1's poor (a dense map with a
    # history of 2): only sample 1 is solved.
    dense = Affine.make(n=N, d=3, contraction=0.8).W
    J = torch.stack((CYCLIC[0], dense))

    def f(z, x):
        return torch.einsum("bij,bj->bi", J, z) + x

    g = torch.randn(2, N, dtype=F64, generator=torch.Generator().manual_seed(7))
    rule = il.SHINE(max_residual=1e-8, solver=il.GMRES(rtol=1e-12, atol=1e-14))
    solver = il.Broyden(max_iter=100, rtol=1e-12, atol=0.0, history_size=N)
    dx, deq, _ = shine_grad(f, start()[:2], g, solver, rule)
    report = deq.last_backward_result
    assert report.used_estimate.tolist() == [True, False]
    assert report.fell_back.tolist() == [False, True]
    torch.testing.assert_close(dx, exact_u(J, g), rtol=0, atol=1e-10)


def test_without_an_estimate_every_sample_is_solved_and_reported():
    # Picard keeps no estimate: SHINE is then the exact rule, and says why.
    problem = Affine.make(n=6, d=3, contraction=0.5)
    x = torch.randn(2, 3, dtype=F64)
    g = torch.randn(2, 6, dtype=F64)
    module = AffineModule(problem)
    rule = il.SHINE(solver=il.GMRES(rtol=1e-12, atol=1e-14))
    deq = il.DEQ(module, solver=il.Picard(max_iter=200, rtol=1e-12), backward=rule)
    z, _ = deq(x.requires_grad_(True), z0=torch.zeros(2, 6, dtype=F64))
    (z * g).sum().backward()
    report = deq.last_backward_result
    assert report.fell_back.all() and torch.isnan(report.estimate_residual).all()
    torch.testing.assert_close(x.grad, exact_u(problem.W, g) @ problem.U, rtol=0, atol=1e-10)


def test_an_unconverged_fallback_warns_like_implicit_differentiation():
    problem = Affine.make(n=6, d=3, contraction=0.8)
    module = AffineModule(problem)
    rule = il.SHINE(solver=il.GMRES(max_iter=2, rtol=1e-12))
    deq = il.DEQ(module, solver=il.Broyden(history_size=1), backward=rule)
    z, _ = deq(torch.randn(2, 3, dtype=F64), z0=torch.zeros(2, 6, dtype=F64))
    with pytest.warns(il.ConvergenceWarning, match="exact adjoint solve did not converge"):
        z.sum().backward()
    assert not deq.last_backward_result.converged.all()


# --- Refinement: the estimate preconditions the exact solve ------------------------------------


def test_refinement_is_exact_and_needs_fewer_vjps_than_the_plain_solve():
    # A perturbed cyclic map of 30 coordinates (eigenvalues near a circle of radius 0.9:
    # full GMRES needs all 30 directions): the estimate is poor as an adjoint (residual above
    # 0.2) but as a preconditioner it halves the products.
    n = 30
    gen = torch.Generator().manual_seed(0)
    J = 0.9 * torch.roll(torch.eye(n, dtype=F64), 1, dims=0)
    J = J + 0.01 * torch.randn(n, n, dtype=F64, generator=gen)
    x = torch.zeros(2, n, dtype=F64)
    x[:, 0] = 1.0
    x = x + 0.1 * torch.randn(2, n, dtype=F64, generator=gen)
    g = torch.randn(2, n, dtype=F64, generator=gen)

    def f(z, x):
        return z @ J.T + x

    tight = il.GMRES(rtol=1e-10, atol=1e-14, restart=n)
    solver = il.Broyden(max_iter=300, rtol=1e-10, atol=0.0, history_size=40)
    dx, deq, _ = shine_grad(f, x, g, solver, il.SHINE(refine=True, solver=tight))
    refined = deq.last_backward_result
    torch.testing.assert_close(dx, exact_u(J, g), rtol=0, atol=1e-8)
    assert refined.converged.all() and not refined.fell_back.any()
    _, plain_deq, _ = shine_grad(f, x, g, solver, il.ImplicitDifferentiation(solver=tight))
    plain = plain_deq.last_backward_result
    assert plain.converged.all() and refined.n_f_evals < 0.6 * plain.n_f_evals
    _, direct, _ = shine_grad(f, x, g, solver, il.SHINE(solver=tight))
    assert (direct.last_backward_result.estimate_residual > 0.2).all()


def test_refined_second_derivatives_are_exact():
    # f = z / 2 + x: z* = 2x; L = sum z^3: dL/dx = 24 x^2 and d2L/dx2 = 48 x at x = 1.
    x = torch.ones(1, 1, dtype=F64, requires_grad=True)
    rule = il.SHINE(refine=True, solver=il.GMRES(rtol=1e-13, atol=1e-15))
    deq = il.DEQ(lambda z, x: 0.5 * z + x, solver=il.Broyden(rtol=1e-12), backward=rule)
    z, _ = deq(x)
    (first,) = torch.autograd.grad((z**3).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    assert first.item() == pytest.approx(24.0, rel=1e-10)
    assert second.item() == pytest.approx(48.0, rel=1e-10)


def test_a_second_order_pass_through_a_fallback_sample_is_refused():
    problem = Affine.make(n=6, d=3, contraction=0.8)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    deq = il.DEQ(AffineModule(problem), solver=il.Broyden(history_size=1), backward=il.SHINE())
    z, _ = deq(x, z0=torch.zeros(2, 6, dtype=F64))
    with pytest.raises(RuntimeError, match="second-order derivative"):
        torch.autograd.grad((z**2).sum(), x, create_graph=True)


# --- Forward mode and torch.func ---------------------------------------------------------------


def one_sample(rule):
    solver = il.Broyden(max_iter=200, rtol=1e-12, atol=0.0, history_size=2 * N)
    deq = il.DEQ(cyclic_one, solver=solver, backward=rule)
    return lambda xi: deq(xi[None], z0=torch.zeros(1, N, dtype=F64)).z[0]


def cyclic_one(z, x):
    return 0.8 * z @ SHIFT.T + x


def test_jacrev_jacfwd_and_vmap_through_shine_are_exact_on_the_cyclic_map():
    rule = il.SHINE(max_residual=1e-10)
    x = start()
    want = torch.linalg.inv(EYE - 0.8 * SHIFT)  # d z* / d x
    per = one_sample(rule)
    for transform in (jacrev, jacfwd):
        got = transform(per)(x[0])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11, msg=transform.__name__)
        batched = vmap(transform(per))(x)
        torch.testing.assert_close(batched, want.expand(3, N, N), rtol=0, atol=1e-11)


def test_per_sample_gradients_by_vmap_of_grad_through_shine():
    # Off the first axis the estimate is inexact: the fallback runs without host reads.
    rule = il.SHINE(max_residual=1e-10, solver=il.GMRES(rtol=1e-13, atol=1e-15))
    per = one_sample(rule)
    target = torch.randn(3, N, dtype=F64)

    def loss(xi, ti):
        return (per(xi) - ti).pow(2).sum()

    x = start() + 0.1 * torch.randn(3, N, dtype=F64)
    got = vmap(grad(loss))(x, target)
    inv = torch.linalg.inv(EYE - 0.8 * SHIFT)
    z = torch.linalg.solve(EYE - 0.8 * SHIFT, x.T).T
    torch.testing.assert_close(got, 2 * (z - target) @ inv, rtol=0, atol=1e-10)


def test_forward_mode_through_shine_uses_the_estimate():
    rule = il.SHINE(max_residual=1e-10)
    deq = il.DEQ(cyclic, solver=BROYDEN, backward=rule)
    x, dx = start(), torch.randn(3, N, dtype=F64)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, dx)
        z, _ = deq(dual, z0=torch.zeros(3, N, dtype=F64))
        tangent = torch.autograd.forward_ad.unpack_dual(z).tangent
    want = torch.linalg.solve(EYE - CYCLIC, dx)
    torch.testing.assert_close(tangent, want, rtol=0, atol=1e-11)


# --- Memory ------------------------------------------------------------------------------------


def test_the_kept_estimate_does_not_grow_with_iterations():
    cell = AffineModule(Affine.make(n=16, d=3, contraction=0.99, symmetric=True))
    x = torch.randn(4, 3, dtype=F64)

    def held_bytes(max_iter):
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
        solver = il.Broyden(
            max_iter=max_iter, atol=0.0, rtol=1e-300, history_size=4, divergence_ratio=None
        )
        deq = il.DEQ(cell, solver=solver, backward=il.SHINE())
        z, result = deq(x, z0=torch.zeros(4, 16, dtype=F64))
        assert result.n_steps.tolist() == [max_iter] * 4
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = [
                o for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in before
            ]
        total = sum(
            t.untyped_storage().nbytes()
            for t in {t.untyped_storage()._cdata: t for t in new}.values()
        )
        del z
        return total

    assert held_bytes(6) == held_bytes(80) > 0


def test_refinement_stays_within_the_solver_s_budget_and_one_vjp():
    problem = Affine.make(n=6, d=3, contraction=0.9)
    rule = il.SHINE(refine=True, solver=il.GMRES(max_iter=4, rtol=1e-12), on_unconverged="ignore")
    deq = il.DEQ(AffineModule(problem), solver=il.Broyden(history_size=2), backward=rule)
    z, _ = deq(torch.randn(3, 3, dtype=F64), z0=torch.zeros(3, 6, dtype=F64))
    z.sum().backward()
    report = deq.last_backward_result
    assert report.n_f_evals <= 4 + 1 and (report.n_steps <= 4 + 1).all()
    assert not report.converged.all()  # said, not hidden
