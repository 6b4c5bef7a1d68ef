"""The fast paths take fewer operations and give the same values as the general ones.

Each fast path skips work whose result it knows (a mixing weight of one, every sample still
running, the whole batch in the compact set). The values are pinned elsewhere; these tests pin
that the shortcut is taken, by counting the torch operations of otherwise identical solves.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import implicitlayers as il

F64 = torch.float64
SOLVERS = [il.Picard, il.Anderson, il.Broyden]
PATHS = [
    pytest.param({}, id="host"),
    pytest.param({"host_reads": False}, id="sync-free"),
    pytest.param({"independent_samples": True}, id="compacted"),
]
#: A tolerance no iterate meets, so every sample runs every iteration.
NEVER = {"atol": 0.0, "rtol": 1e-300, "divergence_ratio": None}


#: Host-side metadata queries: no kernel, not counted.
METADATA = frozenset({"__len__", "__get__", "size", "dim", "numel"})


class Operations(TorchFunctionMode):
    """Counts the torch functions and tensor methods called inside it, metadata aside."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") not in METADATA
        return func(*args, **(kwargs or {}))


def operations(fn):
    with torch.no_grad(), Operations() as counter:
        fn()
    return counter.count


X = torch.linspace(0.1, 1.0, 24, dtype=F64).reshape(3, 8)


def cell(z, x=X):
    return torch.tanh(0.5 * z + x)


@pytest.mark.parametrize("path", PATHS)
def test_picard_without_mixing_takes_fz_itself(path):
    # mixing=0.5 costs one lerp per step; mixing=1.0 none (z_next is f(z)).
    def solve(mixing):
        solver = il.Picard(max_iter=10, mixing=mixing, **NEVER)
        return lambda: il.fixed_point(cell, torch.zeros(3, 8, dtype=F64), solver=solver, **path)

    assert operations(solve(0.5)) - operations(solve(1.0)) == 9  # nine steps between ten calls


@pytest.mark.parametrize("cls", SOLVERS)
@pytest.mark.parametrize("path", PATHS)
def test_recording_states_of_running_samples_costs_only_their_unflattening(cls, path):
    # While every sample runs, the recorded state is the iterate itself (no merge with the
    # best iterates of stopped samples): a flat state in the working dtype costs nothing, one
    # of images one reshape at the end, the same on every path.
    solver = cls(max_iter=8, **NEVER)

    def solve(states, shape):
        z0 = torch.zeros(shape, dtype=F64)
        x = X.reshape(shape)
        return lambda: il.fixed_point(cell, z0, x, solver=solver, states=states, **path)

    for shape, per_state in (((3, 8), 0), ((3, 2, 4), 1)):
        spent = operations(solve((1, 3, 5), shape)) - operations(solve((), shape))
        assert spent == 3 * per_state, shape


@pytest.mark.parametrize("cls", SOLVERS)
def test_the_whole_batch_running_is_passed_its_inputs_unselected(cls):
    # With independent_samples, f is given the running rows of its inputs; while all rows
    # run, the inputs are passed as they are (no index_select), so f taking x as an input
    # costs what f closing over x costs.
    solver = cls(max_iter=8, **NEVER)
    z0 = torch.zeros(3, 8, dtype=F64)

    def closed():
        il.fixed_point(cell, z0, solver=solver, independent_samples=True)

    def given():
        il.fixed_point(cell, z0, X, solver=solver, independent_samples=True)

    assert operations(given) == operations(closed)


def test_the_phantom_steps_without_mixing_cost_no_blend():
    # PhantomGradient(mixing=m) takes z <- (1 - m) z + m f(z): three operations per step more
    # than z <- f(z) (a product, a product and a sum), none when m = 1.
    x = torch.ones(2, 3, dtype=F64, requires_grad=True)

    def forward(mixing):
        rule = il.PhantomGradient(steps=4, mixing=mixing)
        deq = il.DEQ(cell, solver=il.Picard(max_iter=5), backward=rule)
        return lambda: deq(x, z0=torch.zeros(2, 3, dtype=F64))

    def counted(fn):
        with Operations() as counter:
            fn()
        return counter.count

    assert counted(forward(0.5)) - counted(forward(1.0)) == 3 * 4


def test_the_neumann_phantom_without_mixing_sums_the_plain_series():
    # NeumannPhantom(mixing=m): v <- (1 - m) v + m J^T v (three more operations a term) and
    # a final scale by m; with m = 1 neither.
    W = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=F64)
    g = torch.tensor([[1.0, 2.0]], dtype=F64)

    def adjoint(mixing):
        rule = il.NeumannPhantom(terms=3, mixing=mixing)
        return lambda: rule.adjoint(lambda v: v @ W, g)

    assert operations(adjoint(0.5)) - operations(adjoint(1.0)) == 3 * 3 + 1


#: Operations per Picard iteration outside f while every residual improves, by path: the
#: residual and its bound (a difference, two norms, a scaling: 4), the stopping rule (above
#: the bound and at most the divergence limit: >, <=, &), the improvement (<), and the one
#: host read of both flags (stack, all, tolist): 11; nothing is masked or written, and the
#: compacted path, whose rows all run, takes the same iteration.
PICARD_ITERATION_OPS = [
    pytest.param({"host_reads": True}, 11, id="host"),
    pytest.param({"independent_samples": True}, 11, id="compacted"),
]


@pytest.mark.parametrize(("path", "expected"), PICARD_ITERATION_OPS)
def test_a_picard_iteration_of_improving_samples_takes_the_fast_path(path, expected):
    z0 = torch.zeros(3, 8, dtype=F64)

    def solve(steps):
        solver = il.Picard(max_iter=steps, **NEVER)
        return lambda: il.fixed_point(cell, z0, solver=solver, **path)

    f_ops = operations(lambda: cell(z0))
    assert operations(solve(9)) - operations(solve(8)) - f_ops == expected


@pytest.mark.parametrize("path", [{"host_reads": True}, {"independent_samples": True}])
def test_an_iteration_that_does_not_improve_costs_three_operations_more(path):
    # f(z) = X - z from 0 alternates between 0 and X: every residual equals ||X||, so no
    # sample improves on its best and none stops. The one stopping rule then merges the best
    # residuals and iterates (two where and a view): 11 + 3 operations, on both row
    # selections (it used to take the masked path: 21 and 24).
    z0 = torch.zeros(3, 8, dtype=F64)

    def stagnant(z):
        return X - z

    def solve(steps):
        solver = il.Picard(max_iter=steps, **NEVER)
        return lambda: il.fixed_point(stagnant, z0, solver=solver, **path)

    f_ops = operations(lambda: stagnant(z0))
    assert operations(solve(9)) - operations(solve(8)) - f_ops == 14
