"""Linear solvers: GMRES against dense solves, per-sample stopping, failure statuses, checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il
from implicitlayers import SolverResult, Status
from implicitlayers.linear import GMRES, AbstractLinearSolver

F64 = torch.float64
FAST = settings(max_examples=25, deadline=None)


def dense(A):
    """The matvec of a batch of ``(B, n, n)`` matrices, row ``b`` applying ``A[b]``."""
    return lambda x: (A @ x[:, :, None]).squeeze(2)


def adjoint(J):
    """``u -> (I - J^T) u`` from the products ``u^T J`` only, as in implicit differentiation."""
    return lambda u: u - (u[:, None, :] @ J).squeeze(1)


def true_residual(matvec, rhs, z):
    return torch.linalg.vector_norm(rhs - matvec(z), dim=1)


def expanding_jacobians(batch, n, low=1.5, high=1.9, dtype=F64, seed=0):
    """Non-symmetric ``J_b`` with spectral radius in ``[low, high]``: Picard diverges on them."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(batch, n, n, dtype=F64, generator=gen)
    rho = torch.linalg.eigvals(G).abs().amax(dim=1)
    radii = torch.linspace(low, high, batch, dtype=F64)
    return (G * (radii / rho)[:, None, None]).to(dtype)


def well_conditioned(batch, n, dtype=F64, seed=0):
    """Non-symmetric ``I + E_b`` with ``||E_b|| < 1``: restarted GMRES converges on it."""
    gen = torch.Generator().manual_seed(seed)
    E = 0.4 * torch.randn(batch, n, n, dtype=F64, generator=gen) / n**0.5
    return (torch.eye(n, dtype=F64) + E).to(dtype)


def test_solves_adjoint_systems_on_which_the_fixed_point_iteration_diverges():
    batch, n = 4, 24
    J = expanding_jacobians(batch, n)
    rho = torch.linalg.eigvals(J).abs().amax(dim=1)
    assert ((rho > 1) & (rho < 2)).all()
    A = torch.eye(n, dtype=F64) - J.transpose(1, 2)
    assert (torch.linalg.cond(A) < 1e4).all()  # invertible, and not nearly singular
    g = torch.randn(batch, n, dtype=F64)
    u_star = torch.linalg.solve(A, g)
    # The adjoint fixed-point iteration u <- J^T u + g blows up.
    u = torch.zeros_like(g)
    for _ in range(30):
        u = (u[:, None, :] @ J).squeeze(1) + g
    assert (torch.linalg.vector_norm(u - u_star, dim=1) > 100 * u_star.norm(dim=1)).all()
    # So does the Anderson adjoint of ImplicitDifferentiation, and Broyden's: none converges.
    for fixed_point_solver in (
        il.Anderson(max_iter=200, rtol=1e-10, on_nonfinite="ignore"),
        il.Broyden(max_iter=200, rtol=1e-10, on_nonfinite="ignore"),
    ):
        rule = il.ImplicitDifferentiation(solver=fixed_point_solver, on_unconverged="ignore")
        _, failed = rule.adjoint(lambda v: (v[:, None, :] @ J).squeeze(1), g)
        assert not failed.converged.any()
    # GMRES on (I - J^T) u = g solves it, from the products u^T J alone.
    result = GMRES(restart=n, atol=0.0, rtol=1e-12).solve(adjoint(J), g)
    assert isinstance(result, SolverResult)
    assert result.converged.all()
    torch.testing.assert_close(result.z, u_star, atol=1e-8, rtol=0)
    # Full GMRES needs at most n Krylov steps, plus one matvec for the true residual.
    assert (result.n_steps <= n + 1).all()
    assert result.n_f_evals == int(result.n_steps.max())
    torch.testing.assert_close(result.residual, true_residual(adjoint(J), g, result.z))
    assert (result.residual <= 1e-12 * g.norm(dim=1)).all()


def test_solves_the_adjoint_of_a_nonlinear_map_from_vector_jacobian_products():
    batch, n = 3, 8
    W = 3.0 * torch.linalg.qr(torch.randn(n, n, dtype=F64))[0]
    x = 0.1 * torch.randn(batch, n, dtype=F64)
    z = (0.1 * torch.randn(batch, n, dtype=F64)).requires_grad_()
    fz = torch.tanh(z @ W.T + x)

    def matvec(u):
        (vjp,) = torch.autograd.grad(fz, z, u, retain_graph=True)
        return u - vjp

    g = torch.randn(batch, n, dtype=F64)
    with torch.no_grad():
        result = GMRES(atol=0.0, rtol=1e-12).solve(matvec, g)
        # J_b = diag(sech^2(W z_b + x_b)) W; its spectral radius exceeds 1 here.
        J = (1 - fz.square())[:, :, None] * W
        assert (torch.linalg.eigvals(J).abs().amax(dim=1) > 1).all()
        u_star = torch.linalg.solve(torch.eye(n, dtype=F64) - J.transpose(1, 2), g)
    assert result.converged.all()
    assert not result.z.requires_grad
    torch.testing.assert_close(result.z, u_star, atol=1e-9, rtol=0)


def test_float32_agrees_with_float64():
    batch, n = 3, 16
    J = expanding_jacobians(batch, n, low=1.2, high=1.5, seed=1)
    g = torch.randn(batch, n, dtype=F64)
    u_star = torch.linalg.solve(torch.eye(n, dtype=F64) - J.transpose(1, 2), g)
    J32, g32 = J.float(), g.float()
    result = GMRES(restart=n, rtol=1e-5).solve(adjoint(J32), g32)
    assert result.converged.all()
    assert result.z.dtype == result.residual.dtype == torch.float32
    assert result.status.dtype == result.n_steps.dtype == torch.int64
    assert result.converged.dtype == torch.bool
    scale = u_star.norm(dim=1, keepdim=True)
    assert ((result.z.double() - u_star).norm(dim=1, keepdim=True) <= 1e-3 * scale).all()
    assert (result.residual <= 1e-8 + 1e-5 * g32.norm(dim=1)).all()
    torch.testing.assert_close(result.residual, true_residual(adjoint(J32), g32, result.z))


def test_float32_keeps_the_basis_orthogonal():
    # A spread spectrum (condition number 1e3) makes a single Gram-Schmidt pass lose
    # orthogonality in float32, which costs extra steps (62-68 here instead of 50-51); with
    # the second pass float32 takes the steps float64 takes.
    batch, n = 4, 64
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(batch, n, n, dtype=F64, generator=gen))[0]
    A = (Q * torch.logspace(0, 3, n, dtype=F64)) @ Q.transpose(1, 2)
    rhs = torch.randn(batch, n, dtype=F64, generator=gen)
    solver = GMRES(restart=n, rtol=1e-4)
    double = solver.solve(dense(A), rhs)
    single = solver.solve(dense(A.float()), rhs.float())
    assert double.converged.all() and single.converged.all()
    assert (single.n_steps <= double.n_steps + 2).all()


def test_each_sample_stops_on_its_own_and_solves_like_it_would_alone():
    n = 12
    A = torch.stack(
        (torch.eye(n, dtype=F64), torch.eye(n, dtype=F64) - expanding_jacobians(1, n)[0].T)
    )
    rhs = torch.randn(2, n, dtype=F64)
    operands = []

    def matvec(x):
        operands.append(x.clone())
        return dense(A)(x)

    solver = GMRES(atol=0.0, rtol=1e-12)
    together = solver.solve(matvec, rhs)
    assert together.statuses() == [Status.SUCCESS, Status.SUCCESS]
    # The identity: one Krylov step solves it exactly, one more matvec measures the residual.
    assert together.n_steps[0] == 2
    assert together.n_steps[1] > 2 * together.n_steps[0]
    assert together.n_f_evals == len(operands) == int(together.n_steps[1])
    torch.testing.assert_close(together.z[0], rhs[0], atol=1e-14, rtol=0)
    # Once stopped, a sample is fed zeros and never updated again.
    assert all((x[0] == 0).all() for x in operands[2:])
    for i in range(2):
        alone = solver.solve(dense(A[i : i + 1]), rhs[i : i + 1])
        assert int(alone.n_steps[0]) == int(together.n_steps[i])
        assert int(alone.status[0]) == int(together.status[i])
        torch.testing.assert_close(alone.z[0], together.z[i], atol=1e-12, rtol=0)
    assert (together.residual <= 1e-12 * rhs.norm(dim=1)).all()


@FAST
@given(
    n=st.integers(1, 10),
    batch=st.integers(1, 4),
    restart=st.integers(1, 12),
    seed=st.integers(0, 10_000),
)
def test_batch_solves_like_each_sample_alone(n, batch, restart, seed):
    A = well_conditioned(batch, n, seed=seed)
    rhs = torch.randn(batch, n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    solver = GMRES(restart=restart, atol=0.0, rtol=1e-10)
    together = solver.solve(dense(A), rhs)
    assert together.converged.all()
    torch.testing.assert_close(together.z, torch.linalg.solve(A, rhs), atol=1e-8, rtol=0)
    for i in range(batch):
        alone = solver.solve(dense(A[i : i + 1]), rhs[i : i + 1])
        assert int(alone.n_steps[0]) == int(together.n_steps[i])
        torch.testing.assert_close(alone.z[0], together.z[i], atol=1e-12, rtol=0)


def test_restart_smaller_than_n_converges_with_more_matvecs():
    batch, n = 3, 40
    A = well_conditioned(batch, n)
    rhs = torch.randn(batch, n, dtype=F64)
    reference = torch.linalg.solve(A, rhs)
    full = GMRES(restart=n, atol=0.0, rtol=1e-10).solve(dense(A), rhs)
    short = GMRES(restart=4, atol=0.0, rtol=1e-10).solve(dense(A), rhs)
    for result in (full, short):
        assert result.converged.all()
        torch.testing.assert_close(result.z, reference, atol=1e-9, rtol=0)
        torch.testing.assert_close(result.residual, true_residual(dense(A), rhs, result.z))
    assert (short.n_steps > full.n_steps).all()
    print(full.n_steps, short.n_steps)


def test_restarted_gmres_can_stagnate_where_full_gmres_solves():
    # A rotation: A b is orthogonal to b, so a one-step cycle never improves on x = 0.
    A = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]], dtype=F64)
    rhs = torch.tensor([[1.0, 0.0]], dtype=F64)
    stuck = GMRES(restart=1, max_iter=20).solve(dense(A), rhs)
    assert stuck.statuses() == [Status.MAX_ITER]
    assert stuck.n_steps.tolist() == [20]
    assert (stuck.z == 0).all()
    torch.testing.assert_close(stuck.residual, torch.ones(1, dtype=F64), rtol=0, atol=0)
    full = GMRES(restart=2).solve(dense(A), rhs)
    assert full.converged.all()
    assert full.n_steps.tolist() == [3]
    torch.testing.assert_close(full.z, torch.tensor([[0.0, 1.0]], dtype=F64), atol=1e-15, rtol=0)


def test_max_iter_too_small_reports_max_iter_and_the_true_residual():
    batch, n = 3, 24
    J = expanding_jacobians(batch, n)
    g = torch.randn(batch, n, dtype=F64)
    result = GMRES(max_iter=7).solve(adjoint(J), g)
    assert result.statuses() == [Status.MAX_ITER] * batch
    assert not result.converged.any()
    assert result.n_steps.tolist() == [7] * batch
    assert result.n_f_evals == 7
    residual = true_residual(adjoint(J), g, result.z)
    torch.testing.assert_close(result.residual, residual, rtol=1e-12, atol=0)
    # Six Krylov steps reduced the residual, but not to the tolerance.
    assert (residual < g.norm(dim=1)).all()
    assert (residual > 1e-8 + 1e-6 * g.norm(dim=1)).all()


def test_one_matvec_only_checks_the_initial_guess():
    n = 6
    A = well_conditioned(2, n)
    rhs = torch.randn(2, n, dtype=F64)
    result = GMRES(max_iter=1).solve(dense(A), rhs)
    assert result.statuses() == [Status.MAX_ITER] * 2
    assert result.n_steps.tolist() == [0, 0]
    assert (result.z == 0).all()
    torch.testing.assert_close(result.residual, rhs.norm(dim=1), rtol=0, atol=0)
    x0 = torch.linalg.solve(A, rhs)
    result = GMRES(max_iter=1).solve(dense(A), rhs, x0)
    assert result.converged.all()
    assert result.n_steps.tolist() == [1, 1]


def test_initial_guess_is_used_and_left_untouched():
    batch, n = 3, 10
    A = well_conditioned(batch, n)
    rhs = torch.randn(batch, n, dtype=F64)
    reference = torch.linalg.solve(A, rhs)
    exact = GMRES().solve(dense(A), rhs, reference.clone())
    assert exact.converged.all()
    assert exact.n_steps.tolist() == [1] * batch  # only the true residual of x0
    x0 = torch.randn(batch, n, dtype=F64)
    copy = x0.clone()
    result = GMRES(atol=0.0, rtol=1e-10).solve(dense(A), rhs, x0)
    assert torch.equal(x0, copy)
    assert result.z is not x0
    assert result.converged.all()
    torch.testing.assert_close(result.z, reference, atol=1e-9, rtol=0)
    # A good initial guess saves matvecs.
    near = GMRES(atol=0.0, rtol=1e-10).solve(dense(A), rhs, reference + 1e-6 * x0)
    assert (near.n_steps < result.n_steps).all()


def test_nonfinite_rhs_stops_only_that_sample():
    batch, n = 3, 8
    A = well_conditioned(batch, n)
    rhs = torch.randn(batch, n, dtype=F64)
    rhs[1, 0] = float("nan")
    result = GMRES(atol=0.0, rtol=1e-10).solve(dense(A), rhs)
    assert result.statuses() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    assert result.n_steps[1] == 0
    assert torch.isnan(result.residual[1])
    keep = torch.tensor([0, 2])
    reference = torch.linalg.solve(A[keep], rhs[keep])
    torch.testing.assert_close(result.z[keep], reference, atol=1e-9, rtol=0)
    assert torch.isfinite(result.z).all()


def test_nonfinite_operator_stops_only_that_sample():
    batch, n = 3, 8
    A = well_conditioned(batch, n)
    A[2, 3, 4] = float("inf")
    rhs = torch.randn(batch, n, dtype=F64)
    result = GMRES(atol=0.0, rtol=1e-10).solve(dense(A), rhs)
    assert result.statuses() == [Status.SUCCESS, Status.SUCCESS, Status.NONFINITE]
    assert result.n_steps[2] == 1
    torch.testing.assert_close(result.z[:2], torch.linalg.solve(A[:2], rhs[:2]), atol=1e-9, rtol=0)
    # The returned iterate is the last finite one: the zero start, whose residual is rhs.
    assert (result.z[2] == 0).all()
    torch.testing.assert_close(result.residual[2], rhs[2].norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_singular_operator_breaks_down_with_the_least_squares_residual(dtype):
    n = 6
    ranked = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.0], dtype=F64))
    A = torch.stack((torch.zeros(n, n, dtype=F64), ranked, well_conditioned(1, n)[0])).to(dtype)
    rhs = torch.randn(3, n, dtype=dtype)
    result = GMRES().solve(dense(A), rhs)  # no exception
    assert result.statuses() == [Status.BREAKDOWN, Status.BREAKDOWN, Status.SUCCESS]
    # A = 0: one Krylov step finds nothing, one matvec confirms; the iterate stays 0.
    assert result.n_steps[0] == 2
    assert (result.z[0] == 0).all()
    assert torch.isfinite(result.z).all()
    torch.testing.assert_close(result.residual, true_residual(dense(A), rhs, result.z))
    # On the rank-deficient sample GMRES reaches the smallest residual there is: |rhs_n|.
    torch.testing.assert_close(result.residual[1], rhs[1, -1].abs())
    assert result.n_steps[1] < 20


def test_zero_rhs_succeeds_with_zero_solution_and_no_matvec():
    def never(x):
        raise AssertionError("matvec called")

    result = GMRES().solve(never, torch.zeros(2, 5, dtype=F64))
    assert result.converged.all()
    assert (result.z == 0).all()
    assert result.n_steps.tolist() == [0, 0]
    assert result.n_f_evals == 0
    assert (result.residual == 0).all()
    # Mixed with a non-zero sample: the zero one stays at 0 matvecs.
    A = well_conditioned(2, 5)
    rhs = torch.stack((torch.zeros(5, dtype=F64), torch.randn(5, dtype=F64)))
    mixed = GMRES().solve(dense(A), rhs)
    assert mixed.converged.all()
    assert mixed.n_steps[0] == 0 and mixed.n_steps[1] > 0
    assert (mixed.z[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("atol", "rtol"), [(1e-8, 1e-6), (0.0, 1e-4), (1e-3, 0.0)])
def test_success_means_true_residual_within_tolerance(dtype, atol, rtol):
    batch, n = 4, 20
    A = well_conditioned(batch, n, dtype=dtype)
    rhs = 10 * torch.randn(batch, n, dtype=dtype)
    result = GMRES(restart=5, atol=atol, rtol=rtol).solve(dense(A), rhs)
    residual = true_residual(dense(A), rhs, result.z)
    assert result.converged.all()
    torch.testing.assert_close(result.residual, residual)
    assert (residual <= atol + rtol * rhs.norm(dim=1)).all()


def test_every_hyperparameter_changes_behaviour():
    batch, n = 3, 30
    A = well_conditioned(batch, n)
    rhs = torch.randn(batch, n, dtype=F64)
    base = GMRES(restart=30, atol=0.0, rtol=1e-10)
    steps = base.solve(dense(A), rhs).n_steps
    for changed in (
        dataclasses.replace(base, restart=3),
        dataclasses.replace(base, rtol=1e-3),
        dataclasses.replace(base, atol=1e-2),
        dataclasses.replace(base, max_iter=5),
    ):
        assert not torch.equal(changed.solve(dense(A), rhs).n_steps, steps), changed


def test_runs_under_the_callers_grad_mode():
    batch, n = 2, 6
    A = well_conditioned(batch, n).requires_grad_()
    rhs = torch.randn(batch, n, dtype=F64)
    with torch.enable_grad():
        result = GMRES(atol=0.0, rtol=1e-10).solve(dense(A), rhs)
    torch.testing.assert_close(result.z, torch.linalg.solve(A.detach(), rhs), atol=1e-9, rtol=0)
    with torch.no_grad():
        quiet = GMRES(atol=0.0, rtol=1e-10).solve(dense(A), rhs)
    assert not quiet.z.requires_grad
    torch.testing.assert_close(quiet.z, result.z.detach(), atol=0, rtol=0)


def test_empty_batch():
    result = GMRES().solve(lambda x: x, torch.zeros(0, 4))
    assert result.z.shape == (0, 4)
    assert result.status.shape == result.n_steps.shape == result.residual.shape == (0,)
    assert result.n_f_evals == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    batch, n = 3, 24
    J = expanding_jacobians(batch, n, dtype=torch.float32)
    g = torch.randn(batch, n)
    cpu = GMRES(restart=n, rtol=1e-5).solve(adjoint(J), g)
    gpu = GMRES(restart=n, rtol=1e-5).solve(adjoint(J.cuda()), g.cuda())
    assert gpu.z.device.type == gpu.status.device.type == gpu.residual.device.type == "cuda"
    assert torch.equal(gpu.status.cpu(), cpu.status)
    torch.testing.assert_close(gpu.z.cpu(), cpu.z, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"restart": 0}, ValueError, r"restart must be >= 1, got 0"),
        ({"restart": 2.0}, TypeError, r"restart must be an int, got 2\.0"),
        ({"restart": True}, TypeError, r"restart must be an int"),
        ({"max_iter": 0}, ValueError, r"max_iter must be >= 1, got 0"),
        ({"max_iter": "10"}, TypeError, r"max_iter must be an int"),
        ({"atol": -1.0}, ValueError, r"atol must lie in \[0\.0, inf\], got -1\.0"),
        ({"rtol": float("nan")}, ValueError, r"rtol must be finite, got nan"),
        ({"atol": 0.0, "rtol": 0.0}, ValueError, r"atol and rtol are both 0.*rtol=1e-6"),
        ({"restar": 5}, TypeError, r"restar"),
    ],
)
def test_bad_configuration_raises_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        GMRES(**kwargs)


def test_hyperparameters_are_keyword_only():
    with pytest.raises(TypeError):
        GMRES(5)  # type: ignore[misc]


def test_bad_inputs_raise_naming_the_argument():
    solver = GMRES()
    with pytest.raises(ValueError, match=r"rhs must be a \(B, n\) tensor, got \(4,\)"):
        solver.solve(lambda x: x, torch.ones(4))
    with pytest.raises(TypeError, match="rhs must be a floating-point tensor"):
        solver.solve(lambda x: x, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x0 must have the shape of rhs \(2, 4\), got \(2, 3\)"):
        solver.solve(lambda x: x, torch.ones(2, 4), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="x0 must have the dtype and device of rhs"):
        solver.solve(lambda x: x, torch.ones(2, 4), torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"matvec must map .* \(2, 4\) -> \(2, 2\)"):
        solver.solve(lambda x: x[:, :2], torch.ones(2, 4))
    with pytest.raises(TypeError, match="matvec must keep the dtype"):
        solver.solve(lambda x: x.double(), torch.ones(2, 4))


def test_value_semantics_and_compact_repr():
    assert repr(GMRES()) == "GMRES()"
    assert repr(GMRES(restart=5, rtol=1e-8)) == "GMRES(rtol=1e-08, restart=5)"
    assert GMRES(restart=5) == GMRES(restart=5) != GMRES(restart=6)
    assert hash(GMRES(restart=5)) == hash(GMRES(restart=5))
    solver = GMRES()
    assert (solver.max_iter, solver.atol, solver.rtol, solver.restart) == (200, 1e-8, 1e-6, 20)
    assert isinstance(solver, AbstractLinearSolver)
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.restart = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="abstract"):
        AbstractLinearSolver()  # type: ignore[abstract]


# --- Conjugate gradients ----------------------------------------------------------------


def _spd(n, seed, cond=50.0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ q.T


def test_cg_solves_a_batch_of_spd_systems_to_its_tolerance():
    A = torch.stack([_spd(12, 0), _spd(12, 1, cond=1e3)])
    b = torch.randn(2, 12, dtype=torch.float64)
    result = il.linear.CG(rtol=1e-10, atol=0.0).solve(lambda v: torch.einsum("bij,bj->bi", A, v), b)
    want = torch.linalg.solve(A, b)
    assert result.converged.all() and result.linear
    torch.testing.assert_close(result.z, want, rtol=1e-8, atol=1e-10)
    true = torch.linalg.vector_norm(b - torch.einsum("bij,bj->bi", A, result.z), dim=1)
    torch.testing.assert_close(result.residual, true)
    assert (result.residual <= 1e-10 * torch.linalg.vector_norm(b, dim=1)).all()
    # The worse-conditioned sample needs more products, each counted per sample.
    assert result.n_steps[1] > result.n_steps[0] and result.n_f_evals == int(result.n_steps.max())


def test_cg_takes_image_shaped_systems_and_stops_on_its_budget():
    # A = 2 I + 0.5 (shift) acting on (B, 1, 4, 4): SPD; two products cannot solve it.
    def matvec(v):
        return 2 * v + 0.25 * (v.roll(1, -1) + v.roll(-1, -1))

    b = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    short = il.linear.CG(max_iter=2, rtol=1e-12, atol=0.0).solve(matvec, b)
    assert short.status.tolist() == [il.Status.MAX_ITER] * 3 and short.n_steps.tolist() == [2] * 3
    full = il.linear.CG(max_iter=100, rtol=1e-12, atol=0.0).solve(matvec, b)
    assert full.converged.all()
    torch.testing.assert_close(matvec(full.z), b, rtol=0, atol=1e-10)


def test_cg_reports_an_indefinite_operator_as_breakdown_and_a_nan_as_nonfinite():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    b = torch.tensor([[1.0, 1.0], [float("nan"), 0.0]], dtype=torch.float64)
    result = il.linear.CG(rtol=1e-10).solve(lambda v: v @ A, b)
    assert result.status.tolist() == [il.Status.BREAKDOWN, il.Status.NONFINITE]
