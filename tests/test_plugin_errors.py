"""What a user writing a solver, or misnaming an option, is told: exact messages.

Custom solvers per docs/guide/extending.rst, checked once per solve by the driver loop;
renamed and foreign keywords of the solvers and backward rules; the adjoint solver's names
and advice; the Jacobian penalty's normalisation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import implicitlayers as il
from implicitlayers.solvers import AbstractSolver

F64 = torch.float64
B, N = 6, 40


def affine(z, b):
    return 0.5 * z + b


def _solve(solver, **kwargs):
    return il.fixed_point(
        affine, torch.zeros(B, N, dtype=F64), torch.ones(B, N, dtype=F64), solver=solver, **kwargs
    )


PATHS = pytest.mark.parametrize(
    "kwargs",
    [{}, {"host_reads": False}, {"independent_samples": True}],
    ids=["reads", "chunked", "compacted"],
)


@PATHS
def test_a_step_returning_the_wrong_shape_is_named(kwargs):
    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Short(AbstractSolver):
        def init(self, z):
            return {}

        def step(self, state, z, fz, iteration):
            return fz[:, :-1], state, None

    with pytest.raises(ValueError) as caught:
        _solve(Short(), **kwargs)
    assert str(caught.value) == "Short.step returned z_next of shape (6, 39); expected (6, 40)"


@PATHS
def test_a_float_breakdown_is_named(kwargs):
    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class FloatFlags(AbstractSolver):
        def init(self, z):
            return {}

        def step(self, state, z, fz, iteration):
            return fz, state, torch.zeros(z.shape[0])

    with pytest.raises(TypeError) as caught:
        _solve(FloatFlags(), **kwargs)
    assert str(caught.value) == (
        "FloatFlags.step returned breakdown as a torch.float32 tensor of shape (6,); it must "
        "be a (6,) bool tensor marking the samples whose internal system broke down this "
        "step, or None for a solver that cannot break down (e.g. breakdown = "
        "denominator.abs() <= tiny)"
    )


def test_a_state_without_the_batch_dimension_is_named_with_independent_samples():
    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Counter(AbstractSolver):
        def init(self, z):
            return {"history": torch.zeros(z.shape[0], 3), "k": torch.zeros(())}

        def step(self, state, z, fz, iteration):
            return fz, {**state, "k": state["k"] + 1}, None

    with pytest.raises(ValueError) as caught:
        _solve(Counter(), independent_samples=True)
    assert str(caught.value) == (
        "Counter.init returned state['k'] of shape (); with independent_samples=True every "
        "state tensor needs the batch (6) as its leading dimension, so that the loop can drop "
        "the rows of samples that stopped: give it shape (6, ...) (a per-solve constant c can "
        "be c.expand(6, ...), which costs no memory)"
    )
    # The dense loop never selects state rows: such a state works there, and gives the answer.
    result = _solve(Counter(max_iter=200, rtol=1e-12, atol=0.0))
    assert bool(result.converged.all())
    torch.testing.assert_close(result.z, torch.full((B, N), 2.0, dtype=F64), rtol=1e-10, atol=0)


def test_a_keyword_only_iteration_is_named_when_the_class_is_defined():
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


# --- keywords renamed, or named differently elsewhere ---------------------------------------


def test_a_backward_rule_takes_its_own_fields_as_keywords():
    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Tau(il.backward.AbstractBackward):
        tau: float = 0.5

        def adjoint(self, vjp, grad):
            return self.tau * grad, None

    assert Tau(tau=0.25).tau == 0.25


# --- the adjoint solver: names and advice ---------------------------------------------------


def test_the_adjoint_solver_accepts_gmres_by_name():
    assert il.ImplicitDifferentiation(solver="gmres") == il.ImplicitDifferentiation()
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
    f = affine
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
    for status in il.Status:
        assert status.linear_message != status.message


# --- the Jacobian penalty of a DEQ forward --------------------------------------------------


def test_the_deq_penalty_normalises_as_the_diagnostic_does():
    torch.manual_seed(0)
    W = 0.3 * torch.randn(5, 5, dtype=F64)

    def cell(z, x):
        return torch.tanh(z @ W.T + x)

    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    deq = il.DEQ(cell, solver=il.Anderson(rtol=1e-12, atol=0.0, max_iter=100))
    torch.manual_seed(1)
    out = deq(x, jacobian_penalty=2, normalize_penalty=True)
    torch.manual_seed(1)
    raw = deq(x, jacobian_penalty=2)
    torch.manual_seed(1)
    direct = il.diagnostics.jacobian_penalty(cell, out.z, x, n_probes=2, normalize=True)
    torch.testing.assert_close(out.jacobian_penalty, raw.jacobian_penalty / 5, rtol=1e-15, atol=0)
    torch.testing.assert_close(out.jacobian_penalty, direct, rtol=1e-15, atol=0)
    assert out.jacobian_penalty.requires_grad


def test_normalize_penalty_without_a_penalty_is_named():
    deq = il.DEQ(affine)
    x = torch.ones(1, 2)
    with pytest.raises(ValueError) as caught:
        deq(x, normalize_penalty=True)
    assert str(caught.value) == (
        "normalize_penalty=True normalises the Jacobian penalty, but jacobian_penalty=0 "
        "computes none: pass jacobian_penalty=k (k >= 1 probes) as well"
    )
    with pytest.raises(TypeError) as caught:
        deq(x, jacobian_penalty=1, normalize_penalty=1)
    assert str(caught.value) == "normalize_penalty must be a bool, got 1"
