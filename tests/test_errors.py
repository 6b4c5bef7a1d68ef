"""What a user is told: every error, warning and status message, worded exactly.

Bad configuration raises at construction, naming the argument, the value and the fix; a
plug-in solver that breaks the driver loop's contract is named once per solve; a failed
solve's message says what happened to which samples and what to try, suited to the solver
that ran; warnings point at the caller's line.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
import pickle
import pydoc
import re
import sys
import warnings

import pytest
import torch
from registry import PATH_PARAMS, RULE_ROWS, SOLVER_ROWS
from zoo import TanhCell, half_plus_one

import implicitlayers as il
from implicitlayers import Status
from implicitlayers.solvers import AbstractSolver

F64 = torch.float64


# --- Configuration ----------------------------------------------------------------------------


#: Bad hyperparameters, raised at construction: (make, error, message).
CONFIGURATION_ERRORS = [
    (lambda: il.Picard(max_iter=0), ValueError, "max_iter must be >= 1, got 0"),
    (lambda: il.Picard(max_iter=2.5), TypeError, "max_iter must be an int, got 2.5 (float)"),
    (lambda: il.Picard(atol=-0.001), ValueError, "atol must lie in [0.0, inf], got -0.001"),
    (lambda: il.Anderson(atol=-1.0), ValueError, "atol must lie in [0.0, inf], got -1.0"),
    (lambda: il.Picard(rtol=-0.001), ValueError, "rtol must lie in [0.0, inf], got -0.001"),
    (lambda: il.Anderson(rtol=float("nan")), ValueError, "rtol must be finite, got nan"),
    (
        lambda: il.Picard(atol=0.0, rtol=0.0),
        ValueError,
        "atol and rtol are both 0, so no iterate can converge in floating point; make at "
        "least one positive (e.g. rtol=1e-4)",
    ),
    (lambda: il.Picard(norm="L2"), ValueError, "norm must be one of 'l2', 'rms', got 'L2'"),
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
    (lambda: il.Anderson(safeguard="yes"), TypeError, "safeguard must be a bool, got 'yes'"),
    (lambda: il.Broyden(history_size=0), ValueError, "history_size must be >= 1, got 0"),
    (lambda: il.Neumann(terms=-1), ValueError, "terms must be >= 0, got -1"),
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
    (
        lambda: il.DEQ(TanhCell(), backward=il.JFB),
        TypeError,
        "backward must be an instance, got the class JFB; write JFB() (with its hyperparameters)",
    ),
    (
        lambda: il.DEQ(TanhCell(), solver=3),
        TypeError,
        "solver must be an AbstractSolver instance or one of 'picard', 'anderson', "
        "'broyden', got 3 (int)",
    ),
    (lambda: il.DEQ(42), TypeError, "f must be an nn.Module or callable f(z, *inputs), got 42"),
    (
        lambda: il.DEQ(half_plus_one, independent_samples=1),
        TypeError,
        "independent_samples must be a bool, got 1",
    ),
    (lambda: il.DEQ(half_plus_one, has_aux=1), TypeError, "has_aux must be a bool, got 1"),
    (
        lambda: il.DEQ(TanhCell(), host_reads="no"),
        TypeError,
        "host_reads must be None, True or False, got 'no'",
    ),
]


def test_the_bounds_themselves_are_accepted():
    # The closed ends of each interval, and values a wrong bound would refuse.
    il.Picard(max_iter=1, atol=0.0, rtol=1e-9, mixing=1.0, check_every=1, divergence_ratio=1.5)
    il.Picard(atol=1e-9, rtol=0.0, divergence_ratio=None, mixing=0.01)
    il.Anderson(history_size=1, mixing=1.0, regularization=0.0)
    il.Anderson(mixing=1e-9)
    il.Broyden(history_size=1)


def test_a_misspelt_foreign_or_positional_argument_is_a_plain_type_error():
    for make, name in (
        (lambda: il.Picard(damping=0.1), "damping"),
        (lambda: il.Anderson(on_max_iter="raise"), "on_max_iter"),
        (lambda: il.Broyden(on_max_iter="warn"), "on_max_iter"),
        (lambda: il.Anderson(stop_mode="rel"), "stop_mode"),
        (lambda: il.Broyden(memory=4), "memory"),
        (lambda: il.PhantomGradient(tau=0.5), "tau"),
        (lambda: il.DEQ(TanhCell(), tol=1e-3), "tol"),
    ):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
            make()
    with pytest.raises(TypeError, match="positional"):
        il.Anderson(50)


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


def test_the_adjoint_solver_is_named_or_an_object_of_either_family():
    assert il.ImplicitDifferentiation(solver="GMRES").solver == il.GMRES(
        max_iter=200, rtol=1e-6, atol=1e-10, restart=20
    )
    assert il.ImplicitDifferentiation(solver="broyden").solver == il.Broyden()
    with pytest.raises(TypeError) as caught:
        il.ImplicitDifferentiation(solver=il.JFB())
    assert str(caught.value) == (
        "solver must be an AbstractLinearSolver or AbstractSolver instance or one of 'gmres', "
        "'picard', 'anderson', 'broyden', got JFB() (JFB)"
    )


def test_a_linear_solver_as_the_forward_solver_points_to_implicit_differentiation():
    f = lambda z, b: 0.5 * z + b  # noqa: E731
    for make in (
        lambda: il.DEQ(f, solver=il.GMRES()),
        lambda: il.fixed_point(f, torch.zeros(1, 2), torch.ones(1, 2), solver=il.GMRES()),
    ):
        with pytest.raises(TypeError) as caught:
            make()
        assert str(caught.value) == (
            "solver must be an AbstractSolver instance or one of 'picard', 'anderson', "
            "'broyden', got GMRES(), which is a linear solver: it solves the adjoint system "
            "(I - J^T) u = g of implicit differentiation, not the forward fixed point. Pass it "
            "as ImplicitDifferentiation(solver=GMRES()) (DEQ(f, backward=...)) and choose a "
            "fixed-point solver here, e.g. Anderson()"
        )
    with pytest.raises(TypeError) as caught:
        il.fixed_point(f, torch.zeros(1, 2), torch.ones(1, 2), solver=il.JFB())
    assert str(caught.value) == (
        "solver must be an AbstractSolver instance or one of 'picard', 'anderson', 'broyden', "
        "got JFB() (JFB)"
    )


def test_hyperparameter_objects_compare_print_and_pickle():
    a = il.Anderson(max_iter=20, history_size=3)
    assert a == il.Anderson(max_iter=20, history_size=3) != il.Anderson()
    assert repr(a) == "Anderson(max_iter=20, history_size=3)"
    assert repr(il.Anderson(norm="rms")) == "Anderson(norm='rms')" and il.Picard().norm == "l2"
    registered = [row.make() for row in SOLVER_ROWS] + [row.rule for row in RULE_ROWS]
    for obj in (
        *registered,
        a,
        il.Picard(mixing=0.5, norm="rms"),
        il.Broyden(history_size=3),
        il.Neumann(terms=2),
        il.ImplicitDifferentiation(solver=il.Broyden(rtol=1e-6)),
    ):
        assert pickle.loads(pickle.dumps(obj)) == obj
        assert copy.deepcopy(obj) == obj
    with pytest.raises(AttributeError):
        a.max_iter = 3  # type: ignore[misc]
    assert dataclasses.replace(a, mixing=0.5) == il.Anderson(
        max_iter=20, history_size=3, mixing=0.5
    )


PUBLIC_CLASSES = sorted(
    {row.cls for row in SOLVER_ROWS}
    | {type(row.rule) for row in RULE_ROWS}
    | {il.AbstractSolver, il.GMRES, il.linear.CG},
    key=lambda cls: cls.__name__,
)


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=[cls.__name__ for cls in PUBLIC_CLASSES])
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


# --- Calls ------------------------------------------------------------------------------------


#: Bad arguments of a call: (make, error, message).
CALL_ERRORS = [
    (
        lambda: il.fixed_point(3, torch.zeros(1, 1)),
        TypeError,
        "f must be callable as f(z, *inputs), got int",
    ),
    (
        lambda: il.fixed_point(None, torch.zeros(2, 3)),
        TypeError,
        "f must be callable as f(z, *inputs), got NoneType",
    ),
    (
        lambda: il.fixed_point(half_plus_one, torch.zeros(1, 1), independent_samples=1),
        TypeError,
        "independent_samples must be a bool, got 1",
    ),
    (
        lambda: il.fixed_point(half_plus_one, torch.zeros(1, 1), host_reads="sometimes"),
        TypeError,
        "host_reads must be None, True or False, got 'sometimes'",
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
        lambda: il.fixed_point(lambda z: z, torch.tensor(1.0)),
        ValueError,
        "a state tensor needs a leading batch dimension, got a 0-d tensor; use shape "
        "(B, ...) with B = 1 for a single sample",
    ),
    (
        lambda: il.fixed_point(lambda z: z, (torch.zeros(2, 3), torch.zeros(3, 3))),
        ValueError,
        "all state tensors must share the batch size, got sizes [2, 3]",
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
    (
        lambda: il.fixed_point(half_plus_one, torch.zeros(1, 1), states=(-1,)),
        ValueError,
        "states must hold iteration indices k >= 0 (ints), got -1 in (-1,)",
    ),
    (
        lambda: il.fixed_point(half_plus_one, torch.zeros(1, 1), states=5),
        TypeError,
        "states must be a sequence of iteration indices, e.g. (5, 10, 20), got 5",
    ),
    (
        lambda: il.DEQ(half_plus_one)(1.0),
        TypeError,
        "DEQ needs z0 when its first input is not a tensor: call deq(*inputs, z0=...)",
    ),
    (
        lambda: il.DEQ(lambda z, x: 0.5 * z + x)(torch.ones(1, 1), spectral_radius=1),
        TypeError,
        "spectral_radius must be a bool, got 1",
    ),
    (
        lambda: il.DEQ(lambda z, x: 0.5 * z + x)(torch.ones(2, 3), jacobian_penalty=-1),
        ValueError,
        "jacobian_penalty must be >= 0 probes, got -1",
    ),
    (
        lambda: il.DEQ(lambda z, x: 0.5 * z + x)(torch.ones(2, 3), jacobian_penalty=True),
        TypeError,
        "jacobian_penalty must be an int (the number of probes; 0 for none), got True",
    ),
    (
        lambda: il.DEQ(lambda z, x: 0.5 * z + x)(torch.ones(2, 3), jacobian_penalty=1.5),
        TypeError,
        "jacobian_penalty must be an int (the number of probes; 0 for none), got 1.5",
    ),
    (
        lambda: il.DEQ(lambda z, x: 0.5 * z + x)(torch.ones(1, 2), normalize_penalty=True),
        ValueError,
        "normalize_penalty=True normalises the Jacobian penalty, but jacobian_penalty=0 "
        "computes none: pass jacobian_penalty=k (k >= 1 probes) as well",
    ),
    (
        lambda: il.DEQ(lambda z, x: 0.5 * z + x)(
            torch.ones(1, 2), jacobian_penalty=1, normalize_penalty=1
        ),
        TypeError,
        "normalize_penalty must be a bool, got 1",
    ),
    (
        lambda: il.DEQ(lambda z, x: 0.5 * z + x, has_aux=True)(torch.ones(1, 1)),
        TypeError,
        "DEQ(f, has_aux=True) needs f to return a pair (z_next, aux), got Tensor; return "
        "(z_next, aux) or pass has_aux=False",
    ),
]


@pytest.mark.parametrize(("make", "error", "message"), CONFIGURATION_ERRORS + CALL_ERRORS)
def test_configuration_and_call_errors_are_worded_exactly(make, error, message):
    with pytest.raises(error) as caught:
        make()
    assert str(caught.value) == message


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
    # A first input with a batch: its rows against z0's, with the fix.
    deq = il.DEQ(lambda z, x: 0.5 * z + x[:, None])
    with pytest.raises(ValueError) as caught:
        deq(torch.ones(4, dtype=F64), z0=z0)
    assert str(caught.value) == (
        "z0 has batch size 3 but the first input has 4 (shape (4,)); pass z0 with one row per "
        "sample, e.g. z0=torch.zeros(4, ...)"
    )
    with pytest.raises(ValueError) as caught:
        il.DEQ(torch.nn.Linear(3, 3))(torch.zeros(4, 3), z0=torch.zeros(5, 3))
    assert str(caught.value) == (
        "z0 has batch size 5 but the first input has 4 (shape (4, 3)); pass z0 with one row "
        "per sample, e.g. z0=torch.zeros(4, ...)"
    )


def test_a_one_dimensional_first_input_is_not_silently_a_batch_of_scalars():
    deq = il.DEQ(lambda z, x: 0.5 * z + x)
    with pytest.raises(ValueError, match=r"shape \(16,\).*x\.unsqueeze\(0\).*x\.unsqueeze\(1\)"):
        deq(torch.randn(16))
    # The fixes it names work.
    z, r = deq(torch.ones(16).unsqueeze(0))
    assert z.shape == (1, 16) and r.converged.all()
    z, r = deq(torch.ones(16).unsqueeze(1))
    assert z.shape == (16, 1) and r.converged.all()


def test_f_returning_another_structure_is_named():
    z0 = torch.zeros(2, 3)
    with pytest.raises(ValueError) as caught:
        il.fixed_point(lambda z: "oops", z0)
    assert str(caught.value).startswith("f returned str, expected ")
    message = (
        "f(z, *inputs) returned (B, 2) for a state of structure (B, 3). A fixed point needs f "
        "to map a state to a state of the same structure: if z0 was taken by default (zeros "
        "like the first input), pass z0 with the state's structure, deq(*inputs, z0=...), "
        "fixed_point(f, z0, *inputs)."
    )
    with pytest.raises(ValueError) as caught:
        il.fixed_point(lambda z: z[:, :2], z0)
    assert str(caught.value) == message
    # From a DEQ whose default z0 is the input's shape.
    with pytest.raises(ValueError) as caught:
        il.DEQ(lambda z, x: x[:, :2])(torch.zeros(2, 3))
    assert str(caught.value) == message
    # A tuple state whose second part comes back with the first part's shape.
    x = torch.zeros(3, 2, dtype=F64)
    z0t = (torch.zeros(3, 2, dtype=F64), torch.zeros(3, 3, 2, dtype=F64))
    with pytest.raises(ValueError, match="returned"):
        il.fixed_point(lambda z, x: (0.5 * z[0] + x, z[0]), z0t, x)
    # The same sizes in another order: the layout, not z0, is what to fix.
    with pytest.raises(ValueError) as caught:
        il.fixed_point(lambda z: z.transpose(1, 2), torch.zeros(2, 3, 4))
    assert str(caught.value) == (
        "f(z, *inputs) returned (B, 4, 3) for a state of structure (B, 3, 4). The same sizes "
        "in another order: f must return the state in the layout it is given (a transpose or "
        "permute inside f, undone before it returns?)."
    )


def test_an_f_returning_a_pair_is_pointed_to_has_aux():
    with pytest.raises(ValueError) as caught:
        il.fixed_point(lambda z: (z, z), torch.zeros(2, 3))
    assert str(caught.value).endswith(
        "fixed_point(f, z0, *inputs). If f returns (z_next, aux), construct the DEQ with "
        "has_aux=True."
    )
    with pytest.raises(ValueError, match="has_aux=True"):
        il.DEQ(lambda z, x: (0.5 * z + x, z.sum()))(torch.randn(2, 3))


def test_an_f_that_drops_samples_is_an_error_not_a_broadcast_success():
    message = (
        "f returned a batch of 1 samples for a state of 3; f must keep the batch dimension "
        "(one output row per input row)"
    )
    x = torch.randn(3, 4)
    for z0, f in (
        (torch.zeros(3, 4), lambda z, x: (0.5 * z + x)[:1]),
        ((torch.zeros(3, 4),), lambda z, x: ((0.5 * z[0] + x)[:1],)),
    ):
        with pytest.raises(ValueError) as caught:
            il.fixed_point(f, z0, x)
        assert str(caught.value) == message
    with pytest.raises(ValueError) as caught:
        il.DEQ(lambda z, x: (0.5 * z + x)[:1])(x)
    assert str(caught.value) == message

    # The solve runs without grad; this f drops a sample only in the differentiable call.
    def attach_only(z, x):
        out = 0.5 * z + x
        return out[:1] if torch.is_grad_enabled() else out

    with pytest.raises(ValueError) as caught:
        il.DEQ(attach_only, solver=il.Picard())(torch.ones(3, 4, requires_grad=True))
    assert str(caught.value) == message


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
    # f's own error keeps its type and message; the hint rides along.
    lin = torch.nn.Linear(3, 5)
    with pytest.raises(RuntimeError, match="cannot be multiplied") as caught:
        il.DEQ(lambda z, x: torch.tanh(z @ torch.eye(5) + lin(x)))(torch.zeros(2, 3))
    if sys.version_info >= (3, 11):
        assert re.search(r"default z0.*\(2, 3\).*pass z0", " ".join(caught.value.__notes__))


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


# --- A plug-in solver that breaks the loop's contract -----------------------------------------


def affine(z, b):
    return 0.5 * z + b


B, N = 6, 40


def _solve(solver, **kwargs):
    return il.fixed_point(
        affine, torch.zeros(B, N, dtype=F64), torch.ones(B, N, dtype=F64), solver=solver, **kwargs
    )


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class Returns(AbstractSolver):
    """A solver whose step returns the given kinds of ``z_next`` and ``breakdown``."""

    z_next: str = "f(z)"
    breakdown: object = None

    def init(self, z):
        return {}

    def step(self, state, z, fz, iteration):
        z_next = {"f(z)": fz, "list": fz.tolist(), "short": fz[:, :-1]}[self.z_next]
        breakdown = torch.zeros(z.shape[0]) if self.breakdown == "float" else self.breakdown
        return z_next, state, breakdown


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_what_a_step_returns_is_checked_once_per_solve_on_every_path(path):
    breakdown = (
        "it must be a (6,) bool tensor marking the samples whose internal system broke down "
        "this step, or None for a solver that cannot break down (e.g. breakdown = "
        "denominator.abs() <= tiny)"
    )
    for solver, error, message in (
        (
            Returns(z_next="short"),
            ValueError,
            "Returns.step returned z_next of shape (6, 39); expected (6, 40)",
        ),
        (
            Returns(z_next="list"),
            TypeError,
            "Returns.step must return (z_next, state, breakdown) with z_next a tensor, got "
            "z_next of type list",
        ),
        (
            Returns(breakdown="float"),
            TypeError,
            f"Returns.step returned breakdown as a torch.float32 tensor of shape (6,); {breakdown}",
        ),
        (
            Returns(breakdown=[False] * 6),
            TypeError,
            "Returns.step returned breakdown as [False, False, False, False, False, False] "
            f"(list); {breakdown}",
        ),
    ):
        with pytest.raises(error) as caught:
            _solve(solver, **path.options)
        assert str(caught.value) == message


def test_a_state_the_running_rows_cannot_select_is_named():
    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Listed(AbstractSolver):
        def init(self, z):
            return [z]

        def step(self, state, z, fz, iteration):
            return fz, state, None

    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Hyper(Listed):
        def init(self, z):
            return {"m": 3}

    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Counter(Listed):
        def init(self, z):
            return {"history": torch.zeros(z.shape[0], 3), "k": torch.zeros(())}

        def step(self, state, z, fz, iteration):
            return fz, {**state, "k": state["k"] + 1}, None

    for solver, error, message in (
        (
            Listed(),
            TypeError,
            "Listed.init must return a dict of tensors (a SolverState), got list",
        ),
        (
            Hyper(),
            TypeError,
            "Hyper.init returned state['m'] of type int; every state entry must be a tensor with "
            "the batch as its leading dimension (keep hyperparameters on the solver, not in its "
            "state)",
        ),
        (
            Counter(),
            ValueError,
            "Counter.init returned state['k'] of shape (); with independent_samples=True every "
            "state tensor needs the batch (6) as its leading dimension, so that the loop can "
            "drop the rows of samples that stopped: give it shape (6, ...) (a per-solve constant "
            "c can be c.expand(6, ...), which costs no memory)",
        ),
    ):
        with pytest.raises(error) as caught:
            _solve(solver, independent_samples=True)
        assert str(caught.value) == message
    # All rows never select state rows: such a state works there, and gives the answer.
    result = _solve(Counter(max_iter=200, rtol=1e-12, atol=0.0))
    assert bool(result.converged.all())
    torch.testing.assert_close(result.z, torch.full((B, N), 2.0, dtype=F64), rtol=1e-10, atol=0)


def test_a_step_the_loop_cannot_call_is_refused_when_the_class_is_defined():
    with pytest.raises(TypeError) as caught:

        class Older(AbstractSolver):
            def init(self, z):
                return {}

            def step(self, state, z, fz):
                return fz, state, None

    assert str(caught.value) == (
        "Older.step takes 3 arguments after self; the driver loop calls it with four: "
        "def step(self, state, z, fz, iteration) (ignore iteration if you do not need it)"
    )
    with pytest.raises(TypeError) as caught:

        class KeywordOnly(AbstractSolver):
            def init(self, z):
                return {}

            def step(self, state, z, fz, *, iteration):
                return fz, state, None

    assert str(caught.value) == (
        "KeywordOnly.step takes iteration as a keyword-only parameter; the driver loop passes "
        "it positionally, so iteration must be a positional parameter: "
        "def step(self, state, z, fz, iteration)"
    )

    class Flexible(AbstractSolver):  # *args takes the iteration too
        def init(self, z):
            return {}

        def step(self, state, z, fz, *rest):
            return fz, state, None

    r = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(1, 1), solver=Flexible(rtol=1e-8))
    # Residuals 2^-k: 2^-20 <= atol + rtol |f(z)| = 1e-6 + 2e-8 first, after 21 evaluations.
    assert r.converged.all() and r.n_steps.tolist() == [21]


def test_the_shared_options_are_validated_without_super_post_init():
    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Forgetful(AbstractSolver):
        def __post_init__(self):
            pass  # no super().__post_init__()

        def init(self, z):
            return {}

        def step(self, state, z, fz, iteration):
            return fz, state, None

    with pytest.raises(ValueError) as caught:
        Forgetful(max_iter=0, rtol=-1.0)
    assert str(caught.value) == "max_iter must be >= 1, got 0"
    with pytest.raises(ValueError) as caught:
        Forgetful(rtol=-1.0)
    assert str(caught.value) == "rtol must lie in [0.0, inf], got -1.0"
    # dataclasses.replace constructs anew, and is checked too.
    with pytest.raises(ValueError) as caught:
        dataclasses.replace(Forgetful(), check_every=0)
    assert str(caught.value) == "check_every must be >= 1, got 0"


def test_the_shared_options_are_validated_for_a_plain_subclass():
    class Plain(AbstractSolver):  # not a dataclass: a hand-written __init__
        def __init__(self, momentum=0.5, **kwargs):
            object.__setattr__(self, "momentum", momentum)
            for name, value in kwargs.items():
                object.__setattr__(self, name, value)

        def init(self, z):
            return {}

        def step(self, state, z, fz, iteration):
            return fz, state, None

    with pytest.raises(ValueError) as caught:
        Plain(norm="linf")
    assert str(caught.value) == "norm must be one of 'l2', 'rms', got 'linf'"
    assert Plain(max_iter=7).max_iter == 7


def test_plug_ins_take_their_own_fields_as_keywords():
    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Damped(AbstractSolver):
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

    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Tau(il.backward.AbstractBackward):
        tau: float = 0.5

        def adjoint(self, vjp, grad):
            return self.tau * grad, None

    assert Tau(tau=0.25).tau == 0.25


# --- A failed solve's message ---------------------------------------------------------------------


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


def _raised(f, z0, solver, *inputs):
    with pytest.raises(il.ConvergenceError) as caught:
        il.fixed_point(f, z0, *inputs, solver=solver)
    return str(caught.value)


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


def test_a_small_budget_is_max_iter_and_the_policies_apply():
    f = TanhCell()
    x = torch.randn(3, 3, dtype=F64)
    z0 = torch.zeros(3, 5, dtype=F64)
    result = il.fixed_point(f, z0, x, solver=il.Picard(max_iter=2))
    assert (result.status == Status.MAX_ITER).all() and (result.n_steps == 2).all()
    with pytest.warns(il.ConvergenceWarning, match="MAX_ITER"):
        il.fixed_point(f, z0, x, solver=il.Picard(max_iter=2, on_unconverged="warn"))
    with pytest.raises(il.ConvergenceError) as info:
        il.fixed_point(f, z0, x, solver=il.Picard(max_iter=2, on_unconverged="raise"))
    assert info.value.result.n_f_evals == 2


def test_a_non_finite_input_is_reported_with_its_sample():
    x = torch.tensor([[float("inf")], [1.0]])
    with pytest.raises(il.ConvergenceError, match=r"samples 0\)"):
        il.DEQ(lambda z, x: 0.5 * z + x)(x)


def test_the_convergence_error_survives_pickling():
    with pytest.raises(il.ConvergenceError) as caught:
        il.fixed_point(lambda z: z * float("nan"), torch.ones(2, 1))
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is il.ConvergenceError and str(copy) == str(caught.value)
    assert torch.equal(copy.result.status, caught.value.result.status)


def test_the_summary_has_one_line_per_status_in_status_order():
    one = il.fixed_point(half_plus_one, torch.zeros(1, 1), solver=il.Picard(max_iter=200))
    assert one.summary() == f"1/1 SUCCESS: {Status.SUCCESS.message}"
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


def test_a_linear_solve_summary_speaks_of_the_linear_system():
    A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=F64)
    b = torch.tensor([[0.0, 1.0]], dtype=F64)  # not an eigenvector: one step cannot solve it
    done = il.GMRES().solve(lambda x: x @ A.T, b)
    assert done.linear and done.summary() == (
        "1/1 SUCCESS: Converged: ||b - A z|| <= atol + rtol * ||b||."
    )
    short = il.GMRES(max_iter=2, restart=1).solve(lambda x: x @ A.T, b)
    assert short.summary() == (
        "1/1 MAX_ITER: Reached max_iter matrix-vector products before ||b - A z|| <= atol + "
        "rtol * ||b||. Raise max_iter, raise restart (restarted GMRES can stagnate; a larger "
        "Krylov space per cycle helps), or loosen atol/rtol. For the adjoint system "
        "(I - J^T) u = g, an eigenvalue of J near 1 makes it ill-conditioned: regularise f "
        "towards a contraction."
    )
    # A fixed-point solve keeps its own wording.
    forward = il.fixed_point(affine, torch.zeros(1, 2), torch.ones(1, 2))
    assert not forward.linear
    assert forward.summary() == "1/1 SUCCESS: Converged: ||f(z) - z|| <= atol + rtol * ||f(z)||."
    for status in Status:
        assert status.linear_message != status.message


def test_the_result_is_logged_at_debug_level(caplog):
    with caplog.at_level(logging.DEBUG, logger="implicitlayers"):
        r = il.fixed_point(half_plus_one, torch.zeros(1, 1), solver=il.Picard(max_iter=200))
    assert [rec.getMessage() for rec in caplog.records] == [f"fixed_point: {r.summary()}"]


# --- Warnings ---------------------------------------------------------------------------------


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
        "torch.bfloat16 (e.g. Picard(rtol=8e-03)), or solve in a wider dtype."
    )
    # The adjoint's warning, raised inside autograd's engine, points at loss.backward().
    rule = il.ImplicitDifferentiation(solver=il.Picard(max_iter=2, rtol=1e-12))
    z, _ = il.DEQ(lambda z, x: 0.5 * z + x, backward=rule)(torch.ones(1, 1, requires_grad=True))
    with pytest.warns(il.ConvergenceWarning) as caught:
        line = inspect.currentframe().f_lineno + 1
        z.sum().backward()
    assert at_this_line(caught[0], line)


def test_an_rtol_below_half_precision_warns_with_the_fix_only_when_samples_ran_out():
    # In bfloat16 arithmetic 1 - 0.9 z has no fixed point: at rtol = 1e-4 the iterates cycle
    # above the bound.
    with pytest.warns(il.ConvergenceWarning, match=r"2/2 samples .* rtol=0.0001.*rtol >= 8e-03"):
        il.fixed_point(lambda z: 1 - 0.9 * z, torch.zeros(2, 3, dtype=torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # z* = 2 is one: every sample converges, so nothing is said.
        r = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.bfloat16))
        assert r.converged.all()
        il.fixed_point(
            lambda z: 1 - 0.9 * z,
            torch.zeros(2, 3, dtype=torch.bfloat16),
            solver=il.Anderson(rtol=1e-2),
        )
        # An rtol equal to the epsilon is enough.
        eps = torch.finfo(torch.bfloat16).eps
        il.fixed_point(
            half_plus_one, torch.zeros(1, 1, dtype=torch.bfloat16), solver=il.Picard(rtol=eps)
        )
    # A float32 state under bfloat16 autocast: f's products are bfloat16, and the float32
    # sum after them cannot remove their rounding (the narrowest dtype is named as such).
    lin = torch.nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.copy_(0.5 * torch.linalg.qr(torch.randn(8, 8)).Q)

    def f(z, x):
        return lin(z).float() + x

    x = torch.linspace(-1, 1, 64).reshape(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(il.ConvergenceWarning, match=r"bfloat16 autocast arithmetic in f"):
            r = il.fixed_point(f, torch.zeros(8, 8), x, solver=il.Picard(rtol=1e-6, atol=0.0))
        assert r.z.dtype == torch.float32 and not r.converged.all()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = il.fixed_point(f, torch.zeros(8, 8), x, solver=il.Picard(rtol=1e-2))
            assert r.converged.all()


def test_a_broyden_breakdown_is_not_told_to_use_broyden():
    # Broyden's secant update is singular on f(z) = z + 1 (no fixed point, every residual the
    # same): its advice names Broyden's own option and the other solvers, never Broyden.
    solver = il.Broyden(max_iter=6, divergence_ratio=None, on_unconverged="raise")
    with pytest.raises(il.ConvergenceError) as caught:
        il.fixed_point(lambda z: z + 1, torch.zeros(1, 2, dtype=torch.float64), solver=solver)
    message = str(caught.value)
    assert "BREAKDOWN: Broyden's rank-one update was singular" in message
    assert "use Anderson or Picard" in message and "use Broyden" not in message


def test_a_solver_step_returning_complex_iterates_is_refused():
    class Complexify(il.AbstractSolver):
        def init(self, z):
            return {}

        def step(self, state, z, fz, iteration):
            return fz.to(torch.complex128), state, None

    with pytest.raises(TypeError, match=r"Complexify\.step returned a torch\.complex128 z_next"):
        il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(1, 1, dtype=torch.float64),
                       solver=Complexify(max_iter=5))  # fmt: skip


# --- Messages of the map checks, worded exactly -----------------------------------------------


def _coupled_batch(n: int) -> tuple:
    """A batch-mean map (it couples the samples) and ``n`` inputs."""
    x = torch.arange(1.0, n + 1.0, dtype=F64)[:, None].repeat(1, 2)
    return (lambda z, x: 0.5 * (z - z.mean(0, keepdim=True)) + x), x


#: What the checks of ``f`` and of the state say: (call, error, message).
MAP_CHECK_ERRORS = [
    (
        lambda: il.DEQ(lambda z, x: 0.5 * z + x)(
            torch.randn(2, 3, dtype=torch.complex128), z0=torch.zeros(2, 3, dtype=F64)
        ),
        TypeError,
        "f returned a torch.complex128 state for a torch.float64 state: its imaginary part "
        "would be dropped and the solve would find the fixed point of Re f, not of f. Solve "
        "for the real and imaginary parts as a real state (a tuple (re, im), or "
        "torch.view_as_real), with f returning them real.",
    ),
    (
        lambda: il.fixed_point(lambda z: z, torch.zeros(2, 3, dtype=torch.int64)),
        TypeError,
        "z0 must hold real floating-point tensors, got dtype torch.int64; pass z0 as float32 "
        "or float64 (a complex state: its real and imaginary parts as two tensors of a tuple "
        "state, or torch.view_as_real)",
    ),
    (
        lambda: il.DEQ(lambda z, x: 0.5 * z + x)(torch.randn(16)),
        ValueError,
        "the first input has shape (16,), which leaves no feature dimension for the default "
        "z0 = zeros_like(inputs[0]): the leading dimension is the batch. For one sample of 16 "
        "features pass x.unsqueeze(0); for a batch of scalars pass x.unsqueeze(1); or pass z0 "
        "with shape (B, *S) yourself.",
    ),
    (
        lambda: il.DEQ(
            _coupled_batch(12)[0], solver=il.Picard(max_iter=200), independent_samples=True
        )(_coupled_batch(12)[1]),
        ValueError,
        "independent_samples=True, but f couples the samples: 12 samples (0, 1, 2, 3, 4, 5, 6, "
        "7, 8, 9, ...) met the tolerance when f saw only the samples still running, yet at the "
        "whole returned batch their residual is up to 3.82 (their bound: 0.00239). f mixes "
        "information across the batch (batch statistics, a batch mean, attention across "
        "samples), so its fixed point depends on the whole batch: solve with "
        "independent_samples=False.",
    ),
    (
        lambda: torch.func.vmap(lambda xi, yi: il.DEQ(lambda z, x, y: 0.5 * z + x + y)(xi, yi).z)(
            torch.randn(3, 2, 4), torch.randn(3, 4)
        ),
        ValueError,
        "vmap over input 1 of shape (4,) (mapped size 3): the solve folds the mapped dimension "
        "into the batch of 2 samples, so every mapped tensor the solve takes must be batched "
        "like the state (leading dimension 2). Map only over tensors batched like the state "
        "(the inputs and z0), or close over the others.",
    ),
    (
        lambda: il.DEQ(lambda z, x: 0.5 * z + x, has_aux=True)(torch.randn(2, 3)),
        TypeError,
        "DEQ(f, has_aux=True) needs f to return a pair (z_next, aux), got Tensor; return "
        "(z_next, aux) or pass has_aux=False",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), MAP_CHECK_ERRORS)
def test_the_map_checks_are_worded_exactly(call, error, message):
    with pytest.raises(error) as caught:
        call()
    assert str(caught.value) == message


def test_a_coupled_f_with_a_wider_output_is_still_caught():
    # f returns float64 for a float32 state: the check compares in the state's dtype.
    f, x = _coupled_batch(4)
    with pytest.raises(ValueError, match=r"^independent_samples=True, but f couples"):
        il.DEQ(lambda z, x: f(z, x).double(), independent_samples=True)(x.float())


#: The advice a failed sample gets, by status and solver: (status, solver, message).
ADVICE = [
    (
        Status.DIVERGED,
        il.Anderson(),
        f"{Status.DIVERGED.message} If f couples the samples (batch statistics, a batch mean), "
        "Anderson's per-sample model of f is wrong and can diverge where Picard converges: "
        "try Picard (with a mixing below 1).",
    ),
    (Status.DIVERGED, il.Picard(), Status.DIVERGED.message),
    (
        Status.BREAKDOWN,
        il.Broyden(),
        "Broyden's rank-one update was singular and its memory restarted, and the sample did "
        "not reach the tolerance after it. Lower history_size, raise max_iter, or use Anderson "
        "or Picard.",
    ),
    (Status.BREAKDOWN, il.Anderson(), Status.BREAKDOWN.message),
    (Status.NONFINITE, il.Broyden(), Status.NONFINITE.message),
]


@pytest.mark.parametrize(("status", "solver", "message"), ADVICE)
def test_the_advice_is_worded_exactly_for_each_status_and_solver(status, solver, message):
    from implicitlayers._solve import _advice

    assert _advice(status, solver) == message
