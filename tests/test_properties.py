"""Property tests (hypothesis) and a check that every hyperparameter changes behaviour.

Every solver of the registry (``tests/registry.py``) is drawn, and each of its own options
must change what it does: an option a new solver adds without a value in its registry row
that changes the outcome fails here.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry import SOLVER_ROWS
from zoo import Affine, tanh_map

import implicitlayers as il

SOLVERS = st.sampled_from(SOLVER_ROWS)
FAST = settings(max_examples=25, deadline=None)


@FAST
@given(
    row=SOLVERS,
    n=st.integers(1, 12),
    batch=st.integers(1, 5),
    contraction=st.floats(0.05, 0.9),
    seed=st.integers(0, 10_000),
)
def test_batch_solves_like_each_sample_alone(row, n, batch, contraction, seed):
    problem = Affine.make(n=n, d=2, contraction=contraction, seed=seed, symmetric=seed % 2 == 0)
    x = torch.randn(batch, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    solver = row.make(max_iter=300, atol=0.0, rtol=1e-10)
    together = il.fixed_point(problem, torch.zeros(batch, n, dtype=torch.float64), x, solver=solver)
    for i in range(batch):
        alone = il.fixed_point(
            problem, torch.zeros(1, n, dtype=torch.float64), x[i : i + 1], solver=solver
        )
        assert int(alone.status[0]) == int(together.status[i])
        torch.testing.assert_close(alone.z[0], together.z[i], atol=1e-9, rtol=0)


@FAST
@given(
    row=SOLVERS,
    n=st.integers(1, 16),
    contraction=st.floats(0.05, 0.95),
    atol=st.sampled_from([0.0, 1e-8, 1e-4]),
    rtol=st.sampled_from([1e-2, 1e-5, 1e-9]),
    seed=st.integers(0, 10_000),
)
def test_success_implies_residual_within_tolerance(row, n, contraction, atol, rtol, seed):
    problem = Affine.make(n=n, d=2, contraction=contraction, seed=seed, symmetric=True)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    result = il.fixed_point(
        problem,
        torch.zeros(3, n, dtype=torch.float64),
        x,
        solver=row.make(max_iter=500, atol=atol, rtol=rtol),
    )
    fz = problem(result.z, x)
    residual = torch.linalg.vector_norm(fz - result.z, dim=1)
    ok = residual <= atol + rtol * torch.linalg.vector_norm(fz, dim=1) * (1 + 1e-9) + 1e-15
    assert (ok | ~result.converged).all()
    assert result.converged.all()  # contractive problems with a generous budget converge
    error = torch.linalg.vector_norm(result.z - problem.solution(x), dim=1)
    # A contraction's distance to the fixed point is bounded by residual / (1 - rate).
    assert (error <= residual / (1 - contraction) * (1 + 1e-6) + 1e-12).all()


@FAST
@given(
    row=SOLVERS,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    batch=st.integers(0, 3),
)
def test_any_state_shape_and_dtype_round_trips(row, dtype, shape, batch):
    target = torch.randn(batch, *shape).to(dtype)
    result = il.fixed_point(
        lambda z: 0.5 * (z + target), torch.zeros_like(target), solver=row.make(rtol=1e-5)
    )
    assert result.z.shape == target.shape and result.z.dtype == dtype
    assert result.status.shape == (batch,)
    if batch:
        torch.testing.assert_close(result.z, target, atol=1e-3, rtol=1e-3)


@FAST
@given(bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]), batch=st.integers(1, 4))
def test_non_finite_inputs_never_become_silent_nan(bad, batch):
    x = torch.ones(batch, 3)
    x[0, 1] = bad
    with pytest.raises(il.ConvergenceError, match="NaN or Inf"):
        il.DEQ(lambda z, x: 0.5 * z + x)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = il.fixed_point(
            lambda z, x: 0.5 * z + x,
            torch.zeros(batch, 3),
            x,
            solver=il.Anderson(on_nonfinite="warn"),
        )
    assert torch.isfinite(r.z).all() and r.status[0] == il.Status.NONFINITE


# Each hyperparameter must change what the solver does (deepinv shipped an Anderson option that
# was silently ignored for years). Compare a solver to one differing in a single field.
PROBLEM = Affine.make(n=10, d=2, contraction=0.95, symmetric=True, seed=3)
X = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Z0 = torch.zeros(3, 10, dtype=torch.float64)
EXPANDING, _ = tanh_map(n=10, seed=0, scale=3.0)  # not a contraction: residuals can rise
#: The maps a registry Change names: f(z, x) from Z0 with input X.
MAPS = {
    "affine": lambda z, x: PROBLEM(z, x) * (z.abs().max() < 1e6),
    "expanding tanh": lambda z, x: EXPANDING(z),
}


def outcome(solver, on="affine"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            r = il.fixed_point(MAPS[on], Z0, X, solver=solver)
        except il.ConvergenceError as err:
            return ("raised", type(err).__name__)
    trace = None if r.trace is None else r.trace.shape
    return (r.z.round(decimals=12).tolist(), r.n_steps.tolist(), r.n_f_evals, trace)


#: The options every solver shares, on Picard: each with base options and a changed value.
SHARED = [
    ({}, "max_iter", 7),
    ({"max_iter": 500, "rtol": 1e-8}, "atol", 1e-2),
    ({"max_iter": 500}, "rtol", 1e-2),
    ({"max_iter": 500, "rtol": 1e-8}, "norm", "rms"),
    ({"max_iter": 3}, "on_unconverged", "raise"),
    ({"max_iter": 200}, "trace", True),
    ({"max_iter": 500, "rtol": 1e-6}, "check_every", 8),
]


@pytest.mark.parametrize(("base", "field", "value"), SHARED, ids=[f for _, f, _ in SHARED])
def test_every_shared_option_changes_behaviour(base, field, value):
    assert outcome(il.Picard(**base)) != outcome(il.Picard(**base, **{field: value}))


OWN = [
    pytest.param(row, name, id=f"{row.name}-{name}")
    for row in SOLVER_ROWS
    for name in row.own_fields
]


@pytest.mark.parametrize(("row", "field"), OWN)
def test_every_own_option_of_every_solver_changes_behaviour(row, field):
    assert field in row.own_options, (
        f"tests/registry.py: give {row.name}'s option {field!r} a value that changes its solve"
    )
    change = row.own_options[field]
    changed = row.make(**change.base, **{field: change.value})
    assert outcome(row.make(**change.base), change.on) != outcome(changed, change.on)


def test_divergence_ratio_and_on_nonfinite_change_behaviour():
    grow = lambda z: 2 * z + 1  # noqa: E731
    z0 = torch.zeros(1, 1)
    early = il.fixed_point(grow, z0, solver=il.Picard(max_iter=200))
    late = il.fixed_point(grow, z0, solver=il.Picard(max_iter=200, divergence_ratio=1e30))
    assert early.n_f_evals < late.n_f_evals
    nan = lambda z: z * float("nan")  # noqa: E731
    with pytest.raises(il.ConvergenceError):
        il.fixed_point(nan, torch.ones(1, 1), solver=il.Picard())
    assert (
        il.fixed_point(nan, torch.ones(1, 1), solver=il.Picard(on_nonfinite="ignore")).status[0]
        == 2
    )


JUNK = st.one_of(
    st.none(),
    st.text(max_size=3),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 0),
    st.lists(st.integers(), max_size=2),
)


@FAST
@given(row=SOLVERS, data=st.data())
def test_wrong_argument_values_raise_named_errors(row, data):
    fields = [f.name for f in dataclasses.fields(row.cls) if f.init]
    field = data.draw(st.sampled_from(fields))
    value = data.draw(JUNK)
    try:
        solver = row.make(**{field: value})
    except (TypeError, ValueError) as err:
        assert field in str(err)
        return
    # Accepted values must be valid ones, e.g. atol=0.0, divergence_ratio=None, trace=False.
    assert getattr(solver, field) == value
    assert value is None or isinstance(value, (int, float, str, bool))
    il.fixed_point(lambda z: 0.5 * z, torch.ones(1, 2), solver=solver)
