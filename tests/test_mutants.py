"""Exact values that pin the core down where the rest of the suite left mutants alive.

Each test here kills mutants that `make mutation` (mutmut, see mutation/README.md) found
surviving the solver, backward and error tests: a wrong stopping bound, a mixing
weight on the wrong term, Broyden's restart off by one, ... The assertions are closed-form
iterates, step counts and statuses, so a mutant cannot pass them by being "close enough".
"""

from __future__ import annotations

import functools
import inspect
import os

import pytest
import torch
from zoo import Affine, AffineModule

import implicitlayers as il
from implicitlayers import Status

F64 = torch.float64
#: Tolerances no iterate of these tests reaches (both 0 is refused), so the steps are counted.
NEVER = {"atol": 0.0, "rtol": 1e-300, "on_unconverged": "ignore"}


def recording(f):
    """``f`` and the list of the iterates it is called at (copies, in call order)."""
    calls: list[torch.Tensor] = []

    def g(z, *inputs):
        calls.append(z.detach().clone())
        return f(z, *inputs)

    return g, calls


#: A tensor f reaches through a global (see the hidden-tensor tests).
HIDDEN: dict = {}


def hidden_cell(z, x, shift):
    return torch.tanh(z @ HIDDEN["W"].T + x) + shift


def half_plus_one(z):
    """``f(z) = z / 2 + 1``: fixed point 2, Picard iterates ``2 + (z0 - 2) / 2**k``."""
    return 0.5 * z + 1


# --- the stopping test ---------------------------------------------------------------------


def test_the_relative_bound_is_on_f_of_z_not_on_z():
    # From z0 = 10: z_k = 2 + 8 / 2**k, f(z_k) = 2 + 4 / 2**k, residual 4 / 2**k. With
    # rtol = 0.6 the bound 0.6 |f(z)| first holds at k = 1 (2 <= 2.4; at k = 0, 4 > 3.6),
    # while a bound 0.6 |z| would already hold at k = 0 (4 <= 6).
    f, calls = recording(half_plus_one)
    r = il.fixed_point(f, torch.full((1, 1), 10.0, dtype=F64), solver=il.Picard(rtol=0.6, atol=0))
    assert r.n_steps.tolist() == [2] and r.n_f_evals == 2
    assert [c.item() for c in calls] == [10.0, 6.0]
    assert r.z.item() == 6.0 and r.residual.item() == 2.0
    assert r.status.tolist() == [Status.SUCCESS]


def test_a_residual_equal_to_the_bound_converges():
    # From 0: residual 1 at z0 = 0 with atol = 1 (exact in binary): converged at once, and
    # likewise for rtol alone (|f(0)| = 1).
    for atol, rtol in ((1.0, 0.0), (0.0, 1.0)):
        r = il.fixed_point(
            half_plus_one, torch.zeros(1, 1, dtype=F64), solver=il.Picard(atol=atol, rtol=rtol)
        )
        assert r.n_steps.tolist() == [1] and r.status.tolist() == [Status.SUCCESS]
        assert r.z.item() == 0.0 and r.residual.item() == 1.0


def test_atol_and_rtol_add_up():
    # From 0: residuals 1, 1/2, 1/4, 1/8 at z = 0, 1, 3/2, 7/4 with |f(z)| = 1, 3/2, 7/4, 15/8.
    # atol = 1/8, rtol = 1/16: bounds 3/16, 7/32, 15/64, 31/128: first met at z = 7/4
    # (1/8 <= 31/128); either term alone is first met later.
    solver = il.Picard(atol=0.125, rtol=0.0625, max_iter=50)
    r = il.fixed_point(half_plus_one, torch.zeros(1, 1, dtype=F64), solver=solver)
    assert r.n_steps.tolist() == [4] and r.z.item() == 1.75


# --- Picard and Anderson weights -----------------------------------------------------------


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
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 4, generator=g, dtype=F64)
    W = 0.8 * W / torch.linalg.matrix_norm(W, 2)
    b = torch.randn(4, generator=g, dtype=F64)

    def f(z):
        return torch.tanh(z @ W.T + b)

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


# --- Broyden's limited memory --------------------------------------------------------------


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


def tanh_map(n=4, seed=3, scale=0.8):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=F64)
    W = scale * W / torch.linalg.matrix_norm(W, 2)
    b = torch.randn(n, generator=g, dtype=F64)
    return (lambda z: torch.tanh(z @ W.T + b)), g


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


@pytest.mark.parametrize(
    "solver",
    [
        il.Picard(max_iter=8, **NEVER),
        il.Anderson(max_iter=8, **NEVER),
        il.Broyden(max_iter=8, **NEVER),
    ],
    ids=["picard", "anderson", "broyden"],
)
def test_a_sample_solves_the_same_next_to_one_1e100_times_larger(solver):
    # Every per-sample quantity (Anderson's ridge scale, Broyden's breakdown threshold) must be
    # taken over that sample's own row: the iteration is scale-equivariant, so the big sample
    # follows the small one scaled, and the small one follows itself solved alone.
    f, g = tanh_map()
    scale = torch.tensor([1.0, 1e100], dtype=F64)[:, None]
    z0 = torch.randn(1, 4, generator=g, dtype=F64)
    fr, alone = recording(f)
    il.fixed_point(fr, z0, solver=solver)
    fr, both = recording(lambda z: scale * f(z / scale))
    il.fixed_point(fr, torch.cat([z0, 1e100 * z0]), solver=solver)
    alone, both = torch.cat(alone), torch.stack(both)
    torch.testing.assert_close(both[:, 0], alone, rtol=1e-12, atol=0)
    torch.testing.assert_close(both[:, 1] / 1e100, alone, rtol=1e-9, atol=0)


# --- the driver loop ----------------------------------------------------------------------

BOTH_LOOPS = pytest.mark.parametrize("independent", [False, True], ids=["dense", "compacted"])


@BOTH_LOOPS
def test_of_equal_residuals_the_earliest_iterate_is_returned(independent):
    # f(z) = -z from 1: the iterates alternate 1, -1, 1, -1, all with residual 2.
    r = il.fixed_point(
        lambda z: -z,
        torch.ones(1, 1, dtype=F64),
        solver=il.Picard(max_iter=4, divergence_ratio=None),
        independent_samples=independent,
    )
    assert r.z.tolist() == [[1.0]] and r.residual.tolist() == [2.0]
    assert r.status.tolist() == [Status.MAX_ITER] and r.n_steps.tolist() == [4]
    # The dense loop measures the returned (earlier) iterate once more; the compacted one
    # evaluates each sample alone, so nothing else in the batch can have moved.
    # Both evaluate the returned batch once more: the dense path because it was never
    # evaluated, the compacted one to check that f does not couple the samples.
    assert r.n_f_evals == 5


@BOTH_LOOPS
def test_f_is_cast_to_the_state_dtype_before_the_residual(independent):
    # f returns float64 for a float32 state: 1 + 1e-12 rounds to 1, so the residual is 0.
    r = il.fixed_point(
        lambda z: z.double() + 1e-12,
        torch.ones(2, 1),
        solver=il.Picard(atol=0.0, rtol=1e-30),
        independent_samples=independent,
    )
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


@BOTH_LOOPS
def test_the_loop_keeps_iterates_in_the_working_dtype_whatever_the_solver_returns(independent):
    WidePicard.seen = []
    r = il.fixed_point(
        half_plus_one,
        torch.zeros(2, 1),
        solver=WidePicard(max_iter=4, **NEVER),
        independent_samples=independent,
    )
    assert WidePicard.seen == [torch.float32] * 3
    assert r.z.dtype == torch.float32 and r.z.tolist() == [[1.75], [1.75]]


@BOTH_LOOPS
def test_statuses_and_counts_for_a_batch_that_stops_at_different_steps(independent):
    # Sample 0 starts at its fixed point (stops at once, no step: rate NaN); sample 1 runs
    # from 0 with residuals 2^-k until 2^-k <= 2^-3 (tolerance atol = 1/8): 4 evaluations.
    z0 = torch.tensor([[2.0], [0.0]], dtype=F64)
    r = il.fixed_point(
        half_plus_one, z0, solver=il.Picard(atol=0.125, rtol=0.0), independent_samples=independent
    )
    assert r.status.dtype == torch.long and r.n_steps.dtype == torch.long
    assert r.status.tolist() == [Status.SUCCESS] * 2 and r.n_steps.tolist() == [1, 4]
    assert r.z.tolist() == [[2.0], [1.75]] and r.residual.tolist() == [0.0, 0.125]
    assert torch.isnan(r.rate[0]) and r.rate[1].item() == 0.5
    # Dense: the returned batch is the last one evaluated; compacted: plus one evaluation of
    # the whole returned batch (the check that f does not couple the samples).
    assert r.n_f_evals == (5 if independent else 4)


@BOTH_LOOPS
def test_breakdown_is_reported_only_for_samples_that_end_unconverged(independent):
    # Sample 0: f(z) = z + 1 (no fixed point, Anderson's system singular: BREAKDOWN). Sample 1:
    # Broyden's piecewise map of test_errors (its secant breaks down, then it converges).
    def f(z, no_fixed_point):
        piecewise = torch.stack([0.5 * z[:, 0] + 1, torch.zeros_like(z[:, 1])], 1)
        return torch.where(no_fixed_point, z + 1, piecewise)

    which = torch.tensor([[True], [False]])  # an input, so the compacted loop selects its rows
    solver = il.Anderson(max_iter=20, regularization=0.0, divergence_ratio=None, rtol=1e-6)
    r = il.fixed_point(f, torch.zeros(2, 2), which, solver=solver, independent_samples=independent)
    assert r.status.tolist()[0] == Status.BREAKDOWN
    # Also when every breakdown happens while the other sample is frozen (it starts at (2, 0),
    # its fixed point, and stops at once).
    z0 = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    r = il.fixed_point(f, z0, which, solver=solver, independent_samples=independent)
    assert r.status.tolist() == [Status.BREAKDOWN, Status.SUCCESS] and r.n_steps[1] == 1
    broyden = il.Broyden(rtol=1e-6)
    r = il.fixed_point(f, torch.zeros(2, 2), which, solver=broyden, independent_samples=independent)
    assert r.status.tolist()[1] == Status.SUCCESS


def test_the_compacted_loop_selects_only_batched_tensor_inputs():
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


def policy_message(status_codes):
    """The message fixed_point raises for samples meant to end with ``status_codes``."""
    codes = torch.tensor(status_codes)

    def f(z, codes):
        codes = codes[:, None]
        out = torch.where(codes == Status.DIVERGED, 1e5 * z + 1.0, z + 1.0)
        out = torch.where(codes == Status.NONFINITE, float("nan"), out)
        return torch.where(codes == Status.SUCCESS, 0.0, out)  # z0 = 0 is its fixed point

    solver = il.Picard(max_iter=3, on_unconverged="raise", on_nonfinite="ignore")
    with pytest.raises(il.ConvergenceError) as caught:
        il.fixed_point(f, torch.zeros(len(status_codes), 1), codes, solver=solver)
    return str(caught.value)


def test_the_failure_message_lists_at_most_ten_samples_and_every_reason():
    max_iter = (
        "MAX_ITER: used all max_iter=3 evaluations without meeting ||f(z) - z|| <= atol + "
        "rtol * ||f(z)||. Raise max_iter, loosen atol/rtol, use an accelerated solver "
        "(Anderson, Broyden), or make f more contractive (a smaller step size, spectral "
        "normalisation; implicitlayers.diagnostics.spectral_radius estimates how contractive "
        "it is)."
    )
    diverged = f"DIVERGED: {Status.DIVERGED.message}"
    ten = ", ".join(map(str, range(10)))
    assert policy_message([Status.MAX_ITER] * 10) == (
        f"Picard stopped 10/10 samples without converging (samples {ten}). {max_iter}"
    )
    assert policy_message([Status.MAX_ITER] * 11) == (
        f"Picard stopped 11/11 samples without converging (samples {ten}, ...). {max_iter}"
    )
    # Non-finite samples follow on_nonfinite (ignored here), the others on_unconverged.
    codes = [Status.DIVERGED, Status.SUCCESS, Status.NONFINITE, Status.MAX_ITER]
    assert policy_message(codes) == (
        f"Picard stopped 2/4 samples without converging (samples 0, 3). {max_iter} {diverged}"
    )


@BOTH_LOOPS
def test_divergence_is_a_residual_strictly_above_the_ratio(independent):
    # f(z) = 3z + 1 from 0: residuals 1, 3, 9, 27 (exact). With divergence_ratio 9 the third
    # residual equals the bound (nine times the first), so only the fourth diverges.
    r = il.fixed_point(
        lambda z: 3 * z + 1,
        torch.zeros(1, 1, dtype=F64),
        solver=il.Picard(divergence_ratio=9.0),
        independent_samples=independent,
    )
    assert r.status.tolist() == [Status.DIVERGED] and r.n_steps.tolist() == [4]
    assert r.z.item() == 0.0 and r.residual.item() == 1.0  # the best iterate is the first


def test_a_batch_already_at_its_fixed_point_stops_at_once_with_nan_rate():
    r = il.fixed_point(half_plus_one, torch.full((2, 1), 2.0, dtype=F64), solver=il.Picard())
    assert r.n_steps.tolist() == [1, 1] and r.n_f_evals == 1 and r.converged.all()
    assert r.rate.dtype == F64 and torch.isnan(r.rate).all()
    assert r.residual.dtype == F64 and r.residual.tolist() == [0.0, 0.0]


def test_a_frozen_sample_that_no_longer_passes_runs_again():
    # Sample 0's map is sample 1's current value plus 5e-7: from 0 it converges at once
    # (residual 5e-7 <= atol), then fails the test as sample 1 moves (by 0.002 / 2^k), without
    # diverging (0.002 < 1e4 * 5e-7) and while no other sample stops: it must run again at
    # once, and both end within tolerance of the batch returned.
    def f(z):
        return torch.stack([z[1] + 5e-7, 0.5 * z[1] + 0.002])

    solver = il.Picard(atol=1e-6, rtol=0.0, max_iter=100)
    fr, calls = recording(f)
    r = il.fixed_point(fr, torch.zeros(2, 1, dtype=F64), solver=solver)
    assert [c[0].item() for c in calls[:4]] == [0.0, 0.0, 0.002 + 5e-7, 0.003 + 5e-7]
    # Sample 1 stops at k = 11 (0.002 / 2^11 <= 1e-6), sample 0 one step later.
    assert r.n_steps.tolist() == [13, 12] and r.n_f_evals == 13
    assert r.status.tolist() == [Status.SUCCESS] * 2
    true = (f(r.z) - r.z).abs().flatten()
    assert (true <= 1e-6).all() and torch.equal(r.residual, true)


# --- DEQ ---------------------------------------------------------------------------------


def test_z0_is_checked_against_the_first_input_only_when_that_has_a_batch():
    # No input, a float, a 0-dim tensor first: nothing to compare z0's batch of 3 with.
    z0 = torch.zeros(3, 2, dtype=F64)
    for inputs, f in (
        ((), lambda z: 0.5 * z + 1),
        ((1.0,), lambda z, s: 0.5 * z + s),
        ((torch.tensor(1.0, dtype=F64),), lambda z, s: 0.5 * z + s),
    ):
        z, _ = il.DEQ(f, solver=il.Anderson(rtol=1e-12, atol=0.0))(*inputs, z0=z0)
        torch.testing.assert_close(z, torch.full((3, 2), 2.0, dtype=F64))
    # A 1-D first input has a batch: 4 rows for z0's 3 is named, with the fix.
    deq = il.DEQ(lambda z, x: 0.5 * z + x[:, None])
    with pytest.raises(ValueError) as caught:
        deq(torch.ones(4, dtype=F64), z0=z0)
    assert str(caught.value) == (
        "z0 has batch size 3 but the first input has 4 (shape (4,)); pass z0 with one row per "
        "sample, e.g. z0=torch.zeros(4, ...)"
    )


def test_failed_samples_non_finite_inputs_are_zeroed_only_for_the_attach():
    # Sample 1's input is NaN (its solve fails, NONFINITE): its row is zeroed where not finite
    # for the one application of f that carries the gradient, so the parameter gradients are
    # those of sample 0 alone. Inputs without the batch dimension (a 0-dim weight, a (3,)
    # offset, a float) and integer tensors (an index) pass unchanged.
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    U = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=F64, requires_grad=True)
    table = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)

    def f(z, x, w, offset, scale, idx):
        assert w.shape == () and offset.shape == (3,) and isinstance(scale, float)
        assert idx.dtype == torch.long
        return w * z + scale * (x @ U.T + offset + table[idx])

    x = torch.tensor([[1.0, -1.0], [float("nan"), 2.0]], dtype=F64, requires_grad=True)
    offset = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    idx = torch.tensor([1, 0])
    solver = il.Anderson(rtol=1e-12, atol=0.0, on_nonfinite="ignore")
    deq = il.DEQ(f, solver=solver, backward=il.JFB())
    z, result = deq(x, w, offset, 1.0, idx, z0=torch.zeros(2, 3, dtype=F64))
    assert result.status.tolist() == [Status.SUCCESS, Status.NONFINITE]
    z.sum().backward()
    # Sample 0: z* = 2 (U x0 + offset + table[1]); JFB: dL/dU = 1 x0^T, dL/dw = sum z0*.
    z_star = 2 * (U.detach() @ x.detach()[0] + offset + table[1])
    torch.testing.assert_close(z[0], z_star, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U.grad, torch.ones(3, 1, dtype=F64) * x.detach()[0], rtol=0, atol=0)
    torch.testing.assert_close(w.grad, z_star.sum(), rtol=1e-10, atol=0)
    expected = torch.tensor([[9.0, 12.0], [0.0, 0.0]], dtype=F64)  # sum_i U_i; none for sample 1
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_failed_rows_are_zeroed_not_replaced_by_another_value():
    # A map that couples the samples through a NaN-safe reduction sees the attach batch: the
    # failed row's NaN entry must read as 0 there (as nan_to_num made it in the solve), and
    # its finite entry must stay.
    theta = torch.tensor(0.3, dtype=F64, requires_grad=True)

    def f(z, x):
        return 0.5 * z + x + theta * torch.nan_to_num(x).pow(2).sum(0)

    x = torch.tensor([[1.0, 1.0], [float("nan"), 2.0]], dtype=F64)
    solver = il.Anderson(rtol=1e-12, atol=0.0, on_nonfinite="ignore")
    z, result = il.DEQ(f, solver=solver, backward=il.JFB())(x, z0=torch.zeros(2, 2, dtype=F64))
    assert result.status.tolist() == [Status.SUCCESS, Status.NONFINITE]
    z[0].sum().backward()
    # JFB: dL/dtheta = sum over sample 0's outputs of the column sums of x^2: (1 + 0) + (1 + 4).
    assert theta.grad.item() == 6.0


@pytest.mark.parametrize(
    "cls", [il.Picard, il.Anderson, il.Broyden], ids=["picard", "anderson", "broyden"]
)
@BOTH_LOOPS
def test_every_tensor_is_made_on_the_state_device(cls, independent):
    # With "meta" as the default device, a tensor the solver makes without device= lands
    # there and cannot meet the CPU state (as one made on the CPU could not meet a CUDA
    # state). Samples stop at different steps, so the freezing paths run too.
    z0 = torch.tensor([[2.0, 2.0], [0.0, 0.0], [5.0, 1.0]], dtype=F64)
    solver = cls(rtol=1e-9, atol=0.0, max_iter=100)
    with torch.device("meta"):
        r = il.fixed_point(half_plus_one, z0, solver=solver, independent_samples=independent)
        empty = il.fixed_point(half_plus_one, z0[:0], solver=solver)
    for tensor in (r.z, r.status, r.n_steps, r.residual, r.rate, empty.status, empty.n_steps):
        assert tensor.device.type == "cpu"
    assert r.converged.all() and r.n_steps[0] == 1
    torch.testing.assert_close(r.z, torch.full((3, 2), 2.0, dtype=F64), rtol=0, atol=1e-8)


# --- the adjoint's fallback ----------------------------------------------------------------


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


TIGHT = il.Anderson(max_iter=300, rtol=1e-13, atol=1e-14)


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


def test_an_unconverged_adjoint_warns_with_the_documented_message():
    rule = il.ImplicitDifferentiation(solver=il.Picard(max_iter=2))
    problem = Affine.make(n=4, d=3, contraction=0.7)

    z, _ = il.DEQ(AffineModule(problem), solver=TIGHT, backward=rule)(
        torch.randn(2, 3, dtype=F64), z0=torch.zeros(2, 4, dtype=F64)
    )
    with pytest.warns(il.ConvergenceWarning) as caught:
        z.sum().backward()
    assert str(caught[0].message) == (
        f"{rule!r}: the adjoint solve did not converge for some samples, so their gradients "
        f"are inexact (DEQ.last_backward_result holds the statuses). MAX_ITER: "
        f"{Status.MAX_ITER.message} On the adjoint equation u = J^T u + g a fixed-point solver "
        "needs rho(J) < 1 (implicitlayers.diagnostics.spectral_radius estimates it); GMRES "
        "(solver='gmres') needs only I - J^T invertible."
    )


def test_an_unconverged_gmres_adjoint_gives_advice_for_gmres():
    rule = il.ImplicitDifferentiation(solver=il.GMRES(max_iter=3, restart=2))
    problem = Affine.make(n=4, d=3, contraction=0.7)

    z, _ = il.DEQ(AffineModule(problem), solver=TIGHT, backward=rule)(
        torch.randn(2, 3, dtype=F64), z0=torch.zeros(2, 4, dtype=F64)
    )
    with pytest.warns(il.ConvergenceWarning) as caught:
        z.sum().backward()
    assert str(caught[0].message) == (
        f"{rule!r}: the adjoint solve did not converge for some samples, so their gradients "
        f"are inexact (DEQ.last_backward_result holds the statuses). MAX_ITER: "
        f"{Status.MAX_ITER.linear_message}"
    )
    assert "use GMRES" not in str(caught[0].message)


# --- second order --------------------------------------------------------------------------


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


def test_exact_second_order_with_parameters_independent_of_z_and_unused_ones():
    cell = SplitCell()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(2, 4, dtype=F64)
    deq = il.DEQ(cell, solver=TIGHT, backward=il.ImplicitDifferentiation(solver=TIGHT))
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
    deq = il.DEQ(f, solver=TIGHT, backward=il.ImplicitDifferentiation(solver=TIGHT))
    got = second_order(lambda: deq(x, U, z0=z0).z, [x, U], [U])
    ref = second_order(lambda: unrolled(f, z0, x, U), [x, U], [U])
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_second_order_through_an_input_computed_by_another_module():
    # x = encoder(x0): the leaf check stops at x (an input of the DEQ), so the encoder's
    # weight, which f never touches directly, is not reported as a hidden closure.
    encoder = torch.nn.Linear(3, 3, dtype=F64)
    cell = SplitCell()
    x0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(2, 4, dtype=F64)
    deq = il.DEQ(cell, solver=TIGHT, backward=il.ImplicitDifferentiation(solver=TIGHT))
    got = second_order(lambda: deq(encoder(x0), z0=z0).z, [x0], [encoder.weight])
    ref = second_order(lambda: unrolled(cell, z0, encoder(x0)), [x0], [encoder.weight])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-8, atol=1e-10)


def test_a_hidden_closure_is_found_wherever_it_sits_in_the_graph():
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


def test_the_leaf_check_visits_each_node_of_a_shared_graph_once():
    # 60 layers each using the previous value twice: 2^60 paths, 180 nodes.
    def f(z, x):
        y = z
        for _ in range(60):
            y = 0.5 * y + 0.5 * y
        return 0.5 * y + x

    x = torch.ones(1, 2, dtype=F64, requires_grad=True)
    deq = il.DEQ(f, solver=TIGHT, backward=il.ImplicitDifferentiation(solver=TIGHT))
    (g,) = torch.autograd.grad((deq(x).z ** 2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    # z* = 2x, L = 4 |x|^2: dL/dx = 8x, and the derivative of its sum is 8 per entry.
    torch.testing.assert_close(g, 8 * x.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(h, torch.full((1, 2), 8.0, dtype=F64), rtol=1e-10, atol=0)


def test_attach_reports_the_rule_and_its_adjoint_result_to_its_callback():
    rule = il.ImplicitDifferentiation(solver=TIGHT)
    x = torch.ones(1, 2, dtype=F64, requires_grad=True)
    seen = []
    z = rule.attach(
        lambda z: 0.5 * z + x,
        torch.full((1, 2), 2.0, dtype=F64),
        lambda r, res: seen.append((r, res)),
        leaves=[x],
    )
    (g,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    assert len(seen) == 1 and seen[0][0] is rule and seen[0][1].converged.all()
    torch.testing.assert_close(g, torch.full((1, 2), 2.0, dtype=F64), rtol=1e-10, atol=0)


# --- half precision ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_states_keep_float32_bookkeeping(dtype):
    # From 0: z_k = 2 - 2^(1-k) (exact in both formats), residual sqrt(3) 2^-k for 3 values,
    # bound 0.01 sqrt(3) (2 - 2^-k): first met at k = 6, so 7 steps and z = 2 - 2^-5.
    solver = il.Picard(rtol=1e-2, atol=0.0, max_iter=100)
    r = il.fixed_point(half_plus_one, torch.zeros(2, 3, dtype=dtype), solver=solver)
    assert r.z.dtype == dtype
    assert r.residual.dtype == torch.float32 and r.rate.dtype == torch.float32
    assert r.n_steps.tolist() == [7, 7] and r.status.tolist() == [Status.SUCCESS] * 2
    assert (r.z == 2 - 2**-5).all()
    expected = torch.full((2,), 3**0.5 * 2**-6, dtype=torch.float32)
    torch.testing.assert_close(r.residual, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(r.rate, torch.full((2,), 0.5), rtol=1e-6, atol=0)


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: il.Picard(max_iter=0), ValueError, "max_iter must be >= 1, got 0"),
        (lambda: il.Picard(atol=-0.001), ValueError, "atol must lie in [0.0, inf], got -0.001"),
        (lambda: il.Picard(rtol=-0.001), ValueError, "rtol must lie in [0.0, inf], got -0.001"),
        (
            lambda: il.Picard(atol=0.0, rtol=0.0),
            ValueError,
            "atol and rtol are both 0, so no iterate can converge in floating point; make at "
            "least one positive (e.g. rtol=1e-4)",
        ),
        (
            lambda: il.Picard(on_unconverged="loud"),
            ValueError,
            "on_unconverged must be one of 'ignore', 'warn', 'raise', got 'loud'",
        ),
        (
            lambda: il.Picard(on_nonfinite="loud"),
            ValueError,
            "on_nonfinite must be one of 'ignore', 'warn', 'raise', got 'loud'",
        ),
        (
            lambda: il.Picard(divergence_ratio=1.0),
            ValueError,
            "divergence_ratio must lie in (1.0, inf], got 1.0",
        ),
        (lambda: il.Picard(check_every=0), ValueError, "check_every must be >= 1, got 0"),
        (lambda: il.Picard(trace=1), TypeError, "trace must be a bool, got 1"),
        (lambda: il.Picard(mixing=0.0), ValueError, "mixing must lie in (0.0, 1.0], got 0.0"),
        (lambda: il.Picard(mixing=1.01), ValueError, "mixing must lie in (0.0, 1.0], got 1.01"),
        (lambda: il.Anderson(history_size=0), ValueError, "history_size must be >= 1, got 0"),
        (lambda: il.Anderson(mixing=0.0), ValueError, "mixing must lie in (0.0, 1.0], got 0.0"),
        (lambda: il.Anderson(mixing=1.5), ValueError, "mixing must lie in (0.0, 1.0], got 1.5"),
        (
            lambda: il.Anderson(regularization=-0.001),
            ValueError,
            "regularization must lie in [0.0, inf], got -0.001",
        ),
        (lambda: il.Broyden(history_size=0), ValueError, "history_size must be >= 1, got 0"),
        (
            lambda: il.ImplicitDifferentiation(fallback_to_jfb=1),
            TypeError,
            "fallback_to_jfb must be a bool, got 1",
        ),
        (
            lambda: il.ImplicitDifferentiation(on_unconverged="loud"),
            ValueError,
            "on_unconverged must be one of 'ignore', 'warn', 'raise', got 'loud'",
        ),
    ],
)
def test_configuration_errors_are_worded_exactly(make, error, message):
    with pytest.raises(error) as caught:
        make()
    assert str(caught.value) == message


def test_the_bounds_themselves_are_accepted():
    # The closed ends of each interval, and values a wrong bound would refuse.
    il.Picard(max_iter=1, atol=0.0, rtol=1e-9, mixing=1.0, check_every=1, divergence_ratio=1.5)
    il.Picard(atol=1e-9, rtol=0.0, divergence_ratio=None, mixing=0.01)
    il.Anderson(history_size=1, mixing=1.0, regularization=0.0)
    il.Anderson(mixing=1e-9)
    il.Broyden(history_size=1)


def test_the_default_adjoint_solver_is_gmres_as_documented():
    rule = il.ImplicitDifferentiation()
    assert rule.solver == il.GMRES(max_iter=200, rtol=1e-6, atol=1e-10, restart=20)
    assert rule.fallback_to_jfb is True and rule.on_unconverged == "warn"


def test_default_configuration():
    deq = il.DEQ(lambda z, x: 0.5 * z + x)
    assert deq.solver == il.Anderson() and deq.backward == il.JFB()
    assert deq.independent_samples is False
    assert il.ImplicitDifferentiation(solver="anderson").solver == il.Anderson()


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda: il.fixed_point(3, torch.zeros(1, 1)),
            TypeError,
            "f must be callable as f(z, *inputs), got int",
        ),
        (
            lambda: il.fixed_point(half_plus_one, torch.zeros(1, 1), independent_samples=1),
            TypeError,
            "independent_samples must be a bool, got 1",
        ),
        (
            lambda: il.DEQ(half_plus_one, independent_samples=1),
            TypeError,
            "independent_samples must be a bool, got 1",
        ),
        (
            lambda: il.fixed_point(half_plus_one, torch.zeros(2, 3, dtype=torch.long)),
            TypeError,
            "z0 must hold real floating-point tensors, got dtype torch.int64; pass z0 as float32 "
            "or float64 (a complex state: its real and imaginary parts as two tensors of a tuple "
            "state, or torch.view_as_real)",
        ),
        (
            lambda: il.fixed_point(lambda z: z, (torch.zeros(2, 1), torch.zeros(2, 1, dtype=F64))),
            ValueError,
            "every tensor of z0 must share dtype and device, got torch.float32 on cpu and "
            "torch.float64 on cpu",
        ),
        (
            lambda: il.DEQ(half_plus_one)(1.0),
            TypeError,
            "DEQ needs z0 when its first input is not a tensor: call deq(*inputs, z0=...)",
        ),
        (
            lambda: il.DEQ(half_plus_one, has_aux=1),
            TypeError,
            "has_aux must be a bool, got 1",
        ),
        (
            lambda: il.DEQ(lambda z, x: 0.5 * z + x)(torch.ones(1, 1), spectral_radius=1),
            TypeError,
            "spectral_radius must be a bool, got 1",
        ),
        (
            lambda: il.DEQ(lambda z, x: 0.5 * z + x, has_aux=True)(torch.ones(1, 1)),
            TypeError,
            "DEQ(f, has_aux=True) needs f to return a pair (z_next, aux), got Tensor; return "
            "(z_next, aux) or pass has_aux=False",
        ),
        (
            lambda: il.fixed_point(lambda z: z[:1], torch.zeros(2, 3)),
            ValueError,
            "f returned a batch of 1 samples for a state of 2; f must keep the batch dimension "
            "(one output row per input row)",
        ),
        (
            lambda: il.fixed_point(half_plus_one, torch.zeros(1, 1), states=(True,)),
            ValueError,
            "states must hold iteration indices k >= 0 (ints), got True in (True,)",
        ),
    ],
)
def test_call_errors_are_worded_exactly(make, error, message):
    with pytest.raises(error) as caught:
        make()
    assert str(caught.value) == message


def test_unknown_names_are_reported_with_the_argument_and_the_valid_names():
    with pytest.raises(ValueError) as caught:
        il.DEQ(half_plus_one, backward="exact")
    assert str(caught.value).startswith("unknown backward 'exact'; valid names are 'jfb', ")
    with pytest.raises(ValueError) as caught:
        il.DEQ(half_plus_one, solver="newton")
    assert str(caught.value) == (
        "unknown solver 'newton'; valid names are 'picard', 'anderson', 'broyden'"
    )
    # The adjoint solver's names include its default, GMRES.
    with pytest.raises(ValueError) as caught:
        il.ImplicitDifferentiation(solver="newton")
    assert str(caught.value) == (
        "unknown solver 'newton'; valid names are 'gmres', 'picard', 'anderson', 'broyden'"
    )


def test_f_returning_another_structure_is_named():
    z0 = torch.zeros(2, 3)
    with pytest.raises(ValueError) as caught:
        il.fixed_point(lambda z: "oops", z0)
    assert str(caught.value).startswith("f returned str, expected ")
    with pytest.raises(ValueError) as caught:
        il.fixed_point(lambda z: z[:, :2], z0)
    assert str(caught.value) == (
        "f(z, *inputs) returned (B, 2) for a state of structure (B, 3). A fixed point needs f "
        "to map a state to a state of the same structure: if z0 was taken by default (zeros "
        "like the first input), pass z0 with the state's structure, deq(*inputs, z0=...), "
        "fixed_point(f, z0, *inputs)."
    )
    # The same sizes in another order: the layout, not z0, is what to fix.
    with pytest.raises(ValueError) as caught:
        il.fixed_point(lambda z: z.transpose(1, 2), torch.zeros(2, 3, 4))
    assert str(caught.value) == (
        "f(z, *inputs) returned (B, 4, 3) for a state of structure (B, 3, 4). The same sizes "
        "in another order: f must return the state in the layout it is given (a transpose or "
        "permute inside f, undone before it returns?)."
    )


def test_the_default_z0_hint_is_added_to_shape_errors_raised_by_f():
    W = torch.zeros(3, 4, dtype=F64)
    deq = il.DEQ(lambda z, x: z @ W.T + x)  # a state of 3, not of x's 5
    with pytest.raises(RuntimeError) as caught:
        deq(torch.zeros(2, 5, dtype=F64))
    assert caught.value.__notes__ == [
        "implicitlayers: f was called with the default z0 = zeros_like(inputs[0]) of shape "
        "(2, 5). If the state's shape differs from the first input's, pass z0 with the "
        "state's shape: deq(*inputs, z0=...)."
    ]


def test_empty_batch_result_has_the_documented_dtypes_and_shapes():
    solver = il.Picard(rtol=1e-2)
    r = il.fixed_point(half_plus_one, torch.zeros(0, 3, dtype=torch.float16), solver=solver)
    assert r.z.dtype == torch.float16 and r.z.shape == (0, 3)
    assert r.status.dtype == torch.long and r.status.shape == (0,)
    assert r.n_steps.dtype == torch.long and r.n_steps.shape == (0,)
    assert r.converged.dtype == torch.bool and r.converged.shape == (0,)
    assert r.residual.dtype == torch.float32 and r.residual.shape == (0,)
    assert r.n_f_evals == 0 and r.summary() == "empty batch"


def test_summary_has_one_line_per_status_in_status_order():
    one = il.fixed_point(half_plus_one, torch.zeros(1, 1), solver=il.Picard(max_iter=200))
    assert one.summary() == f"1/1 SUCCESS: {Status.SUCCESS.message}"
    message = policy_message([Status.MAX_ITER])  # noqa: F841 - checks the raising path too
    codes = torch.tensor([Status.DIVERGED, Status.SUCCESS, Status.MAX_ITER])

    def f(z, codes):
        grow = torch.where(codes[:, None] == Status.DIVERGED, 1e5 * z + 1.0, z + 1.0)
        return torch.where(codes[:, None] == Status.SUCCESS, 0.0, grow)

    r = il.fixed_point(f, torch.zeros(3, 1), codes, solver=il.Picard(max_iter=3))
    assert r.summary() == "\n".join(
        [
            f"1/3 SUCCESS: {Status.SUCCESS.message}",
            f"1/3 MAX_ITER: {Status.MAX_ITER.message}",
            f"1/3 DIVERGED: {Status.DIVERGED.message}",
        ]
    )


def test_the_result_is_logged_at_debug_level(caplog):
    with caplog.at_level("DEBUG", logger="implicitlayers"):
        r = il.fixed_point(half_plus_one, torch.zeros(1, 1), solver=il.Picard(max_iter=200))
    assert [rec.getMessage() for rec in caplog.records] == [f"fixed_point: {r.summary()}"]


def at_this_line(warning, line):
    """Whether ``warning`` points at ``line`` of this file (under mutmut, at its trampoline,
    which stands between this file and the library)."""
    if "MUTANT_UNDER_TEST" in os.environ:
        return "mutmut" in warning.filename
    return (warning.filename, warning.lineno) == (__file__, line)


def test_warnings_point_at_the_callers_line():
    # From fixed_point and from DEQ (one call deeper), under mutmut's trampolines too.
    solver = il.Picard(max_iter=2, on_unconverged="warn")
    with pytest.warns(il.ConvergenceWarning) as caught:
        line = inspect.currentframe().f_lineno + 1
        il.fixed_point(half_plus_one, torch.zeros(1, 1), solver=solver)
    assert at_this_line(caught[0], line)
    deq = il.DEQ(lambda z, x: 0.5 * z + x, solver=solver)
    with pytest.warns(il.ConvergenceWarning) as caught:
        line = inspect.currentframe().f_lineno + 1
        deq(torch.ones(1, 1))
    assert at_this_line(caught[0], line)
    # In bfloat16 arithmetic 1 - 0.9 z has no fixed point: the iterates cycle.
    z0, picard = torch.zeros(1, 1, dtype=torch.bfloat16), il.Picard()
    with pytest.warns(il.ConvergenceWarning) as caught:
        line = inspect.currentframe().f_lineno + 1
        il.fixed_point(lambda z: 1 - 0.9 * z, z0, solver=picard)
    assert at_this_line(caught[0], line)
    assert str(caught[0].message) == (
        "1/1 samples used all max_iter=50 evaluations with rtol=0.0001, which is below the "
        "precision of their torch.bfloat16 state (eps 0.0078): unless the fixed point happens "
        "to be exactly representable, the residual cannot reach it. Pass rtol >= 8e-03 for "
        "torch.bfloat16 states (e.g. Picard(rtol=8e-03)), or solve in a wider dtype."
    )
    # The adjoint's warning, raised inside autograd's engine, points at loss.backward().
    rule = il.ImplicitDifferentiation(solver=il.Picard(max_iter=2, rtol=1e-12))
    z, _ = il.DEQ(lambda z, x: 0.5 * z + x, backward=rule)(torch.ones(1, 1, requires_grad=True))
    with pytest.warns(il.ConvergenceWarning) as caught:
        line = inspect.currentframe().f_lineno + 1
        z.sum().backward()
    assert at_this_line(caught[0], line)


def test_an_rtol_equal_to_the_half_precision_epsilon_does_not_warn():
    eps = torch.finfo(torch.bfloat16).eps
    il.fixed_point(
        half_plus_one, torch.zeros(1, 1, dtype=torch.bfloat16), solver=il.Picard(rtol=eps)
    )


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


class Counting(torch.nn.Module):
    """``f(z, x) = z W^T + x`` whose ``W`` is a parametrization counting its evaluations."""

    class Scale(torch.nn.Module):
        calls = 0

        def forward(self, w):
            type(self).calls += 1
            return 0.5 * w

    def __init__(self, n=2):
        super().__init__()
        self.W = torch.nn.Parameter(torch.eye(n, dtype=F64))
        torch.nn.utils.parametrize.register_parametrization(self, "W", Counting.Scale())

    def forward(self, z, x):
        return z @ self.W.T + x


def test_a_deq_forward_evaluates_parametrizations_once():
    cell = Counting()
    Counting.Scale.calls = 0
    z, result = il.DEQ(cell, solver=il.Picard(max_iter=100))(torch.ones(1, 2, dtype=F64))
    assert result.n_f_evals > 5 and Counting.Scale.calls == 1
    torch.testing.assert_close(z, torch.full((1, 2), 2.0, dtype=F64), rtol=1e-3, atol=0)


class CountingCalls(torch.nn.Module):
    """``f(z, x) = z / 2 + x`` counting its calls, with one (frozen or trainable) weight."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=F64))
        self.calls = 0

    def forward(self, z, x):
        self.calls += 1
        return self.w * z + x


def test_no_attach_without_gradients_and_the_result_is_returned():
    # Grad mode is off: f is evaluated by the solve only. Nothing visible requires grad:
    # one application without a graph checks that f reaches no hidden tensor that does.
    for context, trainable, probe in ((torch.enable_grad, False, 1), (torch.no_grad, True, 0)):
        cell = CountingCalls().requires_grad_(trainable)
        with context():
            z, result = il.DEQ(cell, solver=il.Picard(max_iter=100))(torch.ones(1, 2, dtype=F64))
        assert isinstance(result, il.SolverResult) and cell.calls == result.n_f_evals + probe
        assert not z.requires_grad
    # With a gradient to carry, one more application of f attaches the solution.
    cell = CountingCalls()
    z, result = il.DEQ(cell, solver=il.Picard(max_iter=100))(torch.ones(1, 2, dtype=F64))
    assert cell.calls == result.n_f_evals + 1 and z.requires_grad


def test_the_deq_passes_independent_samples_to_the_solve():
    sizes = []

    def f(z, x):
        sizes.append(z.shape[0])
        return 0.5 * z + x

    x = torch.tensor([[2.0], [0.0]], dtype=F64)  # sample 1 starts at its fixed point
    il.DEQ(f, solver=il.Picard(max_iter=100), independent_samples=True)(x)
    # The whole batch, then the running sample alone; at the end the whole returned batch
    # once (the check that f does not couple the samples) and once more (nothing visible
    # requires grad: the probe for a hidden tensor that does).
    assert sizes[0] == 2 and set(sizes[1:-2]) == {1} and sizes[-2:] == [2, 2]


def test_a_diverged_sample_returns_its_best_iterate_without_gradient():
    x = torch.tensor([[1.0], [1.0]], dtype=F64, requires_grad=True)
    rate = torch.tensor([[0.5], [3.0]], dtype=F64)  # sample 1 diverges
    deq = il.DEQ(lambda z, x: rate * z + x, solver=il.Picard(max_iter=100), backward=il.JFB())
    z, result = deq(x)
    assert result.status.tolist() == [Status.SUCCESS, Status.DIVERGED]
    assert z[1].item() == 0.0  # z0, the iterate with the smallest residual
    z.sum().backward()
    assert x.grad.tolist() == [[1.0], [0.0]]


def test_a_failed_sample_state_is_zeroed_where_not_finite_for_the_attach():
    # Sample 1 starts at (NaN, 3) with a NaN input: NONFINITE at once, so z* keeps that row.
    # The attach sees it as (0, 3): the finite entry stays (the coupling term below reads it,
    # as it did during the solve), the NaN one is 0, so no NaN reaches w's gradient.
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    theta = torch.tensor(0.01, dtype=F64, requires_grad=True)

    def f(z, x):
        return w * z + x + theta * torch.nan_to_num(z).pow(2).sum(0)

    nan = float("nan")
    x = torch.tensor([[1.0, 1.0], [nan, 2.0]], dtype=F64)
    z0 = torch.tensor([[0.0, 0.0], [nan, 3.0]], dtype=F64)
    solver = il.Anderson(rtol=1e-12, atol=0.0, on_nonfinite="ignore")
    z, result = il.DEQ(f, solver=solver, backward=il.JFB())(x, z0=z0)
    assert result.status.tolist() == [Status.SUCCESS, Status.NONFINITE]
    assert torch.isnan(z[1, 0]) and z[1, 1].item() == 3.0
    z[0].sum().backward()
    # JFB: dL/dw = sum of z*[0]; dL/dtheta = sum over columns of the coupling, |z*[0]|^2 + 0 + 9.
    z_star = z[0].detach()
    torch.testing.assert_close(w.grad, z_star.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(theta.grad, z_star.pow(2).sum() + 9.0, rtol=1e-12, atol=0)


@pytest.mark.parametrize("check_every", [1, 3])
def test_the_masked_path_matches_the_host_path_on_a_coupled_map(check_every):
    # As test_solvers' host/masked comparison (host_reads=False: the chunked path), on the map
    # whose frozen sample runs again: the masked path must not move frozen samples on the
    # iterations it does not synchronise.
    def f(z):
        return torch.stack([z[1] + 5e-7, 0.5 * z[1] + 0.002])

    solver = il.Picard(atol=1e-6, rtol=0.0, max_iter=100, check_every=check_every, trace=True)
    fr, host_calls = recording(f)
    host = il.fixed_point(fr, torch.zeros(2, 1, dtype=F64), solver=solver)
    fr, masked_calls = recording(f)
    masked = il.fixed_point(fr, torch.zeros(2, 1, dtype=F64), solver=solver, host_reads=False)
    assert torch.equal(torch.stack(host_calls), torch.stack(masked_calls))
    assert torch.equal(host.z, masked.z) and torch.equal(host.status, masked.status)
    assert torch.equal(host.n_steps, masked.n_steps) and torch.equal(host.trace, masked.trace)


def test_a_revived_sample_that_runs_out_keeps_its_best_iterate():
    # The map of test_a_frozen_sample_that_no_longer_passes_runs_again with 5 evaluations:
    # sample 0 ends unconverged, and its best is still its first iterate (residual 5e-7),
    # not a later one; its residual and status are measured at the returned batch.
    def f(z):
        return torch.stack([z[1] + 5e-7, 0.5 * z[1] + 0.002])

    r = il.fixed_point(
        f, torch.zeros(2, 1, dtype=F64), solver=il.Picard(atol=1e-6, rtol=0.0, max_iter=5)
    )
    assert r.z[0].item() == 0.0 and r.status.tolist() == [Status.MAX_ITER] * 2
    torch.testing.assert_close(r.residual, (f(r.z) - r.z).abs().flatten(), rtol=0, atol=0)


def test_the_output_is_a_copy_of_the_solution():
    x = torch.ones(1, 2, dtype=F64, requires_grad=True)
    z, result = il.DEQ(lambda z, x: 0.5 * z + x, solver=il.Picard(max_iter=100))(x)
    before = result.z.clone()
    with torch.no_grad():
        z.add_(1.0)
    assert torch.equal(result.z, before)


def test_under_autocast_the_output_has_f_s_dtype():
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.mul_(0.1)
    x = torch.ones(2, 2, requires_grad=True)
    solver = il.Picard(rtol=1e-2, on_nonfinite="ignore")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, _ = il.DEQ(lambda z, x: lin(z + x), solver=solver)(x)
        assert lin(z + x).dtype == torch.bfloat16
        # Also when a failed sample (a NaN input) keeps its detached best iterate.
        bad = torch.tensor([[1.0, 1.0], [float("nan"), 1.0]], requires_grad=True)
        z_bad, result = il.DEQ(lambda z, x: lin(z + x), solver=solver)(bad)
    assert z.dtype == torch.bfloat16 and z.requires_grad
    assert result.status.tolist() == [Status.SUCCESS, Status.NONFINITE]
    assert z_bad.dtype == torch.bfloat16


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


def test_attach_reports_a_first_order_adjoint_to_its_callback():
    rule = il.ImplicitDifferentiation(solver=TIGHT)
    x = torch.ones(1, 2, dtype=F64, requires_grad=True)
    seen = []
    z = rule.attach(
        lambda z: 0.5 * z + x,
        torch.full((1, 2), 2.0, dtype=F64),
        lambda r, res: seen.append((r, res)),
        leaves=[x],
    )
    z.sum().backward()
    assert len(seen) == 1 and seen[0][0] is rule and seen[0][1].converged.all()
    torch.testing.assert_close(x.grad, torch.full((1, 2), 2.0, dtype=F64), rtol=1e-10, atol=0)


def test_an_unconverged_adjoint_raises_with_its_summary_and_result():
    rule = il.ImplicitDifferentiation(solver=il.Picard(max_iter=2), on_unconverged="raise")
    x = torch.ones(1, 2, dtype=F64, requires_grad=True)
    deq = il.DEQ(lambda z, x: 0.5 * z + x, solver=TIGHT, backward=rule)
    z, _ = deq(x)
    with pytest.raises(il.ConvergenceError) as caught:
        z.sum().backward()
    result = caught.value.result
    assert isinstance(result, il.SolverResult) and result.status.tolist() == [Status.MAX_ITER]
    assert str(caught.value).endswith(
        "needs only I - J^T invertible.\n" + f"1/1 MAX_ITER: {Status.MAX_ITER.message}"
    )


def test_the_returned_batch_is_measured_in_the_state_dtype():
    # Equal residuals: the earliest iterate is returned and measured again (dense loop), with
    # f's float64 output cast to the float32 state first.
    r = il.fixed_point(lambda z: -z.double(), torch.ones(1, 1), solver=il.Picard(max_iter=3))
    assert r.n_f_evals == 4 and r.z.tolist() == [[1.0]]
    assert r.residual.dtype == torch.float32 and r.residual.tolist() == [2.0]


# --- the current core's outputs and paths ---------------------------------------------------


def test_deq_output_repr_names_the_solution_and_the_result():
    with torch.no_grad():
        out = il.DEQ(lambda z, x: 0.5 * z + x, solver=il.Picard())(torch.ones(1, 1))
    assert repr(out) == f"DEQOutput(z={out.z!r}, result={out.result!r})"


def test_an_f_returning_a_pair_is_pointed_to_has_aux():
    with pytest.raises(ValueError) as caught:
        il.fixed_point(lambda z: (z, z), torch.zeros(2, 3))
    assert str(caught.value).endswith(
        "fixed_point(f, z0, *inputs). If f returns (z_next, aux), construct the DEQ with "
        "has_aux=True."
    )


def test_the_attach_also_refuses_an_f_that_drops_samples():
    # The solve runs without grad; this f drops a sample only in the differentiable call.
    def f(z, x):
        out = 0.5 * z + x
        return out[:1] if torch.is_grad_enabled() else out

    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError) as caught:
        il.DEQ(f, solver=il.Picard())(x)
    assert str(caught.value) == (
        "f returned a batch of 1 samples for a state of 2; f must keep the batch dimension "
        "(one output row per input row)"
    )


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values on the host (as tests/test_overhead_semantics.py)."""

    NAMES = frozenset({"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_deq_passes_host_reads_to_the_solve():
    def reads(host_reads):
        solver = il.Picard(max_iter=24, atol=0.0, rtol=1e-30, check_every=24)
        deq = il.DEQ(lambda z, x: 0.5 * z + x, solver=solver, host_reads=host_reads)
        with torch.no_grad(), HostReads() as counter:
            deq(torch.ones(2, 3, dtype=F64))
        return counter.count

    assert reads(False) <= 2 < 24 <= reads(True)


def test_a_failed_sample_has_no_jacobian_penalty():
    x = torch.tensor([[1.0, 1.0], [float("nan"), 1.0]])
    deq = il.DEQ(lambda z, x: 0.5 * z + x, solver=il.Picard(on_nonfinite="ignore"))
    out = deq(x, jacobian_penalty=2)
    assert out.jacobian_penalty[1].item() == 0.0 and out.jacobian_penalty[0].item() > 0.0


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


@pytest.mark.parametrize("host_reads", [None, False])
def test_a_recorded_state_of_a_stopped_sample_is_its_returned_iterate(host_reads):
    # Sample 1 (rate 3) diverges at k = 3 (residual 27 > 10 x 1) and returns z_0 = 0; sample 0
    # follows z_k = 2 - 2^(1-k).
    rate = torch.tensor([[0.5], [3.0]], dtype=F64)
    solver = il.Picard(max_iter=20, divergence_ratio=10.0, atol=0.0, rtol=1e-30)
    r = il.fixed_point(
        lambda z: rate * z + 1,
        torch.zeros(2, 1, dtype=F64),
        solver=solver,
        states=(0, 2, 8),
        host_reads=host_reads,
    )
    assert r.status.tolist() == [Status.MAX_ITER, Status.DIVERGED] and r.z[1].item() == 0.0
    # At k = 2 sample 1 still runs (z_2 = 4); at k = 8 it has stopped.
    assert [s.flatten().tolist() for s in r.states] == [[0.0, 0.0], [1.5, 4.0], [2 - 2**-7, 0.0]]


def test_tuple_states_are_selected_and_cast_like_tensor_states():
    # The compacted loop on a tuple state: x (batched) is selected as samples stop, the
    # offset (not batched) is not; f sees the state in its own dtype (float16).
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


@pytest.mark.parametrize("m", [2, 3, 4])
def test_a_rejected_extrapolation_takes_the_plain_step_from_its_base(m):
    # As test_overhead_semantics' safeguard test, for every history size that extrapolates.
    solver = il.Anderson(history_size=m, mixing=0.5)
    z0, f0 = torch.zeros(3, 4, dtype=F64), torch.ones(3, 4, dtype=F64)
    state = solver.init(z0)
    z1, state, _ = solver.step(state, z0, f0, 0)
    f1 = z1 + 0.5 * (f0 - z0)
    z2, state, _ = solver.step(state, z1, f1, 1)
    f2 = z2 + 3.0 * (f1 - z1)  # its residual is three times the base's
    z3, state, breakdown = solver.step(state, z2, f2, 2)
    torch.testing.assert_close(z3, torch.lerp(z1, f1, 0.5), atol=1e-15, rtol=0)
    assert not breakdown.any()


def test_an_unconverged_broyden_solve_is_max_iter_not_breakdown():
    f, g = tanh_map()
    r = il.fixed_point(
        f, torch.randn(2, 4, generator=g, dtype=F64), solver=il.Broyden(max_iter=3, **NEVER)
    )
    assert r.status.tolist() == [Status.MAX_ITER] * 2


def test_broyden_flags_stay_on_the_state_device_and_a_breakdown_restarts_with_picard():
    # (Under a meta default device, so that no flag is made off the state's device.)
    f, g = tanh_map()
    z0 = torch.randn(2, 4, generator=g, dtype=F64)
    solver = il.Broyden(history_size=2)
    with torch.device("meta"):
        state, z = solver.init(z0), z0
        for k in range(7):
            z, state, flags = solver.step(state, z, f(z), k)
            assert flags.device == z0.device and not flags.any()
    # A vanishing secant denominator at the second step: a breakdown, and the Picard step.
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


def test_half_precision_gradients_through_the_default_adjoint_keep_the_state_dtype():
    # bfloat16 state, GMRES adjoint (solved in float32): the adjoint result and the gradient
    # come back in bfloat16, at the closed form (I - W^T)^-1 1 = 2 for W = I / 2. (The default
    # rtol 1e-6 is below what bfloat16 products resolve, so the solve reports MAX_ITER; see
    # the report of this change.)
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
