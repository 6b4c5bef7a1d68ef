"""Forward solvers: tolerance, closed-form fixed points, acceleration, hyperparameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from zoo import Affine, ConvCell, TanhCell, scaled_map

import implicitlayers as il

SOLVERS = [
    il.Picard(max_iter=500, atol=0.0, rtol=1e-10),
    il.Anderson(max_iter=200, atol=0.0, rtol=1e-10),
    il.Broyden(max_iter=200, atol=0.0, rtol=1e-10),
]
IDS = ["picard", "anderson", "broyden"]


def true_residual(f, z, *inputs):
    return torch.linalg.vector_norm((f(z, *inputs) - z).flatten(1), dim=1)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_affine_fixed_point_matches_closed_form(solver):
    problem = Affine.make()
    x = torch.randn(4, 3, dtype=torch.float64)
    result = il.fixed_point(problem, torch.zeros(4, 6, dtype=torch.float64), x, solver=solver)
    assert result.converged.all()
    torch.testing.assert_close(result.z, problem.solution(x), atol=1e-9, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
@pytest.mark.parametrize("make", [TanhCell, ConvCell], ids=["tanh", "conv"])
def test_success_means_residual_within_tolerance(solver, make):
    cell = make().double() if make is ConvCell else make()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64) if make is ConvCell else torch.randn(5, 3)
    x = x.double()
    solver = dataclasses.replace(solver, atol=1e-9, rtol=1e-7)
    with torch.no_grad():
        result = il.fixed_point(
            cell,
            torch.zeros_like(x) if make is ConvCell else torch.zeros(5, 5, dtype=torch.float64),
            x,
            solver=solver,
        )
        residual = true_residual(cell, result.z, x)
        scale = torch.linalg.vector_norm(cell(result.z, x).flatten(1), dim=1)
    assert result.converged.all()
    # The reported residual is the true residual of the returned iterate.
    torch.testing.assert_close(result.residual, residual, rtol=1e-9, atol=1e-15)
    assert (residual <= solver.atol + solver.rtol * scale).all()


def test_accelerated_solvers_need_far_fewer_evaluations_at_contraction_095():
    problem = Affine.make(n=32, d=4, contraction=0.95, symmetric=True, seed=1)
    x = torch.randn(8, 4, dtype=torch.float64)
    z0 = torch.zeros(8, 32, dtype=torch.float64)
    evals = {}
    for name, cls in (("picard", il.Picard), ("anderson", il.Anderson), ("broyden", il.Broyden)):
        result = il.fixed_point(problem, z0, x, solver=cls(max_iter=1000, atol=0.0, rtol=1e-6))
        assert result.converged.all(), name
        evals[name] = result.n_f_evals
    assert evals["picard"] > 150  # 0.95^k < 1e-6 needs ~270 steps
    assert evals["anderson"] <= 0.25 * evals["picard"]
    assert evals["broyden"] <= 0.4 * evals["picard"]


def test_scale_aware_regularisation_beats_a_fixed_ridge():
    # torchdeq's Anderson adds a fixed 1e-4 to G G^T; once residuals are small that ridge swamps
    # the system. Ours scales with diag(G G^T) and keeps its acceleration to tight tolerances.
    problem = Affine.make(n=32, d=4, contraction=0.95, symmetric=True, seed=1)
    x = torch.randn(8, 4, dtype=torch.float64)
    z0 = torch.zeros(8, 32, dtype=torch.float64)
    ours = il.fixed_point(problem, z0, x, solver=il.Anderson(max_iter=1000, atol=0, rtol=1e-8))
    picard = il.fixed_point(problem, z0, x, solver=il.Picard(max_iter=1000, atol=0, rtol=1e-8))
    assert ours.converged.all() and picard.converged.all()
    assert ours.n_f_evals < 0.3 * picard.n_f_evals


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_batch_solves_like_each_sample_alone(solver):
    problem = Affine.make(n=8, d=3, contraction=0.9, symmetric=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    batch = il.fixed_point(problem, torch.zeros(5, 8, dtype=torch.float64), x, solver=solver)
    for i in range(5):
        alone = il.fixed_point(
            problem, torch.zeros(1, 8, dtype=torch.float64), x[i : i + 1], solver=solver
        )
        assert int(alone.n_steps[0]) == int(batch.n_steps[i])
        torch.testing.assert_close(alone.z[0], batch.z[i], atol=1e-12, rtol=0)


def test_converged_samples_are_frozen():
    rates = torch.tensor([0.1, 0.9], dtype=torch.float64)
    target = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    f = scaled_map(rates, target)
    solver = il.Picard(max_iter=500, atol=0.0, rtol=1e-8)
    result = il.fixed_point(f, torch.zeros(2, 2, dtype=torch.float64), solver=solver)
    fast_steps = int(result.n_steps[0])
    assert fast_steps < int(result.n_steps[1])
    # Sample 0 stopped changing at its convergence: a solve capped there gives the same value.
    capped = il.fixed_point(
        f,
        torch.zeros(2, 2, dtype=torch.float64),
        solver=dataclasses.replace(solver, max_iter=fast_steps),
    )
    assert torch.equal(capped.z[0], result.z[0])


@pytest.mark.parametrize("cls", [il.Picard, il.Anderson, il.Broyden], ids=IDS)
def test_independent_samples_costs_the_sum_of_iterations(cls):
    rates = torch.tensor([0.1, 0.5, 0.9, 0.97], dtype=torch.float64)
    target = torch.randn(4, 3, dtype=torch.float64)
    rows = []

    def f(z, r, tgt):  # per-sample contraction r towards tgt; every input batched
        rows.append(z.shape[0])
        return torch.tanh(tgt + r[:, None] * (z - tgt))

    solver = cls(max_iter=1000, atol=0.0, rtol=1e-8)
    z0 = torch.zeros(4, 3, dtype=torch.float64)
    dense = il.fixed_point(f, z0, rates, target, solver=solver)
    rows.clear()
    sparse = il.fixed_point(f, z0, rates, target, solver=solver, independent_samples=True)
    assert sparse.converged.all() and dense.converged.all()
    torch.testing.assert_close(sparse.z, dense.z, atol=1e-12, rtol=0)
    assert torch.equal(sparse.n_steps, dense.n_steps)
    # Each sample evaluated only while running, plus the whole batch once at the end (the
    # check that f does not couple the samples).
    assert sum(rows) == int(sparse.n_steps.sum()) + 4
    assert len(set(dense.n_steps.tolist())) > 1  # ... and they needed different budgets
    assert sum(rows) < 4 * dense.n_f_evals


def test_states_may_be_tuples_and_dicts():
    def f(z, x):
        a, b = z["a"], z["b"]
        return {"a": 0.5 * b + x, "b": (0.25 * a[:, :2],)[0].repeat(1, 1)}

    x = torch.randn(3, 2, dtype=torch.float64)
    z0 = {"a": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(3, 2, dtype=torch.float64)}
    result = il.fixed_point(f, z0, x, solver=il.Anderson(atol=0, rtol=1e-12, max_iter=100))
    # a = 0.5 b + x, b = 0.25 a  =>  a = x / (1 - 0.125)
    torch.testing.assert_close(result.z["a"], x / 0.875)
    torch.testing.assert_close(result.z["b"], 0.25 * x / 0.875)

    def g(z, x):
        return (0.5 * z[0] + x, z[0])  # second part should be (B, 3, 2)

    z0t = (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="returned"):
        il.fixed_point(g, z0t, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", [il.Picard, il.Anderson, il.Broyden], ids=IDS)
def test_dtype_is_preserved(dtype, cls):
    lin = torch.nn.Linear(4, 4).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, 2))
    x = torch.randn(2, 4, dtype=dtype)
    result = il.fixed_point(
        lambda z, x: lin(z) + x, torch.zeros(2, 4, dtype=dtype), x, solver=cls(rtol=1e-4)
    )
    assert result.z.dtype == dtype and result.residual.dtype == dtype
    assert result.converged.all()


def test_trace_records_every_iteration():
    solver = il.Picard(max_iter=30, atol=0.0, rtol=1e-6, trace=True)
    f = scaled_map(torch.tensor([0.5, 0.5]), torch.ones(2, 3))
    result = il.fixed_point(f, torch.zeros(2, 3), solver=solver)
    assert result.trace is not None and result.trace.shape == (result.n_f_evals, 2)
    ratios = result.trace[1:, 0] / result.trace[:-1, 0]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 0.5))
    assert il.fixed_point(f, torch.zeros(2, 3), solver=il.Picard()).trace is None


def test_check_every_delays_only_the_exit():
    f = scaled_map(
        torch.tensor([0.3, 0.6], dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    )
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    every = il.fixed_point(f, z0, solver=il.Anderson(atol=0, rtol=1e-9, max_iter=100))
    lazy = il.fixed_point(f, z0, solver=il.Anderson(atol=0, rtol=1e-9, max_iter=100, check_every=7))
    assert torch.equal(lazy.n_steps, every.n_steps)
    assert torch.equal(lazy.z, every.z)
    assert lazy.n_f_evals % 7 == 0 and lazy.n_f_evals >= every.n_f_evals


def test_empty_batch():
    result = il.fixed_point(lambda z: 0.5 * z, torch.zeros(0, 3))
    assert result.z.shape == (0, 3) and result.n_f_evals == 0 and result.status.shape == (0,)


def test_autocast_bookkeeping_stays_float32():
    lin = torch.nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, 2))
    x = torch.randn(4, 16)
    seen = []

    def f(z, x):
        out = lin(z)
        seen.append(out.dtype)
        return out + x

    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = il.fixed_point(f, torch.zeros(4, 16), x, solver=il.Anderson(rtol=1e-2))
    assert seen[0] == torch.bfloat16  # f ran under autocast
    assert result.z.dtype == torch.float32 and result.residual.dtype == torch.float32
    assert result.converged.all()


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class _FullMemoryBroyden(il.Broyden):
    """The former Broyden step: multiplies by every memory slot, masking the empty ones."""

    def step(self, state, z, fz, iteration):
        # Told that the memory may be full from the second step on.
        return super().step(state, z, fz, iteration and self.history_size)


@pytest.mark.parametrize("memory", [3, 40])
def test_broyden_multiplies_only_filled_slots_with_the_same_iterates(memory):
    cell = ConvCell().double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    z0 = torch.zeros(3, 3, 6, 6, dtype=torch.float64)
    options = {"max_iter": 30, "atol": 0.0, "rtol": 1e-13, "history_size": memory, "trace": True}
    sliced = il.fixed_point(cell, z0, x, solver=il.Broyden(**options))
    full = il.fixed_point(cell, z0, x, solver=_FullMemoryBroyden(**options))
    assert sliced.n_f_evals == full.n_f_evals
    assert torch.equal(sliced.status, full.status)
    torch.testing.assert_close(sliced.trace, full.trace, atol=1e-14, rtol=1e-10)
    torch.testing.assert_close(sliced.z, full.z, atol=1e-14, rtol=1e-12)


def _mixed_batch_map(z, rates, target):
    """Per-sample behaviour: rates < 1 converge, 1.5 has no fixed point, 0.99 turns NaN."""
    out = target + rates[:, None] * (z - target)
    out = torch.where(rates[:, None] == 1.5, z + 1 + z**2, out)
    bad = (z.abs().sum(dim=1) > 1.5) & (rates == 0.99)
    return torch.where(bad[:, None], float("nan"), out)


@pytest.mark.parametrize("cls", [il.Picard, il.Anderson, il.Broyden], ids=IDS)
@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("check_every", [1, 3])
def test_loop_without_host_reads_matches_the_host_path(cls, independent, check_every):
    rates = torch.tensor([0.1, 0.5, 0.9, 1.5, 0.99], dtype=torch.float64)
    target = torch.ones(5, 3, dtype=torch.float64)
    solver = cls(
        max_iter=25,
        atol=0.0,
        rtol=1e-9,
        check_every=check_every,
        divergence_ratio=20.0,
        on_nonfinite="ignore",
        trace=True,
    )
    z0 = torch.zeros(5, 3, dtype=torch.float64)

    def solve(host_reads):
        return il.fixed_point(
            _mixed_batch_map,
            z0,
            rates,
            target,
            solver=solver,
            independent_samples=independent,
            host_reads=host_reads,
        )

    host = solve(None)
    masked = solve(False)  # the path a GPU takes
    assert len(set(host.status.tolist())) >= 3
    assert torch.equal(host.status, masked.status)
    assert torch.equal(host.n_steps, masked.n_steps)
    assert host.n_f_evals == masked.n_f_evals
    assert torch.equal(host.z, masked.z)
    assert torch.equal(host.residual, masked.residual)
    torch.testing.assert_close(host.trace, masked.trace, atol=0, rtol=0, equal_nan=True)
    assert torch.isfinite(host.z).all()


def test_result_never_aliases_z0():
    z0 = torch.ones(2, 3)
    result = il.fixed_point(lambda z: 0.5 * z, z0, solver=il.Picard(max_iter=1))
    result.z.add_(1.0)
    assert torch.equal(z0, torch.ones(2, 3))


@pytest.mark.parametrize("cls", [il.Picard, il.Anderson, il.Broyden], ids=IDS)
def test_independent_samples_matches_the_dense_loop_on_every_output(cls):
    rates = torch.tensor([0.1, 0.5, 0.9, 1.5, 0.99, 0.97], dtype=torch.float64)
    target = torch.ones(6, 3, dtype=torch.float64)
    solver = cls(max_iter=25, atol=0.0, rtol=1e-9, divergence_ratio=20.0, trace=True)
    solver = dataclasses.replace(solver, on_nonfinite="ignore")
    z0 = torch.zeros(6, 3, dtype=torch.float64)
    dense = il.fixed_point(_mixed_batch_map, z0, rates, target, solver=solver)
    sparse = il.fixed_point(
        _mixed_batch_map, z0, rates, target, solver=solver, independent_samples=True
    )
    assert torch.equal(sparse.status, dense.status)
    assert torch.equal(sparse.n_steps, dense.n_steps)
    # The diverged sample returns an earlier iterate, so the dense path (which cannot know
    # that f treats samples independently) evaluates f once more at the returned batch; the
    # compacted path evaluates it there too, to check that f does not couple the samples.
    assert dense.n_f_evals == sparse.n_f_evals
    torch.testing.assert_close(sparse.z, dense.z, atol=1e-12, rtol=0)
    torch.testing.assert_close(sparse.rate, dense.rate, atol=1e-12, rtol=0, equal_nan=True)
    torch.testing.assert_close(sparse.residual, dense.residual, atol=1e-12, rtol=0)
    torch.testing.assert_close(sparse.trace, dense.trace, atol=1e-12, rtol=0, equal_nan=True)
    assert sparse.z.data_ptr() != z0.data_ptr()


@pytest.mark.parametrize("mixing", [1.0, 0.5])
def test_anderson_breakdown_takes_the_damped_picard_step(mixing):
    solver = il.Anderson(history_size=2, regularization=0.0, mixing=mixing)
    z = torch.randn(3, 4, dtype=torch.float64)
    fz = torch.randn(3, 4, dtype=torch.float64)
    _, state, breakdown = solver.step(solver.init(z), z, fz, 0)
    assert not breakdown.any()
    # The same pair again: the Gram system is singular.
    z_next, state, breakdown = solver.step(state, z, fz, 1)
    # The history restarts: the system is that of an empty history again.
    assert breakdown.all() and torch.equal(state["system"], solver.init(z)["system"])
    torch.testing.assert_close(z_next, torch.lerp(z, fz, mixing), atol=1e-15, rtol=0)


# norm="rms": with f(z) = 0.5 z + x from z0 = 0, Picard gives z_k = 2x(1 - 2^-k), so
# f(z_k) - z_k = 2^-k x and the residual at iteration k is 2^-k ||x|| (exactly, in binary
# floating point, for x = c * ones with c a small integer). With rtol = 0 a sample stops at the
# first k with 2^-k ||x|| <= atol, after k + 1 evaluations: for c * ones(100), ||x||_2 = 10 c
# and the rms norm is c.
HALVING = lambda z, x: 0.5 * z + x  # noqa: E731


def test_rms_norm_stops_at_the_closed_form_iteration():
    x = torch.tensor([3.0, 48.0], dtype=torch.float64)[:, None].expand(2, 100)
    z0 = torch.zeros(2, 100, dtype=torch.float64)
    common = {"max_iter": 40, "atol": 1e-3, "rtol": 0.0, "trace": True}
    rms = il.fixed_point(HALVING, z0, x, solver=il.Picard(norm="rms", **common))
    l2 = il.fixed_point(HALVING, z0, x, solver=il.Picard(**common))
    # rms: 3 * 2^-k <= 1e-3 first at k = 12 (3/4096); 48 * 2^-k at k = 16 (48/65536).
    assert rms.n_steps.tolist() == [13, 17] and rms.converged.all()
    assert rms.residual.tolist() == [3 / 4096, 48 / 65536]
    # l2: 30 * 2^-k <= 1e-3 first at k = 15; 480 * 2^-k at k = 19.
    assert l2.n_steps.tolist() == [16, 20] and l2.converged.all()
    assert l2.residual.tolist() == [30 / 32768, 480 / 524288]
    # The trace is in the solver's norm too: c * 2^-k while running, then its last value.
    k = torch.arange(17, dtype=torch.float64)
    halvings = torch.minimum(k, torch.tensor([12.0, 16.0], dtype=torch.float64)[:, None]).T
    assert torch.equal(rms.trace, torch.tensor([3.0, 48.0], dtype=torch.float64) * 0.5**halvings)
    # The rate is a ratio of norms: 1/2 under either.
    assert rms.rate.tolist() == [0.5, 0.5] and l2.rate.tolist() == [0.5, 0.5]
    # error ||z - 2x|| = 2 * residual, in the solver's norm: residual / (1 - 1/2).
    assert torch.equal(rms.error_estimate, 2 * rms.residual)
    error = torch.linalg.vector_norm(rms.z - 2 * x, dim=1) / 10
    torch.testing.assert_close(rms.error_estimate, error, rtol=1e-15, atol=0)


def test_rms_residual_is_the_l2_residual_over_sqrt_n():
    x = torch.randn(4, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z0 = torch.zeros(4, 100, dtype=torch.float64)
    rms = il.fixed_point(HALVING, z0, x, solver=il.Picard(norm="rms", atol=1e-4, trace=True))
    l2 = il.fixed_point(HALVING, z0, x, solver=il.Picard(atol=1e-3, trace=True))
    assert torch.equal(rms.n_steps, l2.n_steps) and torch.equal(rms.z, l2.z)
    torch.testing.assert_close(rms.residual, l2.residual / 10, rtol=1e-15, atol=0)
    torch.testing.assert_close(rms.trace, l2.trace / 10, rtol=1e-15, atol=0)
    torch.testing.assert_close(rms.error_estimate, l2.error_estimate / 10, rtol=1e-15, atol=0)
    assert torch.equal(rms.rate, l2.rate)
    # And the residual is the measured rms of f(z) - z at the returned iterate.
    direct = torch.linalg.vector_norm(HALVING(rms.z, x) - rms.z, dim=1) / 10
    torch.testing.assert_close(rms.residual, direct, rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls", [il.Picard, il.Anderson, il.Broyden], ids=IDS)
@pytest.mark.parametrize(
    "path",
    [{}, {"host_reads": False}, {"independent_samples": True}],
    ids=["host", "sync-free", "independent"],
)
def test_rms_with_atol_a_stops_where_l2_with_atol_a_sqrt_n_stops(cls, path):
    # A structured state of n = 3 + 2 * 4 = 11 features (sqrt(11) is irrational), samples
    # that converge, diverge and turn NaN, and an atol that decides when they stop.
    rates = torch.tensor([0.1, 0.5, 0.9, 1.5, 0.99], dtype=torch.float64)
    target = torch.ones(5, 11, dtype=torch.float64)

    def f(z, rates, target):
        flat = torch.cat((z[0], z[1].flatten(1)), dim=1)
        out = _mixed_batch_map(flat, rates, target)
        return (out[:, :3], out[:, 3:].reshape(-1, 2, 4))

    z0 = (torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 2, 4, dtype=torch.float64))
    common = {"max_iter": 150, "rtol": 1e-9, "divergence_ratio": 20.0, "check_every": 3}
    common |= {"on_nonfinite": "ignore", "trace": True}
    a = 1e-5
    rms = il.fixed_point(f, z0, rates, target, solver=cls(norm="rms", atol=a, **common), **path)
    l2 = il.fixed_point(f, z0, rates, target, solver=cls(atol=a * 11**0.5, **common), **path)
    assert len(set(rms.status.tolist())) >= 3
    assert torch.equal(rms.status, l2.status) and torch.equal(rms.n_steps, l2.n_steps)
    assert rms.n_f_evals == l2.n_f_evals
    assert torch.equal(rms.z[0], l2.z[0]) and torch.equal(rms.z[1], l2.z[1])
    assert torch.equal(rms.residual, l2.residual / 11**0.5)
    torch.testing.assert_close(rms.trace, l2.trace / 11**0.5, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(rms.rate.isnan(), l2.rate.isnan())
    torch.testing.assert_close(rms.rate, l2.rate, rtol=0, atol=0, equal_nan=True)
    if cls is il.Picard:  # (Anderson and Broyden solve these affine maps in a few steps)
        # With a = 1e-5 as an l2 atol the converging samples stop later.
        later = il.fixed_point(f, z0, rates, target, solver=cls(atol=a, **common), **path)
        assert (later.n_steps[:3] > rms.n_steps[:3]).all()


def test_norm_must_be_l2_or_rms():
    with pytest.raises(ValueError, match=r"norm must be one of 'l2', 'rms', got 'L2'"):
        il.Picard(norm="L2")
    assert repr(il.Anderson(norm="rms")) == "Anderson(norm='rms')"
    assert il.Picard().norm == "l2"
