"""Failure statuses, policies and clear errors for bad input."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import re
import sys
import warnings

import pytest
import torch
from zoo import TanhCell

import implicitlayers as il


def test_non_contractive_map_diverges():
    result = il.fixed_point(lambda z: 2 * z + 1, torch.zeros(3, 2), solver=il.Picard(max_iter=100))
    assert (result.status == il.Status.DIVERGED).all()
    assert result.n_f_evals < 30  # stopped early, not at max_iter
    assert torch.isfinite(result.z).all()


def test_nan_map_raises_with_result_by_default():
    def f(z, x):
        return torch.where(x > 0, float("nan"), 0.5 * z + x)

    x = torch.tensor([[1.0], [-1.0]])
    with pytest.raises(il.ConvergenceError, match="NaN") as info:
        il.fixed_point(f, torch.zeros(2, 1), x, solver=il.Picard())
    result = info.value.result
    assert result.statuses() == [il.Status.NONFINITE, il.Status.SUCCESS]
    assert torch.isfinite(result.z).all()  # best finite iterate, never silent NaN
    ignored = il.fixed_point(f, torch.zeros(2, 1), x, solver=il.Picard(on_nonfinite="ignore"))
    assert ignored.status.tolist() == [il.Status.NONFINITE, il.Status.SUCCESS]


def test_nan_input_is_reported():
    x = torch.tensor([[float("inf")], [1.0]])
    with pytest.raises(il.ConvergenceError, match=r"samples 0\)"):
        il.DEQ(lambda z, x: 0.5 * z + x)(x)


def test_small_budget_is_max_iter_and_policies_apply():
    f = TanhCell()
    x = torch.randn(3, 3, dtype=torch.float64)
    z0 = torch.zeros(3, 5, dtype=torch.float64)
    result = il.fixed_point(f, z0, x, solver=il.Picard(max_iter=2))
    assert (result.status == il.Status.MAX_ITER).all() and (result.n_steps == 2).all()
    with pytest.warns(il.ConvergenceWarning, match="MAX_ITER"):
        il.fixed_point(f, z0, x, solver=il.Picard(max_iter=2, on_unconverged="warn"))
    with pytest.raises(il.ConvergenceError) as info:
        il.fixed_point(f, z0, x, solver=il.Picard(max_iter=2, on_unconverged="raise"))
    assert info.value.result.n_f_evals == 2


def test_anderson_breakdown_is_reported_not_raised():
    # f(z) = z + 1 has no fixed point; all residuals are equal, so Anderson's system is singular.
    solver = il.Anderson(max_iter=20, regularization=0.0, divergence_ratio=None)
    result = il.fixed_point(lambda z: z + 1, torch.zeros(2, 3), solver=solver)
    assert (result.status == il.Status.BREAKDOWN).all()
    assert "regularization" in il.Status.BREAKDOWN.message
    assert "BREAKDOWN" in result.summary()


def test_broyden_breakdown_restarts_and_still_converges():
    # Piecewise map that stalls Broyden's secant (zero step in one coordinate).
    f = lambda z: torch.stack([0.5 * z[:, 0] + 1, torch.zeros_like(z[:, 1])], 1)  # noqa: E731
    result = il.fixed_point(f, torch.zeros(2, 2), solver=il.Broyden(rtol=1e-6))
    assert result.converged.all()
    torch.testing.assert_close(result.z[:, 0], torch.full((2,), 2.0))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: il.Picard(max_iter=0), ValueError, "max_iter must be >= 1, got 0"),
        (lambda: il.Picard(max_iter=2.5), TypeError, "max_iter must be an int"),
        (lambda: il.Anderson(atol=-1.0), ValueError, "atol"),
        (lambda: il.Anderson(rtol=float("nan")), ValueError, "rtol must be finite"),
        (lambda: il.Anderson(atol=0.0, rtol=0.0), ValueError, "at least one positive"),
        (lambda: il.Anderson(history_size=0), ValueError, "history_size"),
        (lambda: il.Anderson(mixing=0.0), ValueError, "mixing"),
        (lambda: il.Anderson(regularization=-1e-3), ValueError, "regularization"),
        (lambda: il.Picard(mixing=0.0), ValueError, "mixing"),
        (lambda: il.Picard(norm="L2"), ValueError, "norm must be one of 'l2', 'rms', got 'L2'"),
        (lambda: il.Picard(damping=0.25), TypeError, r"pass mixing=0.75 \(mixing = 1 - damping"),
        (lambda: il.Picard(damping="x"), TypeError, "pass mixing = 1 - damping"),
        (lambda: il.Broyden(on_max_iter="warn"), TypeError, "pass on_unconverged='warn'"),
        (lambda: il.Broyden(history_size=0), ValueError, "history_size"),
        (lambda: il.Picard(on_unconverged="loud"), ValueError, "'ignore', 'warn', 'raise'"),
        (lambda: il.Picard(divergence_ratio=1.0), ValueError, "divergence_ratio"),
        (lambda: il.Picard(check_every=0), ValueError, "check_every"),
        (lambda: il.Neumann(terms=-1), ValueError, "terms must be >= 0, got -1"),
        (lambda: il.Anderson(stop_mode="rel"), TypeError, "stop_mode"),
        (lambda: il.Anderson(50), TypeError, "positional"),
        (lambda: il.DEQ(TanhCell(), solver="andersen"), ValueError, "'picard', 'anderson'"),
        (lambda: il.DEQ(TanhCell(), backward="exact"), ValueError, "'jfb', 'neumann'"),
        (lambda: il.DEQ(TanhCell(), backward=il.JFB), TypeError, "write JFB()"),
        (lambda: il.DEQ(TanhCell(), solver=3), TypeError, "solver must be"),
        (lambda: il.DEQ(TanhCell(), tol=1e-3), TypeError, "tol"),
        (lambda: il.DEQ(42), TypeError, "callable"),
        (lambda: il.ImplicitDifferentiation(solver="newton"), ValueError, "'broyden'"),
    ],
)
def test_bad_configuration_is_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_shape_mismatch_names_both_shapes_and_the_fix():
    f = lambda z, x: torch.cat([z, z], dim=1)  # noqa: E731
    with pytest.raises(ValueError, match=r"\(B, 6\).*\(B, 3\).*z0"):
        il.fixed_point(f, torch.zeros(2, 3), torch.zeros(2, 3))
    lin = torch.nn.Linear(3, 5)
    # f's own error keeps its type; the hint rides along as a note.
    with pytest.raises(RuntimeError, match="cannot be multiplied") as caught:
        il.DEQ(lambda z, x: torch.tanh(z @ torch.eye(5) + lin(x)))(torch.zeros(2, 3))
    if sys.version_info >= (3, 11):
        assert re.search(r"default z0.*\(2, 3\).*pass z0", " ".join(caught.value.__notes__))
    with pytest.raises(ValueError, match=r"(?i)pass z0"):
        il.DEQ(lambda z, x: torch.tanh(lin(x)))(torch.zeros(2, 3))


@pytest.mark.parametrize(
    "error",
    [torch.cuda.OutOfMemoryError("CUDA out of memory"), RuntimeError("boom"), KeyError("k")],
)
def test_errors_raised_by_f_keep_their_type_and_message(error):
    def f(z, x):
        raise error

    with pytest.raises(type(error)) as caught:
        il.DEQ(f)(torch.zeros(2, 3))
    assert caught.value is error
    assert not getattr(caught.value, "__notes__", [])  # no shape hint where shape is not the cause


def test_z0_whose_batch_differs_from_the_input_is_named():
    with pytest.raises(ValueError, match=r"z0 has batch size 5 but the first input has 4"):
        il.DEQ(torch.nn.Linear(3, 3))(torch.zeros(4, 3), z0=torch.zeros(5, 3))


def test_convergence_error_survives_pickling():
    with pytest.raises(il.ConvergenceError) as caught:
        il.fixed_point(lambda z: z * float("nan"), torch.ones(2, 1))
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is il.ConvergenceError and str(copy) == str(caught.value)
    assert torch.equal(copy.result.status, caught.value.result.status)


def test_rtol_below_half_precision_warns_with_the_fix():
    with pytest.warns(il.ConvergenceWarning, match=r"rtol=0.0001 .*bfloat16.*rtol >= 8e-03"):
        il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        il.fixed_point(
            lambda z: 0.5 * z + 1,
            torch.zeros(2, 3, dtype=torch.bfloat16),
            solver=il.Anderson(rtol=1e-2),
        )


def test_bad_states_are_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        il.fixed_point(lambda z: z, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch dimension"):
        il.fixed_point(lambda z: z, torch.tensor(1.0))
    with pytest.raises(ValueError, match="batch size"):
        il.fixed_point(lambda z: z, (torch.zeros(2, 3), torch.zeros(3, 3)))
    with pytest.raises(ValueError, match="dtype and device"):
        il.fixed_point(lambda z: z, (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)))
    with pytest.raises(TypeError, match="callable"):
        il.fixed_point(None, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="z0"):
        il.DEQ(lambda z, s: z)("not a tensor")


def test_hyperparameter_objects_compare_print_and_pickle():
    a = il.Anderson(max_iter=20, history_size=3)
    assert a == il.Anderson(max_iter=20, history_size=3) != il.Anderson()
    assert repr(a) == "Anderson(max_iter=20, history_size=3)"
    for obj in (
        a,
        il.Picard(mixing=0.5, norm="rms"),
        il.Broyden(history_size=3),
        il.JFB(),
        il.Neumann(terms=2),
        il.ImplicitDifferentiation(solver=il.Broyden(rtol=1e-6)),
    ):
        assert pickle.loads(pickle.dumps(obj)) == obj
    with pytest.raises(AttributeError):
        a.max_iter = 3  # type: ignore[misc]
    assert copy.deepcopy(a) == a and dataclasses.replace(a, mixing=0.5) == il.Anderson(
        max_iter=20, history_size=3, mixing=0.5
    )


# --- Names renamed before 1.0 say what to pass now ------------------------------------------


def test_renamed_keywords_say_what_to_pass_and_leave_the_dataclass_alone():
    with pytest.raises(TypeError, match=r"^Picard's 'damping' was renamed: pass mixing=0\.9 "):
        il.Picard(damping=0.1)
    # A solver the default one converts exactly: damping 0.25 is mixing 0.75.
    with pytest.raises(TypeError, match=r"pass mixing=0\.75"):
        il.Picard(max_iter=3, damping=0.25)
    for cls in (il.Picard, il.Anderson, il.Broyden):
        with pytest.raises(TypeError, match=rf"^{cls.__name__}'s 'on_max_iter' was renamed"):
            cls(on_max_iter="raise")
    # Anderson never had a damping, but its weight is the same mixing.
    with pytest.raises(TypeError) as caught:
        il.Anderson(damping=0.25)
    assert str(caught.value) == (
        "Anderson's 'damping' is not a keyword (Anderson's weight is mixing, the weight of "
        "f(z)): pass mixing=0.75 (mixing = 1 - damping: mixing is the weight of f(z), "
        "z_next = (1 - mixing) z + mixing f(z), as in Picard and PhantomGradient)"
    )
    # The signature, fields and repr are the dataclass's own.
    params = inspect.signature(il.Picard).parameters
    assert "mixing" in params and "on_unconverged" in params and "damping" not in params
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert [f.name for f in dataclasses.fields(il.Picard)][-1] == "mixing"
    assert repr(il.Picard(mixing=0.5, on_unconverged="warn")) == (
        "Picard(on_unconverged='warn', mixing=0.5)"
    )


def test_a_plug_in_solver_may_have_a_field_with_a_renamed_name():
    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Damped(il.AbstractSolver):
        damping: float = 0.5
        on_max_iter: int = 3

        def init(self, z):
            return {}

        def step(self, state, z, fz, iteration):
            return torch.lerp(fz, z, self.damping), state, None

    solver = Damped(damping=0.75, on_max_iter=4, max_iter=200)
    assert (solver.damping, solver.on_max_iter) == (0.75, 4)
    r = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(1, 1), solver=solver)
    assert r.converged.all()


def test_a_solver_written_for_the_former_step_and_step_at_is_refused_when_defined():
    with pytest.raises(TypeError, match=r"Old defines step_at\(iteration, state, z, fz\); step_at"):

        class Old(il.AbstractSolver):
            def init(self, z):
                return {}

            def step_at(self, iteration, state, z, fz):
                return fz, state, None

    with pytest.raises(
        TypeError,
        match=r"Older\.step takes 3 arguments after self; .* step\(self, state, z, fz, iteration\)",
    ):

        class Older(il.AbstractSolver):
            def init(self, z):
                return {}

            def step(self, state, z, fz):
                return fz, state, None

    class Flexible(il.AbstractSolver):  # *args takes the iteration too
        def init(self, z):
            return {}

        def step(self, state, z, fz, *rest):
            return fz, state, None

    r = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(1, 1), solver=Flexible(rtol=1e-8))
    # Residuals 2^-k: 2^-20 <= atol + rtol |f(z)| = 1e-6 + 2e-8 first, after 21 evaluations.
    assert r.converged.all() and r.n_steps.tolist() == [21]


def test_broydens_old_memory_keyword_says_what_to_pass():
    with pytest.raises(TypeError, match=r"Broyden's 'memory' was renamed: pass history_size=4 "):
        il.Broyden(memory=4)
