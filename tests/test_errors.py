"""Failure statuses, policies and clear errors for bad input."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import pydoc
import re
import sys
import warnings

import pytest
import torch
from zoo import TanhCell

import implicitlayers as il

F64 = torch.float64


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
        (lambda: il.Picard(damping=0.25), TypeError, "unexpected keyword argument 'damping'"),
        (lambda: il.Broyden(on_max_iter="warn"), TypeError, "keyword argument 'on_max_iter'"),
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


def test_rtol_below_half_precision_warns_with_the_fix_only_when_samples_ran_out():
    # In bfloat16 arithmetic 1 - 0.9 z has no fixed point: at rtol = 1e-4 the iterates cycle
    # above the bound.
    with pytest.warns(il.ConvergenceWarning, match=r"2/2 samples .* rtol=0.0001.*rtol >= 8e-03"):
        il.fixed_point(lambda z: 1 - 0.9 * z, torch.zeros(2, 3, dtype=torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # z* = 2 is one: every sample converges, so nothing is said (it used to warn anyway).
        r = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.bfloat16))
        assert r.converged.all()
        il.fixed_point(
            lambda z: 1 - 0.9 * z,
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


# --- The first release has no rename shims: real signatures, plain keyword errors -------


@pytest.mark.parametrize(
    "cls",
    [
        il.Picard,
        il.Anderson,
        il.Broyden,
        il.AbstractSolver,
        il.JFB,
        il.Neumann,
        il.ImplicitDifferentiation,
        il.PhantomGradient,
        il.NeumannPhantom,
        il.GMRES,
    ],
)
def test_public_classes_show_their_real_signature_and_defaults(cls):
    params = inspect.signature(cls).parameters
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    assert list(params) == list(fields)
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values())
    for name, p in params.items():
        assert p.kind is p.KEYWORD_ONLY and p.default == fields[name].default, name
    assert "(*args, **kwargs)" not in str(inspect.signature(cls))
    assert "(*args, **kwargs)" not in pydoc.render_doc(cls)
    # Sphinx's autodoc reads a class's signature from a __new__ defined anywhere below object
    # before __init__: none may exist.
    assert all("__new__" not in vars(base) for base in cls.__mro__[:-1])


def test_the_defaults_users_need_are_in_the_signatures():
    assert str(inspect.signature(il.Anderson)).startswith(
        "(*, max_iter: 'int' = 50, atol: 'float' = 1e-06, rtol: 'float' = 0.0001"
    )
    rule = inspect.signature(il.ImplicitDifferentiation).parameters["solver"].default
    assert rule == il.GMRES(max_iter=200, rtol=1e-6, atol=1e-10, restart=20)
    assert repr(il.ImplicitDifferentiation()) == "ImplicitDifferentiation(solver=GMRES(atol=1e-10))"
    assert repr(il.ImplicitDifferentiation(on_unconverged="raise")) == (
        "ImplicitDifferentiation(solver=GMRES(atol=1e-10), on_unconverged='raise')"
    )
    assert repr(il.ImplicitDifferentiation(solver="picard")) == (
        "ImplicitDifferentiation(solver=Picard())"
    )


def test_a_misspelt_or_foreign_keyword_is_a_plain_type_error():
    for make, name in (
        (lambda: il.Picard(damping=0.1), "damping"),
        (lambda: il.Anderson(on_max_iter="raise"), "on_max_iter"),
        (lambda: il.Broyden(memory=4), "memory"),
        (lambda: il.PhantomGradient(tau=0.5), "tau"),
    ):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
            make()


def test_a_solver_whose_step_the_loop_cannot_call_is_refused_when_defined():
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


def test_a_plug_in_solver_takes_its_own_fields_as_keywords():
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


# --- Each message is true of the case that raises it, and names a fix that works -----------


def _raised(f, z0, solver, *inputs):
    with pytest.raises(il.ConvergenceError) as caught:
        il.fixed_point(f, z0, *inputs, solver=solver)
    return str(caught.value)


def test_a_sample_the_others_moved_out_of_tolerance_is_not_told_to_raise_max_iter_only():
    # Row 1 improves once (0 -> 1, residual 1 then 0.5), then cycles between 1 and 1.5 at
    # residual 0.5: it uses its whole budget and returns z = 1. Row 0 follows it
    # (f = 1e-3 z_1): it meets the tolerance at z = 0 against z_1 = 0, is reopened as row 1
    # moves and never meets it again, so it returns z = 0; at the returned batch (0, 1) it
    # fails, after fewer than max_iter steps: f couples the samples.
    def coupled(z):
        follow = 1e-3 * z[1:]
        cycle = torch.where(z[1:] < 1.25, 0.5 * z[1:] + 1, 2.5 - z[1:])
        return torch.cat((follow, cycle), dim=0)

    solver = il.Picard(max_iter=10, on_unconverged="raise")
    with pytest.raises(il.ConvergenceError) as caught:
        il.fixed_point(coupled, torch.zeros(2, 1, dtype=F64), solver=solver)
    result, message = caught.value.result, str(caught.value)
    assert result.z.squeeze(1).tolist() == [0.0, 1.0]
    assert result.status.tolist() == [il.Status.UNSETTLED, il.Status.MAX_ITER]
    assert result.n_steps.tolist() == [10, 10]
    assert f"MAX_ITER: {il.Status.MAX_ITER.message}"[:60] not in message  # Picard's own advice
    assert "MAX_ITER: used all max_iter=10 evaluations" in message
    assert f"UNSETTLED: {il.Status.UNSETTLED.message}" in message
    assert "f couples the samples" in result.summary()


def test_max_iter_advice_depends_on_the_solver():
    slow = il.Picard(max_iter=2, on_unconverged="raise")
    assert "use an accelerated solver" in _raised(lambda z: 0.9 * z + 1, torch.zeros(1, 1), slow)
    for cls in (il.Anderson, il.Broyden):
        fast = cls(max_iter=2, on_unconverged="raise")
        message = _raised(lambda z: torch.cos(3 * z), torch.zeros(1, 1), fast)
        assert "MAX_ITER" in message and "accelerated solver" not in message, cls


def test_diverged_under_an_accelerated_solver_names_coupling_and_picard():
    solver = il.Anderson(max_iter=50, divergence_ratio=2.0, on_unconverged="raise")
    message = _raised(lambda z: 3 * z + 1, torch.zeros(1, 1), solver)
    assert "DIVERGED" in message and "try Picard" in message and "couples the samples" in message
    picard = il.Picard(max_iter=50, divergence_ratio=2.0, on_unconverged="raise")
    assert "try Picard" not in _raised(lambda z: 3 * z + 1, torch.zeros(1, 1), picard)


def test_a_one_dimensional_first_input_is_not_silently_a_batch_of_scalars():
    deq = il.DEQ(lambda z, x: 0.5 * z + x)
    with pytest.raises(ValueError, match=r"shape \(16,\).*x\.unsqueeze\(0\).*x\.unsqueeze\(1\)"):
        deq(torch.randn(16))
    # The fixes it names work.
    z, r = deq(torch.ones(16).unsqueeze(0))
    assert z.shape == (1, 16) and r.converged.all()
    z, r = deq(torch.ones(16).unsqueeze(1))
    assert z.shape == (16, 1) and r.converged.all()
