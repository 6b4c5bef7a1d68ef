"""The driver loop's one stopping rule, on every path.

A row stops when its residual meets its bound (``SUCCESS``), is not finite (``NONFINITE``) or
exceeds ``divergence_ratio`` times its first residual (``DIVERGED``); a stopped row is frozen
and returns its best iterate, a frozen row that no longer passes runs again, and the end of a
solve names ``MAX_ITER``, ``UNSETTLED`` and ``BREAKDOWN``. Every path of the registry runs this
one rule: the tests of the rule run on each, and only the row selection differs (the
running-rows path evaluates the whole returned batch once more, to check that ``f`` treats
the samples independently). Values are closed forms: a wrong bound, a status off by one
iteration or an iterate from the wrong step fails them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry import ALL_ROW_PARAMS, NEVER, PATH_PARAMS, PATHS, SOLVER_PARAMS, SOLVER_ROWS
from torch import Tensor, nn
from zoo import (
    batch_mean,
    follower,
    half_plus_one,
    mixed_batch_map,
    non_monotone,
    recording,
    scaled_map,
)

import implicitlayers as il
from implicitlayers import Status

F64 = torch.float64


def solve(f, z0, *inputs, solver, path, **kwargs):
    return il.fixed_point(f, z0, *inputs, solver=solver, **path.options, **kwargs)


# --- The stopping test ----------------------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_the_relative_bound_is_on_f_of_z_not_on_z(path):
    # From z0 = 10: z_k = 2 + 8 / 2**k, f(z_k) = 2 + 4 / 2**k, residual 4 / 2**k. With
    # rtol = 0.6 the bound 0.6 |f(z)| first holds at k = 1 (2 <= 2.4; at k = 0, 4 > 3.6),
    # while a bound 0.6 |z| would already hold at k = 0 (4 <= 6).
    f, calls = recording(half_plus_one)
    solver = il.Picard(rtol=0.6, atol=0)
    r = solve(f, torch.full((1, 1), 10.0, dtype=F64), solver=solver, path=path)
    assert r.n_steps.tolist() == [2] and r.n_f_evals == 2 + path.running_rows
    assert [c.item() for c in calls[:2]] == [10.0, 6.0]
    assert r.z.item() == 6.0 and r.residual.item() == 2.0
    assert r.status.tolist() == [Status.SUCCESS]


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_a_residual_equal_to_the_bound_converges(path):
    # From 0: residual 1 at z0 = 0 with atol = 1 (exact in binary): converged at once, and
    # likewise for rtol alone (|f(0)| = 1).
    for atol, rtol in ((1.0, 0.0), (0.0, 1.0)):
        solver = il.Picard(atol=atol, rtol=rtol)
        r = solve(half_plus_one, torch.zeros(1, 1, dtype=F64), solver=solver, path=path)
        assert r.n_steps.tolist() == [1] and r.status.tolist() == [Status.SUCCESS]
        assert r.z.item() == 0.0 and r.residual.item() == 1.0


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_atol_and_rtol_add_up(path):
    # From 0: residuals 1, 1/2, 1/4, 1/8 at z = 0, 1, 3/2, 7/4 with |f(z)| = 1, 3/2, 7/4, 15/8.
    # atol = 1/8, rtol = 1/16: bounds 3/16, 7/32, 15/64, 31/128: first met at z = 7/4
    # (1/8 <= 31/128); either term alone is first met later.
    solver = il.Picard(atol=0.125, rtol=0.0625, max_iter=50)
    r = solve(half_plus_one, torch.zeros(1, 1, dtype=F64), solver=solver, path=path)
    assert r.n_steps.tolist() == [4] and r.z.item() == 1.75


# norm="rms": with f(z) = 0.5 z + x from z0 = 0, Picard gives z_k = 2x(1 - 2^-k), so
# f(z_k) - z_k = 2^-k x and the residual at iteration k is 2^-k ||x|| (exactly, in binary
# floating point, for x = c * ones with c a small integer). With rtol = 0 a sample stops at the
# first k with 2^-k ||x|| <= atol, after k + 1 evaluations: for c * ones(100), ||x||_2 = 10 c
# and the rms norm is c.
def halving(z, x):
    return 0.5 * z + x


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_rms_norm_stops_at_the_closed_form_iteration(path):
    x = torch.tensor([3.0, 48.0], dtype=F64)[:, None].expand(2, 100)
    z0 = torch.zeros(2, 100, dtype=F64)
    common = {"max_iter": 40, "atol": 1e-3, "rtol": 0.0, "trace": True}
    rms = solve(halving, z0, x, solver=il.Picard(norm="rms", **common), path=path)
    l2 = solve(halving, z0, x, solver=il.Picard(**common), path=path)
    # rms: 3 * 2^-k <= 1e-3 first at k = 12 (3/4096); 48 * 2^-k at k = 16 (48/65536).
    assert rms.n_steps.tolist() == [13, 17] and rms.converged.all()
    assert rms.residual.tolist() == [3 / 4096, 48 / 65536]
    # l2: 30 * 2^-k <= 1e-3 first at k = 15; 480 * 2^-k at k = 19.
    assert l2.n_steps.tolist() == [16, 20] and l2.converged.all()
    assert l2.residual.tolist() == [30 / 32768, 480 / 524288]
    # The trace is in the solver's norm too: c * 2^-k while running, then its last value.
    k = torch.arange(17, dtype=F64)
    halvings = torch.minimum(k, torch.tensor([12.0, 16.0], dtype=F64)[:, None]).T
    assert torch.equal(rms.trace, torch.tensor([3.0, 48.0], dtype=F64) * 0.5**halvings)
    # The rate is a ratio of norms: 1/2 under either.
    assert rms.rate.tolist() == [0.5, 0.5] and l2.rate.tolist() == [0.5, 0.5]
    # error ||z - 2x|| = 2 * residual, in the solver's norm: residual / (1 - 1/2).
    assert torch.equal(rms.error_estimate, 2 * rms.residual)
    error = torch.linalg.vector_norm(rms.z - 2 * x, dim=1) / 10
    torch.testing.assert_close(rms.error_estimate, error, rtol=1e-15, atol=0)


def test_rms_residual_is_the_l2_residual_over_sqrt_n():
    x = torch.randn(4, 100, dtype=F64, generator=torch.Generator().manual_seed(1))
    z0 = torch.zeros(4, 100, dtype=F64)
    rms = il.fixed_point(halving, z0, x, solver=il.Picard(norm="rms", atol=1e-4, trace=True))
    l2 = il.fixed_point(halving, z0, x, solver=il.Picard(atol=1e-3, trace=True))
    assert torch.equal(rms.n_steps, l2.n_steps) and torch.equal(rms.z, l2.z)
    torch.testing.assert_close(rms.residual, l2.residual / 10, rtol=1e-15, atol=0)
    torch.testing.assert_close(rms.trace, l2.trace / 10, rtol=1e-15, atol=0)
    torch.testing.assert_close(rms.error_estimate, l2.error_estimate / 10, rtol=1e-15, atol=0)
    assert torch.equal(rms.rate, l2.rate)
    # And the residual is the measured rms of f(z) - z at the returned iterate.
    direct = torch.linalg.vector_norm(halving(rms.z, x) - rms.z, dim=1) / 10
    torch.testing.assert_close(rms.residual, direct, rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_rms_with_atol_a_stops_where_l2_with_atol_a_sqrt_n_stops(solver, path):
    # A structured state of n = 3 + 2 * 4 = 11 features (sqrt(11) is irrational), samples
    # that converge, diverge and turn NaN, and an atol that decides when they stop.
    rates = torch.tensor([0.1, 0.5, 0.9, 1.5, 0.99], dtype=F64)
    target = torch.ones(5, 11, dtype=F64)

    def f(z, rates, target):
        flat = torch.cat((z[0], z[1].flatten(1)), dim=1)
        out = mixed_batch_map(flat, rates, target)
        return (out[:, :3], out[:, 3:].reshape(-1, 2, 4))

    z0 = (torch.zeros(5, 3, dtype=F64), torch.zeros(5, 2, 4, dtype=F64))
    common = {"max_iter": 400, "rtol": 1e-9, "divergence_ratio": 20.0, "check_every": 3}
    common |= {"on_nonfinite": "ignore", "trace": True}
    a = 1e-5
    rms = solve(f, z0, rates, target, solver=solver.make(norm="rms", atol=a, **common), path=path)
    l2 = solve(f, z0, rates, target, solver=solver.make(atol=a * 11**0.5, **common), path=path)
    assert len(set(rms.status.tolist())) >= 3
    assert torch.equal(rms.status, l2.status) and torch.equal(rms.n_steps, l2.n_steps)
    assert rms.n_f_evals == l2.n_f_evals
    assert torch.equal(rms.z[0], l2.z[0]) and torch.equal(rms.z[1], l2.z[1])
    assert torch.equal(rms.residual, l2.residual / 11**0.5)
    torch.testing.assert_close(rms.trace, l2.trace / 11**0.5, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(rms.rate.isnan(), l2.rate.isnan())
    torch.testing.assert_close(rms.rate, l2.rate, rtol=0, atol=0, equal_nan=True)
    if not solver.accelerated:  # (accelerated solvers solve these affine maps in a few steps)
        # With a = 1e-5 as an l2 atol the converging samples stop later.
        later = solve(f, z0, rates, target, solver=solver.make(atol=a, **common), path=path)
        assert (later.n_steps[:3] > rms.n_steps[:3]).all()


# --- Statuses and counts ----------------------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_statuses_and_counts_for_a_batch_that_stops_at_different_steps(path):
    # Sample 0 starts at its fixed point (stops at once, no step: rate NaN); sample 1 runs
    # from 0 with residuals 2^-k until 2^-k <= 2^-3 (tolerance atol = 1/8): 4 evaluations.
    z0 = torch.tensor([[2.0], [0.0]], dtype=F64)
    r = solve(half_plus_one, z0, solver=il.Picard(atol=0.125, rtol=0.0), path=path)
    assert r.status.dtype == torch.long and r.n_steps.dtype == torch.long
    assert r.status.tolist() == [Status.SUCCESS] * 2 and r.n_steps.tolist() == [1, 4]
    assert r.z.tolist() == [[2.0], [1.75]] and r.residual.tolist() == [0.0, 0.125]
    assert torch.isnan(r.rate[0]) and r.rate[1].item() == 0.5
    # All rows: the returned batch is the last one evaluated; running rows: plus one
    # evaluation of the whole returned batch (the check that f does not couple the samples).
    assert r.n_f_evals == 4 + path.running_rows


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_a_sample_that_stops_at_its_first_evaluation_has_no_rate(path):
    # Sample 0 starts at its fixed point: it stops at its first evaluation, takes no step,
    # so no secant rate (NaN), and its error estimate is 0 (the residual is 0), not NaN.
    # Sample 1 starts off its point by a residual of 1e-9, within the tolerance: no step,
    # no rate, so its estimate is NaN (unknown), never a made-up number.
    z0 = torch.tensor([[2.0], [2.0 - 2e-9]], dtype=F64)
    r = solve(half_plus_one, z0, solver=il.Picard(atol=1e-8, rtol=0.0), path=path)
    assert r.converged.all() and r.n_steps.tolist() == [1, 1]
    assert r.n_f_evals == 1 + path.running_rows
    assert r.rate.dtype == F64 and torch.isnan(r.rate).all()
    assert r.residual.dtype == F64 and r.residual[0].item() == 0.0
    estimate = r.error_estimate
    assert estimate[0].item() == 0.0 and torch.isnan(estimate[1])


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_divergence_is_a_residual_strictly_above_the_ratio(path):
    # f(z) = 3z + 1 from 0: residuals 1, 3, 9, 27 (exact). With divergence_ratio 9 the third
    # residual equals the bound (nine times the first), so only the fourth diverges.
    solver = il.Picard(divergence_ratio=9.0)
    r = solve(lambda z: 3 * z + 1, torch.zeros(1, 1, dtype=F64), solver=solver, path=path)
    assert r.status.tolist() == [Status.DIVERGED] and r.n_steps.tolist() == [4]
    assert r.z.item() == 0.0 and r.residual.item() == 1.0  # the best iterate is the first


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_a_non_contractive_map_diverges_early_and_returns_a_finite_iterate(path):
    solver = il.Picard(max_iter=100)
    r = solve(lambda z: 2 * z + 1, torch.zeros(3, 2), solver=solver, path=path)
    assert (r.status == Status.DIVERGED).all()
    assert r.n_f_evals < 30  # stopped early, not at max_iter
    assert torch.isfinite(r.z).all()


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_a_nan_sample_is_nonfinite_and_raises_with_the_result_by_default(path):
    def f(z, x):
        return torch.where(x > 0, float("nan"), 0.5 * z + x)

    x = torch.tensor([[1.0], [-1.0]])
    with pytest.raises(il.ConvergenceError, match="NaN") as info:
        solve(f, torch.zeros(2, 1), x, solver=il.Picard(), path=path)
    result = info.value.result
    assert result.statuses() == [Status.NONFINITE, Status.SUCCESS]
    assert torch.isfinite(result.z).all()  # best finite iterate, never silent NaN
    ignored = solve(f, torch.zeros(2, 1), x, solver=il.Picard(on_nonfinite="ignore"), path=path)
    assert ignored.status.tolist() == [Status.NONFINITE, Status.SUCCESS]


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_breakdown_is_reported_only_for_samples_that_end_unconverged(path):
    # Sample 0: f(z) = z + 1 (no fixed point, Anderson's system singular: BREAKDOWN). Sample 1:
    # a piecewise map whose Broyden secant breaks down, then converges.
    def f(z, no_fixed_point):
        piecewise = torch.stack([0.5 * z[:, 0] + 1, torch.zeros_like(z[:, 1])], 1)
        return torch.where(no_fixed_point, z + 1, piecewise)

    which = torch.tensor([[True], [False]])  # an input, so the running rows select its rows
    solver = il.Anderson(max_iter=20, regularization=0.0, divergence_ratio=None, rtol=1e-6)
    r = solve(f, torch.zeros(2, 2), which, solver=solver, path=path)
    assert r.status.tolist()[0] == Status.BREAKDOWN
    # Also when every breakdown happens while the other sample is frozen (it starts at (2, 0),
    # its fixed point, and stops at once).
    z0 = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    r = solve(f, z0, which, solver=solver, path=path)
    assert r.status.tolist() == [Status.BREAKDOWN, Status.SUCCESS] and r.n_steps[1] == 1
    r = solve(f, torch.zeros(2, 2), which, solver=il.Broyden(rtol=1e-6), path=path)
    assert r.status.tolist()[1] == Status.SUCCESS


def test_a_plug_in_solver_without_breakdown_flags_ends_as_max_iter():
    class Halve(il.AbstractSolver):
        def init(self, z):
            return {}

        def step(self, state, z, fz, iteration):
            return 0.5 * (z + fz), state, None

    result = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 1), solver=Halve(max_iter=5))
    assert (result.status == int(Status.MAX_ITER)).all()


# --- Freezing and revival ---------------------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_converged_samples_are_frozen(path):
    rates = torch.tensor([0.1, 0.9], dtype=F64)
    target = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)

    def f(z, rates, target):  # per-sample contraction towards target
        return scaled_map(rates, target)(z)

    solver = il.Picard(max_iter=500, atol=0.0, rtol=1e-8)
    z0 = torch.zeros(2, 2, dtype=F64)
    result = solve(f, z0, rates, target, solver=solver, path=path)
    fast_steps = int(result.n_steps[0])
    assert fast_steps < int(result.n_steps[1])
    # Sample 0 stopped changing at its convergence: a solve capped there gives the same value.
    capped = dataclasses.replace(solver, max_iter=fast_steps)
    capped_result = solve(f, z0, rates, target, solver=capped, path=path)
    assert torch.equal(capped_result.z[0], result.z[0])


@pytest.mark.parametrize("path", ALL_ROW_PARAMS)
def test_a_frozen_sample_that_no_longer_passes_runs_again(path):
    # The follower converges at once (residual 5e-7 <= atol), then fails the test as sample 1
    # moves (by 0.002 / 2^k), without diverging (0.002 < 1e4 * 5e-7) and while no other
    # sample stops: it must run again at once, and both end within tolerance of the batch
    # returned.
    solver = il.Picard(atol=1e-6, rtol=0.0, max_iter=100)
    fr, calls = recording(follower)
    r = solve(fr, torch.zeros(2, 1, dtype=F64), solver=solver, path=path)
    assert [c[0].item() for c in calls[:4]] == [0.0, 0.0, 0.002 + 5e-7, 0.003 + 5e-7]
    # Sample 1 stops at k = 11 (0.002 / 2^11 <= 1e-6), sample 0 one step later.
    assert r.n_steps.tolist() == [13, 12] and r.n_f_evals == 13
    assert r.status.tolist() == [Status.SUCCESS] * 2
    true = (follower(r.z) - r.z).abs().flatten()
    assert (true <= 1e-6).all() and torch.equal(r.residual, true)


@pytest.mark.parametrize("path", ALL_ROW_PARAMS)
def test_a_revived_sample_that_runs_out_keeps_its_best_iterate(path):
    # The follower with 5 evaluations: sample 0 ends unconverged, and its best is still its
    # first iterate (residual 5e-7), not a later one; its residual and status are measured at
    # the returned batch: it met the tolerance once and sample 1 moved it out (UNSETTLED).
    solver = il.Picard(atol=1e-6, rtol=0.0, max_iter=5)
    r = solve(follower, torch.zeros(2, 1, dtype=F64), solver=solver, path=path)
    assert r.z[0].item() == 0.0
    assert r.status.tolist() == [Status.UNSETTLED, Status.MAX_ITER]
    torch.testing.assert_close(r.residual, (follower(r.z) - r.z).abs().flatten(), rtol=0, atol=0)


@pytest.mark.parametrize("path", ALL_ROW_PARAMS)
def test_a_frozen_sample_keeps_the_rate_it_stopped_with_while_a_coupled_batch_moves(path):
    # f couples the samples weakly (a mean): sample 0 converges in a few steps and is frozen
    # while sample 1 runs on; its f(z) moves with the batch but its z does not, and its rate
    # stays the secant rate measured when it stopped (about 0.5), never num / 0 = inf.
    x = torch.tensor([[1.0], [1e6]], dtype=F64)

    def f(z):
        return 0.5 * z + x + 1e-9 * z.mean()

    solver = il.Picard(max_iter=100, rtol=0.0, atol=1e-6)
    result = solve(f, torch.zeros(2, 1, dtype=F64), solver=solver, path=path)
    assert result.status.tolist() == [Status.SUCCESS] * 2
    assert result.n_steps[0] < result.n_steps[1]
    assert torch.allclose(result.rate, torch.full((2,), 0.5, dtype=F64), atol=1e-2)


@pytest.mark.parametrize("path", ALL_ROW_PARAMS)
def test_a_sample_the_others_moved_out_of_tolerance_is_unsettled(path):
    # Row 1 improves once (0 -> 1, residual 1 then 0.5), then cycles between 1 and 1.5 at
    # residual 0.5: it uses its whole budget and returns z = 1. Row 0 follows it
    # (f = 1e-3 z_1): it meets the tolerance at z = 0 against z_1 = 0, is reopened as row 1
    # moves and never meets it again, so it returns z = 0; at the returned batch (0, 1) it
    # fails, after fewer than max_iter steps: f couples the samples. Its message is not
    # Picard's advice to raise max_iter alone.
    def coupled(z):
        follow = 1e-3 * z[1:]
        cycle = torch.where(z[1:] < 1.25, 0.5 * z[1:] + 1, 2.5 - z[1:])
        return torch.cat((follow, cycle), dim=0)

    solver = il.Picard(max_iter=10, on_unconverged="raise")
    with pytest.raises(il.ConvergenceError) as caught:
        solve(coupled, torch.zeros(2, 1, dtype=F64), solver=solver, path=path)
    result, message = caught.value.result, str(caught.value)
    assert result.z.squeeze(1).tolist() == [0.0, 1.0]
    assert result.status.tolist() == [Status.UNSETTLED, Status.MAX_ITER]
    assert result.n_steps.tolist() == [10, 10]
    assert f"MAX_ITER: {Status.MAX_ITER.message}"[:60] not in message  # Picard's own advice
    assert "MAX_ITER: used all max_iter=10 evaluations" in message
    assert f"UNSETTLED: {Status.UNSETTLED.message}" in message
    assert "f couples the samples" in result.summary()


# --- Best iterates ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_of_equal_residuals_the_earliest_iterate_is_returned(path):
    # f(z) = -z from 1: the iterates alternate 1, -1, 1, -1, all with residual 2. Every path
    # evaluates the returned batch once more: all rows because it was never evaluated,
    # running rows to check that f does not couple the samples.
    solver = il.Picard(max_iter=4, divergence_ratio=None)
    r = solve(lambda z: -z, torch.ones(1, 1, dtype=F64), solver=solver, path=path)
    assert r.z.tolist() == [[1.0]] and r.residual.tolist() == [2.0]
    assert r.status.tolist() == [Status.MAX_ITER] and r.n_steps.tolist() == [4]
    assert r.n_f_evals == 5


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_the_returned_batch_is_measured_in_the_state_dtype(path):
    # Equal residuals: the earliest iterate is returned and measured again, with f's float64
    # output cast to the float32 state first.
    solver = il.Picard(max_iter=3)
    r = solve(lambda z: -z.double(), torch.ones(1, 1), solver=solver, path=path)
    assert r.n_f_evals == 4 and r.z.tolist() == [[1.0]]
    assert r.residual.dtype == torch.float32 and r.residual.tolist() == [2.0]


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_a_solve_that_ends_on_a_worse_iterate_returns_the_best_and_measures_it(path):
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64)
    z0 = torch.zeros_like(x)
    result = solve(non_monotone, z0, x, solver=il.Picard(max_iter=3, trace=True), path=path)
    # Residuals rise from the first iterate on, so z_0 is returned, and measured once more.
    assert torch.equal(result.z, z0)
    assert result.n_f_evals == 4
    fz = non_monotone(z0, x)
    torch.testing.assert_close(result.residual, torch.linalg.vector_norm(fz - z0, dim=1))


@pytest.mark.parametrize("path", ALL_ROW_PARAMS)
def test_a_sample_that_returns_an_earlier_iterate_is_measured_at_the_returned_batch(path):
    # Sample 1 diverges and returns its best (first) iterate; sample 0 couples to it, so
    # sample 0's convergence next to the diverging iterate does not hold at the returned batch
    # (UNSETTLED: it met the tolerance, and the batch returned moved it out).
    def f(z):
        return torch.cat((0.5 * z[:1] + 0.1 * z[1:], 3.0 * z[1:] + 1.0))

    solver = il.Picard(max_iter=40, divergence_ratio=1e3)
    result = solve(f, torch.zeros(2, 1, dtype=F64), solver=solver, path=path)
    assert result.statuses() == [Status.UNSETTLED, Status.DIVERGED]
    fz = f(result.z)
    res = torch.linalg.vector_norm(fz - result.z, dim=1)
    torch.testing.assert_close(result.residual, res, rtol=1e-12, atol=0)
    assert result.n_f_evals == int(result.n_steps.max()) + 1  # the evaluation at the batch


# --- Samples coupled through the batch ------------------------------------------------------


def within_tolerance(f, result, solver, *inputs):
    z = result.z
    fz = f(z, *inputs)
    res = torch.linalg.vector_norm((fz - z).reshape(z.shape[0], -1), dim=1)
    bound = solver.atol + solver.rtol * torch.linalg.vector_norm(fz.reshape(z.shape[0], -1), dim=1)
    return res <= bound * (1 + 1e-9)


def residual_at(f, result, *inputs):
    z = result.z
    return torch.linalg.vector_norm((f(z, *inputs) - z).reshape(z.shape[0], -1), dim=1)


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
@pytest.mark.parametrize("path", ALL_ROW_PARAMS)
def test_batch_mean_coupling_succeeds_only_at_the_returned_batch(solver, path):
    x = torch.tensor([[1.0], [2.0], [3.0], [40.0]], dtype=F64)
    s = solver.make(max_iter=300, rtol=1e-6, atol=0.0)
    result = solve(batch_mean, torch.zeros(4, 1, dtype=F64), x, solver=s, path=path)
    assert result.converged.all()
    assert within_tolerance(batch_mean, result, s, x).all()
    # z = 0.5 z + x + 0.4 m with m = mean(z): m = 0.5 m + mean(x) + 0.4 m => m = 10 mean(x)
    exact = 2 * (x + 0.4 * 10 * x.mean())
    torch.testing.assert_close(result.z, exact, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        result.residual, residual_at(batch_mean, result, x), rtol=1e-6, atol=1e-12
    )


def test_an_unbatched_state_whose_components_couple():
    # A state of shape (2,): two samples of one feature, coupled by A.
    A = torch.tensor([[0.0, 0.9], [0.0, 0.9]], dtype=F64)
    b = torch.tensor([0.0, 1.0], dtype=F64)
    result = il.fixed_point(
        lambda z: A @ z + b, torch.zeros(2, dtype=F64), solver=il.Picard(max_iter=500)
    )
    assert result.converged.all()
    torch.testing.assert_close(result.z, torch.tensor([9.0, 10.0], dtype=F64), rtol=1e-2, atol=0)
    fz = A @ result.z + b
    assert ((fz - result.z).abs() <= 1e-6 + 1e-4 * fz.abs()).all()


class _MixAcross(nn.Module):
    """``f(z, x) = tanh(0.5 z + M z_batch + x)``: a fixed mixing matrix across the batch."""

    def __init__(self, batch: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(batch, batch, generator=g, dtype=F64)
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
    row=st.sampled_from(SOLVER_ROWS),
    batch=st.integers(2, 6),
    seed=st.integers(0, 1000),
    spread=st.floats(0.1, 30.0),
    rtol=st.sampled_from([1e-3, 1e-6]),
    max_iter=st.integers(3, 60),
)
def test_every_success_is_within_tolerance_at_the_returned_batch_for_coupled_maps(
    coupling, row, batch, seed, spread, rtol, max_iter
):
    g = torch.Generator().manual_seed(seed)
    n = 3
    x = spread * torch.randn(batch, n, generator=g, dtype=F64)
    x[0] *= 10  # one sample far from the others
    if coupling == "mean":
        f = batch_mean
    elif coupling == "mix":
        f = _MixAcross(batch, seed)
    else:
        f = _BatchNormCell(n, seed)
    solver = row.make(max_iter=max_iter, rtol=rtol, atol=0.0)
    result = il.fixed_point(f, torch.zeros(batch, n, dtype=F64), x, solver=solver)
    with torch.no_grad():
        ok = within_tolerance(f, result, solver, x)
        torch.testing.assert_close(
            result.residual, residual_at(f, result, x), rtol=1e-8, atol=1e-12
        )
    assert bool(ok[result.converged].all())


# --- Traces and recorded states -------------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_the_trace_records_every_iteration(path):
    solver = il.Picard(max_iter=30, atol=0.0, rtol=1e-6, trace=True)
    f = scaled_map(torch.tensor([0.5, 0.5]), torch.ones(2, 3))
    result = solve(f, torch.zeros(2, 3), solver=solver, path=path)
    assert result.trace is not None
    assert result.trace.shape == (result.n_f_evals - path.running_rows, 2)
    ratios = result.trace[1:, 0] / result.trace[:-1, 0]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 0.5))
    assert solve(f, torch.zeros(2, 3), solver=il.Picard(), path=path).trace is None


@pytest.mark.parametrize("path", ALL_ROW_PARAMS)
def test_check_every_delays_only_the_exit(path):
    f = scaled_map(torch.tensor([0.3, 0.6], dtype=F64), torch.ones(2, 3, dtype=F64))
    z0 = torch.zeros(2, 3, dtype=F64)
    every = solve(f, z0, solver=il.Anderson(atol=0, rtol=1e-9, max_iter=100), path=path)
    lazy = solve(
        f, z0, solver=il.Anderson(atol=0, rtol=1e-9, max_iter=100, check_every=7), path=path
    )
    assert torch.equal(lazy.n_steps, every.n_steps)
    assert torch.equal(lazy.z, every.z)
    assert lazy.n_f_evals % 7 == 0 and lazy.n_f_evals >= every.n_f_evals


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_states_are_the_solver_iterates_and_early_stoppers_give_their_answer(path):
    x = torch.tensor([[1.0], [2.0]], dtype=F64)
    rates = torch.tensor([[0.5], [0.9]], dtype=F64)
    solver = il.Picard(max_iter=200, rtol=1e-3, atol=0.0)
    result = solve(lambda z, x, r: r * z + x, torch.zeros(2, 1, dtype=F64), x, rates,
                   solver=solver, path=path, states=(0, 3, 30, 1000))  # fmt: skip
    assert result.n_steps.tolist()[0] < 30 < result.n_steps.tolist()[1]
    exact_k = lambda k: x * (1 - rates**k) / (1 - rates)  # noqa: E731  z_k of Picard from 0
    torch.testing.assert_close(result.states[0], torch.zeros(2, 1, dtype=F64))
    torch.testing.assert_close(result.states[1], exact_k(3))
    # At k = 30 sample 0 has stopped (it gives its answer); sample 1 is at its z_30.
    torch.testing.assert_close(result.states[2][0], result.z[0])
    torch.testing.assert_close(result.states[2][1], exact_k(30)[1])
    torch.testing.assert_close(result.states[3], result.z)  # past the solve: the answer


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_a_recorded_state_of_a_stopped_sample_is_its_returned_iterate(path):
    # Sample 1 (rate 3) diverges at k = 3 (residual 27 > 10 x 1) and returns z_0 = 0; sample 0
    # follows z_k = 2 - 2^(1-k).
    rate = torch.tensor([[0.5], [3.0]], dtype=F64)
    solver = il.Picard(max_iter=20, divergence_ratio=10.0, atol=0.0, rtol=1e-30)
    r = solve(lambda z, rate: rate * z + 1, torch.zeros(2, 1, dtype=F64), rate,
              solver=solver, path=path, states=(0, 2, 8))  # fmt: skip
    assert r.status.tolist() == [Status.MAX_ITER, Status.DIVERGED] and r.z[1].item() == 0.0
    # At k = 2 sample 1 still runs (z_2 = 4); at k = 8 it has stopped.
    assert [s.flatten().tolist() for s in r.states] == [[0.0, 0.0], [1.5, 4.0], [2 - 2**-7, 0.0]]


def test_recorded_states_of_an_empty_or_half_precision_batch_keep_the_state_dtype():
    solver = il.Picard(rtol=1e-2)
    empty = il.fixed_point(
        half_plus_one, torch.zeros(0, 3, dtype=torch.float16), solver=solver, states=(0, 2)
    )
    assert len(empty.states) == 2
    assert all(s.shape == (0, 3) and s.dtype == torch.float16 for s in empty.states)
    r = il.fixed_point(
        half_plus_one, torch.zeros(2, 3, dtype=torch.float16), solver=solver, states=(1,)
    )
    assert r.states[0].dtype == torch.float16 and (r.states[0] == 1.0).all()


# --- The rate and the error estimate --------------------------------------------------------


@pytest.mark.parametrize("g", [0.9, 0.99, 0.999, 0.9999])
@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_the_error_estimate_tracks_the_true_error_where_the_residual_does_not(solver, g):
    result = il.fixed_point(
        lambda z: g * z + 1, torch.zeros(1, 1, dtype=F64), solver=solver.make(max_iter=100000)
    )
    assert result.converged.all()
    error = (result.z - 1 / (1 - g)).abs().item()
    estimate = result.error_estimate.item()
    if error > 1e-9:  # accelerated solvers may land on the fixed point exactly
        assert estimate == pytest.approx(error, rel=0.05)
    assert result.rate.item() == pytest.approx(g, rel=1e-6)


# --- Dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_f_is_cast_to_the_state_dtype_before_the_residual(path):
    # f returns float64 for a float32 state: 1 + 1e-12 rounds to 1, so the residual is 0.
    solver = il.Picard(atol=0.0, rtol=1e-30)
    r = solve(lambda z: z.double() + 1e-12, torch.ones(2, 1), solver=solver, path=path)
    assert r.residual.tolist() == [0.0, 0.0] and r.n_steps.tolist() == [1, 1]
    assert r.z.dtype == torch.float32 and r.residual.dtype == torch.float32


class WidePicard(il.solvers.AbstractSolver):
    """A plug-in solver whose step returns float64 whatever the state's dtype, recording the
    dtypes it is handed."""

    seen: list[torch.dtype]

    def init(self, z):
        return {}

    def step(self, state, z, fz, iteration):
        type(self).seen.append(z.dtype)
        return fz.double(), state, torch.zeros(z.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_the_loop_keeps_iterates_in_the_working_dtype_whatever_the_solver_returns(path):
    WidePicard.seen = []
    r = solve(half_plus_one, torch.zeros(2, 1), solver=WidePicard(max_iter=4, **NEVER), path=path)
    assert WidePicard.seen == [torch.float32] * 3
    assert r.z.dtype == torch.float32 and r.z.tolist() == [[1.75], [1.75]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_half_precision_states_keep_float32_bookkeeping(dtype, path):
    # From 0: z_k = 2 - 2^(1-k) (exact in both formats), residual sqrt(3) 2^-k for 3 values,
    # bound 0.01 sqrt(3) (2 - 2^-k): first met at k = 6, so 7 steps and z = 2 - 2^-5.
    solver = il.Picard(rtol=1e-2, atol=0.0, max_iter=100)
    r = solve(half_plus_one, torch.zeros(2, 3, dtype=dtype), solver=solver, path=path)
    assert r.z.dtype == dtype
    assert r.residual.dtype == torch.float32 and r.rate.dtype == torch.float32
    assert r.n_steps.tolist() == [7, 7] and r.status.tolist() == [Status.SUCCESS] * 2
    assert (r.z == 2 - 2**-5).all()
    expected = torch.full((2,), 3**0.5 * 2**-6, dtype=torch.float32)
    torch.testing.assert_close(r.residual, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(r.rate, torch.full((2,), 0.5), rtol=1e-6, atol=0)


def test_f_sees_the_state_dtype_while_the_loop_works_in_float32():
    seen = []

    def f(z):
        seen.append(z.dtype)
        return 0.5 * z + 1

    il.fixed_point(f, torch.zeros(1, 2, dtype=torch.float16), solver=il.Picard(rtol=1e-2))
    assert set(seen) == {torch.float16}
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        il.fixed_point(f, torch.zeros(1, 2, dtype=torch.bfloat16), solver=il.Picard(rtol=1e-2))
    assert set(seen) == {torch.bfloat16}


def test_under_autocast_f_runs_in_low_precision_and_the_bookkeeping_in_float32():
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


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_the_result_never_aliases_z0(path):
    z0 = torch.ones(2, 3)
    result = solve(lambda z: 0.5 * z, z0, solver=il.Picard(max_iter=1), path=path)
    assert result.z.data_ptr() != z0.data_ptr()
    result.z.add_(1.0)
    assert torch.equal(z0, torch.ones(2, 3))


def test_an_empty_batch_takes_no_step_and_has_the_documented_dtypes_and_shapes():
    solver = il.Picard(rtol=1e-2)
    r = il.fixed_point(half_plus_one, torch.zeros(0, 3, dtype=torch.float16), solver=solver)
    assert r.z.dtype == torch.float16 and r.z.shape == (0, 3)
    assert r.status.dtype == torch.long and r.status.shape == (0,)
    assert r.n_steps.dtype == torch.long and r.n_steps.shape == (0,)
    assert r.converged.dtype == torch.bool and r.converged.shape == (0,)
    assert r.residual.dtype == torch.float32 and r.residual.shape == (0,)
    assert r.n_f_evals == 0 and r.summary() == "empty batch"


# --- Every path gives the same results ------------------------------------------------------


@dataclass(frozen=True)
class PathMap:
    """A map to run every path on."""

    f: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]
    z0: Tensor
    options: dict[str, Any]
    independent: bool  # f treats the samples independently: the running rows apply
    returns_earlier: bool = False  # some sample returns an earlier iterate
    statuses: int = 1  # the fewest distinct statuses the solve ends with


PATH_MAPS = {
    # Converging, diverging, NaN and capped samples.
    "mixed": PathMap(
        mixed_batch_map,
        (torch.tensor([0.1, 0.5, 0.9, 1.5, 0.99, 0.97], dtype=F64), torch.ones(6, 3, dtype=F64)),
        torch.zeros(6, 3, dtype=F64),
        {"max_iter": 60, "atol": 0.0, "rtol": 1e-9, "divergence_ratio": 20.0},
        independent=True,
        returns_earlier=True,
        statuses=3,
    ),
    # A sample that converged early leaves the tolerance as the others move (revived).
    "coupled": PathMap(
        batch_mean,
        (torch.tensor([[1.0], [2.0], [3.0], [40.0]], dtype=F64),),
        torch.zeros(4, 1, dtype=F64),
        {"max_iter": 40, "atol": 0.0, "rtol": 1e-9},
        independent=False,
    ),
    # Residuals rise before they fall.
    "non-monotone": PathMap(
        non_monotone,
        (torch.tensor([[1.0, -2.0], [0.5, 3.0], [-4.0, 1.0]], dtype=F64),),
        torch.zeros(3, 2, dtype=F64),
        {"max_iter": 40, "atol": 0.0, "rtol": 1e-9},
        independent=True,
    ),
    # A frozen sample runs again while no other sample stops.
    "follower": PathMap(
        follower,
        (),
        torch.zeros(2, 1, dtype=F64),
        {"max_iter": 100, "atol": 1e-6, "rtol": 0.0},
        independent=False,
    ),
}


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("name", list(PATH_MAPS))
def test_every_path_gives_the_same_results(solver, check_every, name):
    # The default (host reads on the CPU) is the reference. The paths that evaluate all rows
    # agree with it to the last bit, f called at the same batches; the running rows (for an f
    # that treats samples independently; they ignore check_every) evaluate sub-batches, so
    # they agree to rounding, and evaluate the returned batch once more.
    m = PATH_MAPS[name]
    s = solver.make(**m.options, check_every=check_every, on_nonfinite="ignore", trace=True)

    def run(**path):
        fr, calls = recording(m.f)
        return il.fixed_point(fr, m.z0, *m.inputs, solver=s, states=(0, 3, 17), **path), calls

    ref, ref_calls = run()
    assert len(set(ref.status.tolist())) >= m.statuses and torch.isfinite(ref.z).all()
    for path in PATHS:
        if path.running_rows and not (m.independent and check_every == 1):
            continue
        got, calls = run(**path.options)
        assert torch.equal(got.status, ref.status), path
        assert torch.equal(got.n_steps, ref.n_steps), path
        if not path.running_rows:
            assert got.n_f_evals == ref.n_f_evals
            assert torch.equal(torch.stack(calls), torch.stack(ref_calls)), path
            assert torch.equal(got.z, ref.z) and torch.equal(got.residual, ref.residual), path
            for a, b in ((got.rate, ref.rate), (got.trace, ref.trace)):
                torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
            assert all(torch.equal(a, b) for a, b in zip(got.states, ref.states, strict=True))
            continue
        assert got.n_f_evals == int(got.n_steps.max()) + 1
        if m.returns_earlier:  # all rows evaluate the returned batch once more too
            assert got.n_f_evals == ref.n_f_evals
        pairs = ((got.z, ref.z), (got.residual, ref.residual))
        for a, b in (*pairs, *zip(got.states, ref.states, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        for a, b in ((got.rate, ref.rate), (got.trace, ref.trace)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, equal_nan=True)


# --- Each path's row selection: the running rows ------------------------------------------


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_running_rows_cost_the_sum_of_the_samples_iterations(solver):
    rates = torch.tensor([0.1, 0.5, 0.9, 0.97], dtype=F64)
    target = torch.randn(4, 3, dtype=F64)
    rows = []

    def f(z, r, tgt):  # per-sample contraction r towards tgt; every input batched
        rows.append(z.shape[0])
        return torch.tanh(tgt + r[:, None] * (z - tgt))

    s = solver.make(max_iter=1000, atol=0.0, rtol=1e-8)
    z0 = torch.zeros(4, 3, dtype=F64)
    dense = il.fixed_point(f, z0, rates, target, solver=s)
    rows.clear()
    sparse = il.fixed_point(f, z0, rates, target, solver=s, independent_samples=True)
    assert sparse.converged.all() and dense.converged.all()
    torch.testing.assert_close(sparse.z, dense.z, atol=1e-12, rtol=0)
    assert torch.equal(sparse.n_steps, dense.n_steps)
    # Each sample evaluated only while running, plus the whole batch once at the end (the
    # check that f does not couple the samples).
    assert sum(rows) == int(sparse.n_steps.sum()) + 4
    assert len(set(dense.n_steps.tolist())) > 1  # ... and they needed different budgets
    assert sum(rows) < 4 * dense.n_f_evals


def test_running_rows_select_only_batched_tensor_inputs():
    # x (leading dimension B = 3) is selected as samples stop; the scale (a float), the 0-dim
    # tensor and the (4,) offset are passed unchanged.
    def f(z, x, scale, half, offset):
        assert isinstance(scale, float) and half.shape == () and offset.shape == (4,)
        return half * z + scale * x + offset

    x = torch.tensor([[2.0], [0.0], [4.0]], dtype=F64).expand(3, 4)
    offset = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64)
    half = torch.tensor(0.5, dtype=F64)
    z0 = torch.zeros(3, 4, dtype=F64)
    z0[1] = 2 * offset  # sample 1 starts at its fixed point: the others run on without it
    solver = il.Picard(rtol=1e-12, atol=0.0, max_iter=100)
    r = il.fixed_point(f, z0, x, 1.0, half, offset, solver=solver, independent_samples=True)
    torch.testing.assert_close(r.z, 2 * (x + offset), rtol=1e-10, atol=1e-10)
    assert r.n_steps[1] == 1 and (r.n_steps[[0, 2]] > 30).all()


def test_running_rows_select_and_cast_tuple_states_like_tensor_states():
    # The running rows of a tuple state: x (batched) is selected as samples stop, the offset
    # (not batched) is not; f sees the state in its own dtype (float16).
    seen = []

    def f(z, x, offset):
        a, b = z
        seen.append((a.dtype, a.shape[0], x.shape[0], offset.shape))
        return (0.5 * a + x, 0.5 * b + offset)

    x = torch.tensor([[2.0], [0.0], [4.0]], dtype=torch.float16)
    offset = torch.tensor([1.0, 1.0], dtype=torch.float16)
    z0 = (torch.zeros(3, 1, dtype=torch.float16), torch.full((3, 2), 2.0, dtype=torch.float16))
    z0[0][1] = 0.0  # sample 1 starts at its fixed point (0, (2, 2))
    solver = il.Picard(rtol=1e-2, atol=0.0, max_iter=100)
    r = il.fixed_point(f, z0, x, offset, solver=solver, independent_samples=True)
    a, b = r.z
    assert a.dtype == b.dtype == torch.float16 and r.n_steps[1] == 1
    torch.testing.assert_close(a, 2 * x, rtol=2e-2, atol=0)
    assert {dtype for dtype, *_ in seen} == {torch.float16}
    assert all(rows == xrows and shape == (2,) for _, rows, xrows, shape in seen)
    assert min(rows for _, rows, _, _ in seen) == 2
