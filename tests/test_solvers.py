"""Forward solvers: the contract every registered solver meets, then each solver's own options.

The contract tests run on every row of ``registry.SOLVER_ROWS`` crossed with the problem zoo
and the loop's paths; a new solver is one row there. The sections after them pin what only
one solver does, against dense references that follow its documented formulas (Anderson's
bordered system and safeguard, Broyden's limited memory, Picard's mixing).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from registry import (
    ACCELERATED_PARAMS,
    BREAKING_PARAMS,
    NEVER,
    PATH_PARAMS,
    SOLVER_PARAMS,
    SOLVER_TAGS,
    STEADY_PARAMS,
)
from zoo import (
    CLOSED_FORM_PROBLEMS,
    PROBLEMS,
    Affine,
    ConvCell,
    half_plus_one,
    make_problem,
    recording,
    tanh_map,
)

import implicitlayers as il
from implicitlayers import Status

F64 = torch.float64


# --- The contract of every solver -------------------------------------------------------------


def test_every_library_solver_has_its_tags_in_the_registry():
    missing = [name for name, cls in il.solvers.SOLVERS.items() if cls not in SOLVER_TAGS]
    assert not missing, f"add the tags of {missing} to tests/registry.py's SOLVER_TAGS"


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
@pytest.mark.parametrize("name", CLOSED_FORM_PROBLEMS)
def test_every_solver_finds_the_closed_form_fixed_point(solver, name):
    # ||z - z*|| <= residual / (1 - 0.9): 1e-12 of |f(z)| (about 10) is within 1e-9.
    problem = make_problem(name)
    s = solver.make(max_iter=500, atol=0.0, rtol=1e-12)
    result = il.fixed_point(problem.f, problem.z0, *problem.inputs, solver=s)
    assert result.converged.all()
    torch.testing.assert_close(result.z, problem.solution, atol=1e-9, rtol=0)


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
@pytest.mark.parametrize("name", PROBLEMS)
def test_success_means_the_true_residual_is_within_tolerance(solver, name):
    problem = make_problem(name)
    s = solver.make(max_iter=500, atol=1e-9, rtol=1e-7)
    with torch.no_grad():
        result = il.fixed_point(problem.f, problem.z0, *problem.inputs, solver=s)
        fz = problem.f(result.z, *problem.inputs)
    residual = torch.linalg.vector_norm((fz - result.z).flatten(1), dim=1)
    scale = torch.linalg.vector_norm(fz.flatten(1), dim=1)
    assert result.converged.all()
    # The reported residual is the true residual of the returned iterate.
    torch.testing.assert_close(result.residual, residual, rtol=1e-9, atol=1e-15)
    assert (residual <= s.atol + s.rtol * scale).all()


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_a_batch_solves_like_each_sample_alone(solver):
    # (For random problems too: test_properties; here the exact step counts.)
    problem = make_problem("affine-symmetric")
    s = solver.make(max_iter=500, atol=0.0, rtol=1e-10)
    (x,) = problem.inputs
    batch = il.fixed_point(problem.f, problem.z0, x, solver=s)
    for i in range(x.shape[0]):
        alone = il.fixed_point(problem.f, problem.z0[i : i + 1], x[i : i + 1], solver=s)
        assert int(alone.n_steps[0]) == int(batch.n_steps[i])
        torch.testing.assert_close(alone.z[0], batch.z[i], atol=1e-12, rtol=0)


@pytest.mark.parametrize("solver", ACCELERATED_PARAMS)
def test_an_accelerated_solver_needs_far_fewer_evaluations_at_contraction_095(solver):
    problem = Affine.make(n=32, d=4, contraction=0.95, symmetric=True, seed=1)
    x = torch.randn(8, 4, dtype=F64)
    z0 = torch.zeros(8, 32, dtype=F64)
    options = {"max_iter": 1000, "atol": 0.0, "rtol": 1e-6}
    picard = il.fixed_point(problem, z0, x, solver=il.Picard(**options))
    fast = il.fixed_point(problem, z0, x, solver=solver.make(**options))
    assert picard.converged.all() and fast.converged.all()
    assert picard.n_f_evals > 150  # 0.95^k < 1e-6 needs ~270 steps
    assert fast.n_f_evals <= solver.speedup * picard.n_f_evals


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_the_state_dtype_is_preserved(dtype, solver):
    lin = torch.nn.Linear(4, 4).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, 2))
    x = torch.randn(2, 4, dtype=dtype)
    result = il.fixed_point(
        lambda z, x: lin(z) + x, torch.zeros(2, 4, dtype=dtype), x, solver=solver.make(rtol=1e-4)
    )
    assert result.z.dtype == dtype and result.residual.dtype == dtype
    assert result.converged.all()


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_a_sample_solves_the_same_next_to_one_1e100_times_larger(solver):
    # Every per-sample quantity (Anderson's ridge scale, Broyden's breakdown threshold) must be
    # taken over that sample's own row: the iteration is scale-equivariant, so the big sample
    # follows the small one scaled, and the small one follows itself solved alone.
    f, g = tanh_map()
    s = solver.make(max_iter=8, **NEVER)
    scale = torch.tensor([1.0, 1e100], dtype=F64)[:, None]
    z0 = torch.randn(1, 4, generator=g, dtype=F64)
    fr, alone = recording(f)
    il.fixed_point(fr, z0, solver=s)
    fr, both = recording(lambda z: scale * f(z / scale))
    il.fixed_point(fr, torch.cat([z0, 1e100 * z0]), solver=s)
    alone, both = torch.cat(alone), torch.stack(both)
    torch.testing.assert_close(both[:, 0], alone, rtol=1e-12, atol=0)
    torch.testing.assert_close(both[:, 1] / 1e100, alone, rtol=1e-9, atol=0)


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_every_tensor_is_made_on_the_state_device(solver, path):
    # With "meta" as the default device, a tensor the solver makes without device= lands
    # there and cannot meet the CPU state (as one made on the CPU could not meet a CUDA
    # state). Samples stop at different steps, so the freezing paths run too.
    z0 = torch.tensor([[2.0, 2.0], [0.0, 0.0], [5.0, 1.0]], dtype=F64)
    s = solver.make(rtol=1e-9, atol=0.0, max_iter=100)
    with torch.device("meta"):
        r = il.fixed_point(half_plus_one, z0, solver=s, **path.options)
        empty = il.fixed_point(half_plus_one, z0[:0], solver=s)
    for tensor in (r.z, r.status, r.n_steps, r.residual, r.rate, empty.status, empty.n_steps):
        assert tensor.device.type == "cpu"
    assert r.converged.all() and r.n_steps[0] == 1
    torch.testing.assert_close(r.z, torch.full((3, 2), 2.0, dtype=F64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_an_unconverged_solve_that_never_broke_down_is_max_iter(solver):
    f, g = tanh_map()
    s = solver.make(max_iter=3, **NEVER)
    r = il.fixed_point(f, torch.randn(2, 4, generator=g, dtype=F64), solver=s)
    assert r.status.tolist() == [Status.MAX_ITER] * 2


@pytest.mark.parametrize("solver", BREAKING_PARAMS)
def test_breakdown_flags_are_batch_booleans_on_the_state_device(solver):
    # (Under a meta default device, so that no flag is made off the state's device.) A smooth
    # contraction breaks nothing down.
    f, g = tanh_map()
    z0 = torch.randn(2, 4, generator=g, dtype=F64)
    s = solver.make()
    with torch.device("meta"):
        state, z = s.init(z0), z0
        for k in range(7):
            z, state, flags = s.step(state, z, f(z), k)
            assert flags.device == z0.device and flags.dtype == torch.bool
            assert flags.shape == (2,) and not flags.any()


@pytest.mark.parametrize("solver", STEADY_PARAMS)
def test_a_solver_without_an_internal_system_never_reports_breakdown(solver):
    f, _ = tanh_map()
    s = solver.make()
    state, z = s.init(torch.zeros(2, 4, dtype=F64)), torch.zeros(2, 4, dtype=F64)
    for k in range(5):
        z, state, flags = s.step(state, z, f(z), k)
        assert flags is None
    result = il.fixed_point(lambda z: 2 * z + 1, torch.zeros(2, 1), solver=solver.make(max_iter=5))
    assert not (result.status == int(Status.BREAKDOWN)).any()


# --- Picard -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixing", [0.75, 0.7])
def test_picard_mixing_weighs_f(mixing):
    # z_{k+1} = (1 - beta) z_k + beta f(z_k): from 0, z1 = beta, z2 = (1 - beta) z1 + beta f(z1).
    f, calls = recording(half_plus_one)
    solver = il.Picard(mixing=mixing, max_iter=3, **NEVER)
    r = il.fixed_point(f, torch.zeros(1, 1, dtype=F64), solver=solver)
    z1 = mixing
    z2 = (1 - mixing) * z1 + mixing * (0.5 * z1 + 1)
    torch.testing.assert_close(
        torch.cat(calls).flatten(), torch.tensor([0.0, z1, z2], dtype=F64), rtol=1e-15, atol=0
    )
    assert r.status.tolist() == [Status.MAX_ITER] and r.n_steps.tolist() == [3]
    torch.testing.assert_close(r.z, torch.tensor([[z2]], dtype=F64), rtol=1e-15, atol=0)


# --- Anderson -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mixing", [0.25, 0.3, 1.0])
def test_anderson_mixing_weighs_f(mixing):
    # The first step has one pair: z1 = beta f(z0) + (1 - beta) z0 = beta (from 0). The
    # second, with two pairs of a scalar affine map and no ridge, cancels the residual
    # exactly: z2 = 2, whatever beta.
    f, calls = recording(half_plus_one)
    solver = il.Anderson(mixing=mixing, regularization=0.0, max_iter=3, **NEVER)
    il.fixed_point(f, torch.zeros(1, 1, dtype=F64), solver=solver)
    expected = torch.tensor([0.0, mixing, 2.0], dtype=F64)
    torch.testing.assert_close(torch.cat(calls).flatten(), expected, rtol=1e-14, atol=0)


def anderson_ridge(gram, lam):
    """The documented ridge ``lambda diag(G G^T)``, relative to each stored residual.

    (The one line to change with Anderson's regularisation: the reference tests below pin it.)
    """
    return lam * torch.diag(gram.diagonal())


def reference_anderson(f, z0, steps, m, beta, lam):
    """Dense Anderson (type II) on one sample, as documented: the iterates ``z_0 .. z_steps``.

    A singular or non-finite system takes the damped Picard step and clears the history.
    """
    zs, Z, F, G = [z0], [], [], []
    z = z0
    for _ in range(steps):
        fz = f(z)
        Z, F, G = [*Z, z][-m:], [*F, fz][-m:], [*G, fz - z][-m:]
        Gm = torch.stack(G)
        gram = Gm @ Gm.T
        k = len(G)
        system = torch.zeros(k + 1, k + 1, dtype=z.dtype)
        system[0, 1:] = 1
        system[1:, 0] = 1
        system[1:, 1:] = gram + anderson_ridge(gram, lam)
        rhs = torch.zeros(k + 1, dtype=z.dtype)
        rhs[0] = 1
        solution, info = torch.linalg.solve_ex(system, rhs)
        alpha = solution[1:]
        if info != 0 or not torch.isfinite(alpha).all():
            alpha = torch.zeros(k, dtype=z.dtype)
            alpha[-1] = 1
            Z, F, G = [], [], []
            z = beta * fz + (1 - beta) * z
        else:
            z = beta * (alpha @ torch.stack(F)) + (1 - beta) * (alpha @ torch.stack(Z))
        zs.append(z)
    return torch.stack(zs)


@pytest.mark.parametrize(("m", "beta", "lam"), [(2, 1.0, 1e-6), (3, 0.5, 1e-2), (1, 0.7, 0.0)])
def test_anderson_iterates_match_a_dense_reference(m, beta, lam):
    # A nonlinear map, so that no step solves it exactly and the history wraps around.
    f, g = tanh_map(seed=3)
    steps = 7
    fr, calls = recording(f)
    solver = il.Anderson(
        history_size=m, mixing=beta, regularization=lam, max_iter=steps + 1, **NEVER
    )
    z0 = torch.randn(2, 4, generator=g, dtype=F64)
    il.fixed_point(fr, z0, solver=solver)
    got = torch.stack(calls)  # (steps + 1, B, n)
    for i in range(2):
        expected = reference_anderson(f, z0[i], steps, m, beta, lam)
        torch.testing.assert_close(got[:, i], expected, rtol=1e-9, atol=1e-12)


class ScriptedStall:
    """A tanh map whose ``stall``-th call returns ``z`` plus the previous residual: two equal
    residuals, so Anderson's system (without ridge) is singular there."""

    def __init__(self, stall):
        self.f, _ = tanh_map(n=3, seed=5)
        self.stall, self.calls, self.g = stall, 0, None

    def __call__(self, z):
        self.calls += 1
        out = z + self.g if self.calls == self.stall else self.f(z)
        self.g = out - z
        return out


@pytest.mark.parametrize("mixing", [1.0, 0.5])
def test_anderson_restarts_from_its_newest_pair_after_a_breakdown(mixing):
    # The breakdown at the 4th evaluation leaves two stale pairs in the history buffers; the
    # iterates after it must ignore them. (history_size 3 in 3 dimensions: without a ridge,
    # more pairs than that would be affinely dependent, hence singular.)
    steps = 9
    f, calls = recording(ScriptedStall(stall=4))
    solver = il.Anderson(
        history_size=3, mixing=mixing, regularization=0.0, max_iter=steps + 1, **NEVER
    )
    r = il.fixed_point(f, torch.zeros(1, 3, dtype=F64), solver=solver)
    z0 = torch.zeros(3, dtype=F64)
    expected = reference_anderson(ScriptedStall(stall=4), z0, steps, 3, mixing, 0.0)
    torch.testing.assert_close(torch.cat(calls[: steps + 1]), expected, rtol=1e-9, atol=1e-12)
    assert r.status.tolist() == [Status.BREAKDOWN]


@pytest.mark.parametrize("mixing", [1.0, 0.5])
def test_anderson_breakdown_takes_the_damped_picard_step(mixing):
    solver = il.Anderson(history_size=2, regularization=0.0, mixing=mixing)
    z = torch.randn(3, 4, dtype=F64)
    fz = torch.randn(3, 4, dtype=F64)
    _, state, breakdown = solver.step(solver.init(z), z, fz, 0)
    assert not breakdown.any()
    # The same pair again: the Gram system is singular.
    z_next, state, breakdown = solver.step(state, z, fz, 1)
    # The history restarts: the system is that of an empty history again.
    assert breakdown.all() and torch.equal(state["system"], solver.init(z)["system"])
    torch.testing.assert_close(z_next, torch.lerp(z, fz, mixing), atol=1e-15, rtol=0)


def test_anderson_breakdown_is_reported_not_raised():
    # f(z) = z + 1 has no fixed point; all residuals are equal, so Anderson's system is singular.
    solver = il.Anderson(max_iter=20, regularization=0.0, divergence_ratio=None)
    result = il.fixed_point(lambda z: z + 1, torch.zeros(2, 3), solver=solver)
    assert (result.status == Status.BREAKDOWN).all()
    assert "regularization" in Status.BREAKDOWN.message
    assert "BREAKDOWN" in result.summary()


def test_anderson_with_one_pair_is_picard_bit_for_bit():
    f, g = tanh_map()
    z0 = torch.randn(2, 4, generator=g, dtype=F64)
    runs = []
    for solver in (
        il.Anderson(history_size=1, max_iter=8, **NEVER),
        il.Picard(max_iter=8, **NEVER),
    ):
        fr, calls = recording(f)
        il.fixed_point(fr, z0, solver=solver)
        runs.append(torch.stack(calls))
    assert torch.equal(runs[0], runs[1])


def test_the_scale_aware_ridge_beats_a_fixed_one():
    # torchdeq's Anderson adds a fixed 1e-4 to G G^T; once residuals are small that ridge swamps
    # the system. Ours scales with diag(G G^T) and keeps its acceleration to tight tolerances.
    problem = Affine.make(n=32, d=4, contraction=0.95, symmetric=True, seed=1)
    x = torch.randn(8, 4, dtype=F64)
    z0 = torch.zeros(8, 32, dtype=F64)
    ours = il.fixed_point(problem, z0, x, solver=il.Anderson(max_iter=1000, atol=0, rtol=1e-8))
    picard = il.fixed_point(problem, z0, x, solver=il.Picard(max_iter=1000, atol=0, rtol=1e-8))
    assert ours.converged.all() and picard.converged.all()
    assert ours.n_f_evals < 0.3 * picard.n_f_evals


def _picard_easy_maps():
    """Maps Picard solves in 5 to 12 evaluations at rtol 1e-10 (float64, batch 4)."""
    gen = torch.Generator().manual_seed(19)
    n = 28
    W1, b1 = torch.randn(8, n, generator=gen, dtype=F64) / math.sqrt(n), torch.randn(8, dtype=F64)
    W2, b2 = torch.randn(n, 8, generator=gen, dtype=F64) / math.sqrt(8), torch.randn(n, dtype=F64)
    A = torch.randn(64, 64, generator=gen, dtype=F64)
    A = A / torch.linalg.matrix_norm(A, 2)
    x = torch.randn(4, 64, generator=gen, dtype=F64)
    r0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64).repeat(4, 1)

    def robertson(y):
        a, b, c = y.unbind(dim=1)
        return torch.stack(
            (-0.04 * a + 1e4 * b * c, 0.04 * a - 3e7 * b**2 - 1e4 * b * c, 3e7 * b**2), 1
        )

    start = 0.5 * torch.ones(4, n, dtype=F64)
    return {
        "0.1 softplus MLP": (lambda z: 0.1 * (F.softplus(z @ W1.T + b1) @ W2.T + b2), start),
        "Robertson midpoint": (lambda y: r0 + 1e-4 * robertson(0.5 * (r0 + y)), r0.clone()),
        "tanh 0.05": (lambda z: torch.tanh(0.05 * z @ A.T + x), torch.zeros(4, 64, dtype=F64)),
        "tanh 0.1": (lambda z: torch.tanh(0.1 * z @ A.T + x), torch.zeros(4, 64, dtype=F64)),
        "tanh 0.2": (lambda z: torch.tanh(0.2 * z @ A.T + x), torch.zeros(4, 64, dtype=F64)),
        "sqrt(10 / (z + 10))": (lambda z: torch.sqrt(10 / (z + 10)), torch.ones(4, 5, dtype=F64)),
        "0.3 sin z + 1": (lambda z: 0.3 * torch.sin(z) + 1, torch.zeros(4, 5, dtype=F64)),
    }


@pytest.mark.parametrize("name", list(_picard_easy_maps()))
def test_anderson_needs_at_most_one_evaluation_more_than_picard_on_picard_easy_maps(name):
    f, z0 = _picard_easy_maps()[name]
    options = {"max_iter": 100, "atol": 0.0, "rtol": 1e-10}
    picard = il.fixed_point(f, z0, solver=il.Picard(**options))
    anderson = il.fixed_point(f, z0, solver=il.Anderson(**options))
    assert picard.converged.all() and anderson.converged.all()
    assert picard.n_f_evals <= 12  # the map is Picard-easy
    assert anderson.n_f_evals <= picard.n_f_evals + 1


def test_anderson_ridge_stays_relative_to_each_residual():
    # Residuals shrink 20x per step: after four steps the newest is 1e-5 of the oldest, where a
    # ridge relative to the largest residual swamps the newest rows and pulls the mix back to
    # old iterates (the former Anderson needed 9 evaluations here, Picard 7).
    f, z0 = _picard_easy_maps()["tanh 0.05"]
    options = {"max_iter": 100, "atol": 0.0, "rtol": 1e-10}
    for regularization in (1e-6, 1e-3):
        result = il.fixed_point(f, z0, solver=il.Anderson(regularization=regularization, **options))
        assert result.converged.all() and result.n_f_evals <= 7


def _robertson_steps():
    """Implicit-midpoint steps of the Robertson kinetics (rates 0.04, 3e7, 1e4, step 1e-8) from
    states with b from 1e-7 to 1e-2, the state a pytree (a, b, c): Picard contracts by 1e-4
    or more per evaluation and reaches the float64 fixed point in 4 to 8."""
    gen = torch.Generator().manual_seed(3)
    cases = []
    for log_b in (-7.1, -5.2, -4.7, -3.4, -2.2):
        y0 = (
            torch.rand(4, 1, generator=gen, dtype=F64),
            10 ** (log_b + 0.3 * torch.randn(4, 1, generator=gen, dtype=F64)),
            torch.rand(4, 1, generator=gen, dtype=F64),
        )

        def f(y, y0=y0):
            a, b, c = (0.5 * (p + q) for p, q in zip(y0, y, strict=True))
            rates = (-0.04 * a + 1e4 * b * c, 0.04 * a - 3e7 * b**2 - 1e4 * b * c, 3e7 * b**2)
            return tuple(p + 1e-8 * r for p, r in zip(y0, rates, strict=True))

        cases.append(pytest.param(f, y0, id=f"b=1e{log_b}"))
    return cases


@pytest.mark.parametrize(("f", "y0"), _robertson_steps())
@pytest.mark.parametrize("rtol", [1e-15, 1e-300])
def test_anderson_takes_picard_s_steps_at_the_round_off_floor(f, y0, rtol):
    # Solved to the last bit (rtol 1e-300: the float64 fixed point itself), the secants of the
    # last steps are rounding noise: extrapolating from them cost Anderson up to 4 evaluations
    # more than Picard; at the round-off floor it takes the plain step, as Picard does.
    options = {"max_iter": 100, "atol": 0.0, "rtol": rtol}
    for z0 in (y0, tuple(torch.zeros_like(p) for p in y0)):
        picard = il.fixed_point(f, z0, solver=il.Picard(**options))
        anderson = il.fixed_point(f, z0, solver=il.Anderson(**options))
        assert picard.converged.all() and anderson.converged.all()
        assert anderson.n_f_evals <= picard.n_f_evals + 1 <= 10


def _history(solver, residual_scale):
    """Two steps on a scalar-like map, then an iterate whose residual is ``residual_scale``
    times the last one: returns the state, that iterate, f of it and the last (z, f(z))."""
    z0 = torch.zeros(3, 4, dtype=F64)
    f0 = torch.ones(3, 4, dtype=F64)
    state = solver.init(z0)
    z1, state, _ = solver.step(state, z0, f0, 0)  # plain: z1 = f0
    f1 = z1 + 0.5 * (f0 - z0)
    z2, state, _ = solver.step(state, z1, f1, 1)  # extrapolated
    f2 = z2 + residual_scale * (f1 - z1)
    return state, z2, f2, z1, f1


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("mixing", [1.0, 0.5])
def test_anderson_safeguard_rejects_an_extrapolation_that_raises_the_residual(m, mixing):
    solver = il.Anderson(history_size=m, mixing=mixing)
    state, z2, f2, z1, f1 = _history(solver, residual_scale=3.0)
    z3, state, breakdown = solver.step(state, z2, f2, 2)
    # Back to the plain step from the base z1, which Picard would have taken; not a breakdown.
    torch.testing.assert_close(z3, torch.lerp(z1, f1, mixing), atol=1e-15, rtol=0)
    assert not breakdown.any()
    # The plain step is not tested again: the next step mixes as usual.
    assert torch.isinf(state["bar"]).all()


def test_anderson_safeguard_keeps_an_extrapolation_that_lowers_the_residual_and_can_be_off():
    guarded, plain = il.Anderson(history_size=3), il.Anderson(history_size=3, safeguard=False)
    state, z2, f2, _, _ = _history(guarded, residual_scale=0.5)
    kept, _, _ = guarded.step(state, z2, f2, 2)
    state, z2, f2, _, _ = _history(plain, residual_scale=0.5)
    unguarded, _, _ = plain.step(state, z2, f2, 2)
    torch.testing.assert_close(kept, unguarded, atol=0, rtol=0)
    state, z2, f2, _, f1 = _history(plain, residual_scale=3.0)
    raised, _, _ = plain.step(state, z2, f2, 2)
    assert not torch.allclose(raised, f1)  # without the safeguard, the mix goes on


@pytest.mark.parametrize("shift", [1, 2])
def test_anderson_iterates_do_not_depend_on_which_slot_holds_which_pair(shift):
    # Every pair goes to slot iteration % m: a run whose slots are shifted (as if the loop had
    # counted from `shift`) mixes the same pairs, so it takes the same steps.
    solver = il.Anderson(history_size=3)
    gen = torch.Generator().manual_seed(0)
    W = 0.3 * torch.randn(6, 6, generator=gen, dtype=F64)
    f = lambda z: torch.tanh(z @ W.T + 1)  # noqa: E731
    z = torch.zeros(2, 6, dtype=F64)
    a, b = solver.init(z), solver.init(z)
    za = zb = z
    for k in range(7):
        za, a, _ = solver.step(a, za, f(za), k)
        zb, b, _ = solver.step(b, zb, f(zb), k + shift)
        torch.testing.assert_close(za, zb, atol=1e-13, rtol=0)
    assert not torch.equal(a["X"], b["X"])  # the slots did differ


# --- Broyden ------------------------------------------------------------------------------------


def reference_broyden(f, z0, steps, memory):
    """Dense "good" Broyden on one sample, as documented: ``H`` starts at ``-I``; an update
    that finds ``memory`` updates stored restarts ``H`` from ``-I`` before it is added. The
    iterates ``z_0 .. z_steps``."""
    eye = torch.eye(z0.numel(), dtype=z0.dtype)
    H, stored = -eye, 0
    zs, z, z_prev, g_prev = [z0], z0, None, None
    for _ in range(steps):
        g = f(z) - z
        if g_prev is not None:
            dz, dg = z - z_prev, g - g_prev
            v = H.T @ dz
            u = (dz - H @ dg) / (v @ dg)
            if stored == memory:
                H, stored = -eye, 0
            H, stored = H + torch.outer(u, v), stored + 1
        z_prev, g_prev = z, g
        z = z - H @ g
        zs.append(z)
    return torch.stack(zs)


@pytest.mark.parametrize("memory", [1, 2, 3, 20])
def test_broyden_iterates_match_a_dense_reference_that_restarts_when_full(memory):
    f, g = tanh_map()
    steps = 9  # memory 1, 2, 3 restart several times; 20 never fills
    fr, calls = recording(f)
    z0 = torch.randn(2, 4, generator=g, dtype=F64)
    il.fixed_point(fr, z0, solver=il.Broyden(history_size=memory, max_iter=steps + 1, **NEVER))
    got = torch.stack(calls)
    assert got.shape == (steps + 1, 2, 4)
    for i in range(2):
        expected = reference_broyden(f, z0[i], steps, memory)
        torch.testing.assert_close(got[:, i], expected, rtol=1e-9, atol=1e-12)


def near_singular_secant(delta):
    """``f(z) = z + L A z + b``, ``A = [[delta, -1], [1, delta]]``, ``L = 1e20``, ``b = (1, 0)``.

    From 0 the first step is ``dz = (1, 0)``, then ``dg = L (delta, 1)`` (exact for these
    values), so Broyden's denominator ``v . dg = -dz . dg = -L delta`` is ``delta`` times
    ``|v| |dg|`` (up to ``1 + delta^2``).
    """
    A = 1e20 * torch.tensor([[delta, -1.0], [1.0, delta]], dtype=F64)
    b = torch.tensor([1.0, 0.0], dtype=F64)
    return lambda z: z + z @ A.T + b


def test_broyden_breaks_down_below_the_rounding_level_of_its_denominator():
    # delta = 1e-17 < eps: the update is singular at rounding level, so the memory restarts
    # and the step is Picard's, z2 = f(z1) = (1002, 1e20); the sample ends as BREAKDOWN.
    f, calls = recording(near_singular_secant(1e-17))
    solver = il.Broyden(max_iter=3, divergence_ratio=None, **NEVER)
    r = il.fixed_point(f, torch.zeros(1, 2, dtype=F64), solver=solver)
    # (The fourth call measures the returned iterate, z0, the one with the smallest residual.)
    expected = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1002.0, 1e20], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(torch.cat(calls), expected, rtol=1e-15, atol=0)
    assert r.status.tolist() == [Status.BREAKDOWN] and r.z.tolist() == [[0.0, 0.0]]
    # delta = 1e-14 is above it: a regular secant step, as the dense reference takes.
    f = near_singular_secant(1e-14)
    fr, calls = recording(f)
    il.fixed_point(fr, torch.zeros(1, 2, dtype=F64), solver=solver)
    expected = reference_broyden(f, torch.zeros(2, dtype=F64), 2, 10)
    torch.testing.assert_close(torch.cat(calls[:3]), expected, rtol=1e-6, atol=0)
    assert not torch.equal(calls[2], f(calls[1]))


def test_a_broyden_breakdown_restarts_the_memory_with_the_picard_step():
    # A vanishing secant denominator at the second step: a breakdown, and the Picard step.
    solver = il.Broyden(history_size=2)
    f = near_singular_secant(1e-17)
    z = torch.zeros(1, 2, dtype=F64)
    state = solver.init(z)
    flags = []
    for k in range(3):
        fz = f(z)
        z_next, state, broke = solver.step(state, z, fz, k)
        if k == 1:
            assert state["count"].tolist() == [0]
            torch.testing.assert_close(z_next, fz, atol=1e-15, rtol=0)
        flags.append(broke.item())
        z = z_next
    assert flags[:2] == [False, True]  # no breakdown at the first step, one at the second


def test_broyden_recovers_from_a_breakdown_and_converges():
    # A piecewise map that stalls Broyden's secant (a zero step in one coordinate).
    f = lambda z: torch.stack([0.5 * z[:, 0] + 1, torch.zeros_like(z[:, 1])], 1)  # noqa: E731
    result = il.fixed_point(f, torch.zeros(2, 2), solver=il.Broyden(rtol=1e-6))
    assert result.converged.all()
    torch.testing.assert_close(result.z[:, 0], torch.full((2,), 2.0))


def test_broyden_memory_is_two_buffers_with_one_scratch_slot():
    # As documented: two (B, history_size + 1, n) buffers whatever max_iter is.
    state = il.Broyden(history_size=3, max_iter=100).init(torch.zeros(2, 5, dtype=F64))
    assert state["U"].shape == state["V"].shape == (2, 4, 5)
    assert state["U"].dtype == F64 and not state["U"].any() and not state["V"].any()


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class _FullMemoryBroyden(il.Broyden):
    """The former Broyden step: multiplies by every memory slot, masking the empty ones."""

    def step(self, state, z, fz, iteration):
        # Told that the memory may be full from the second step on.
        return super().step(state, z, fz, iteration and self.history_size)


@pytest.mark.parametrize("memory", [3, 40])
def test_broyden_multiplies_only_filled_slots_with_the_same_iterates(memory):
    cell = ConvCell().double()
    x = torch.randn(3, 3, 6, 6, dtype=F64)
    z0 = torch.zeros(3, 3, 6, 6, dtype=F64)
    options = {"max_iter": 30, "atol": 0.0, "rtol": 1e-13, "history_size": memory, "trace": True}
    sliced = il.fixed_point(cell, z0, x, solver=il.Broyden(**options))
    full = il.fixed_point(cell, z0, x, solver=_FullMemoryBroyden(**options))
    assert sliced.n_f_evals == full.n_f_evals
    assert torch.equal(sliced.status, full.status)
    torch.testing.assert_close(sliced.trace, full.trace, atol=1e-14, rtol=1e-10)
    torch.testing.assert_close(sliced.z, full.z, atol=1e-14, rtol=1e-12)
