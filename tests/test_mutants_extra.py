"""Exact values for what the mutation run found unpinned: defaults, memory layout, aux."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import implicitlayers as il

F64 = torch.float64


def test_the_default_adjoint_solver_is_the_documented_gmres():
    assert il.ImplicitDifferentiation().solver == il.GMRES(
        max_iter=200, rtol=1e-6, atol=1e-10, restart=20
    )


def test_broydens_memory_is_two_buffers_with_one_scratch_slot():
    # As documented: two (B, history_size + 1, n) buffers whatever max_iter is.
    state = il.Broyden(history_size=3, max_iter=100).init(torch.zeros(2, 5, dtype=F64))
    assert state["U"].shape == state["V"].shape == (2, 4, 5)
    assert state["U"].dtype == F64 and not state["U"].any() and not state["V"].any()


def test_diagnostics_of_a_map_with_an_auxiliary_output_are_those_of_its_state_map():
    # f(z, x) = (0.5 z + x, aux): the penalty and the spectral radius are the state map's.
    def plain(z, x):
        return 0.5 * z + x

    def with_aux(z, x):
        return 0.5 * z + x, z.sum()

    x = torch.ones(2, 4, dtype=F64, requires_grad=True)
    outs = []
    for f, has_aux in ((plain, False), (with_aux, True)):
        torch.manual_seed(0)
        deq = il.DEQ(f, solver=il.Anderson(rtol=1e-10), has_aux=has_aux)
        outs.append(deq(x, jacobian_penalty=1, spectral_radius=True))
    (ref, got) = outs
    assert torch.equal(got.jacobian_penalty, ref.jacobian_penalty)
    radius = got.spectral_radius.radius
    assert torch.allclose(radius, torch.full((2,), 0.5, dtype=F64))
    assert torch.equal(radius, ref.spectral_radius.radius)
    assert got.aux is not None and ref.aux is None


def _compacted_solve(solver):
    return il.fixed_point(
        lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=F64), solver=solver, independent_samples=True
    )


def test_a_state_that_is_not_a_dict_of_tensors_is_named():
    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Listed(il.AbstractSolver):
        def init(self, z):
            return [z]

        def step(self, state, z, fz, iteration):
            return fz, state, None

    @dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
    class Hyper(Listed):
        def init(self, z):
            return {"m": 3}

    with pytest.raises(TypeError) as caught:
        _compacted_solve(Listed())
    assert (
        str(caught.value) == "Listed.init must return a dict of tensors (a SolverState), got list"
    )
    with pytest.raises(TypeError) as caught:
        _compacted_solve(Hyper())
    assert str(caught.value) == (
        "Hyper.init returned state['m'] of type int; every state entry must be a tensor with "
        "the batch as its leading dimension (keep hyperparameters on the solver, not in its "
        "state)"
    )


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class Returns(il.AbstractSolver):
    """A solver whose step returns a fixed (z_next, breakdown) pair shape, for the checks."""

    z_next_as_list: bool = False
    breakdown: object = None

    def init(self, z):
        return {}

    def step(self, state, z, fz, iteration):
        return (fz.tolist() if self.z_next_as_list else fz), state, self.breakdown


def test_what_a_step_returns_is_named_when_it_is_not_a_tensor():
    f, z0 = (lambda z: 0.5 * z + 1), torch.zeros(2, 3, dtype=F64)
    with pytest.raises(TypeError) as caught:
        il.fixed_point(f, z0, solver=Returns(z_next_as_list=True))
    assert str(caught.value) == (
        "Returns.step must return (z_next, state, breakdown) with z_next a tensor, got z_next "
        "of type list"
    )
    with pytest.raises(TypeError) as caught:
        il.fixed_point(f, z0, solver=Returns(breakdown=[False, False]))
    assert str(caught.value) == (
        "Returns.step returned breakdown as [False, False] (list); it must be a (2,) bool "
        "tensor marking the samples whose internal system broke down this step, or None for a "
        "solver that cannot break down (e.g. breakdown = denominator.abs() <= tiny)"
    )


def test_on_the_cpu_the_default_path_is_the_host_read_path():
    # Host reads are free on the CPU, so the default takes the path with reads (its fast
    # iteration costs fewer operations than the sync-free path's masked one).
    from test_fast_paths import NEVER, cell, operations

    def solve(**path):
        solver = il.Picard(max_iter=8, **NEVER)
        return lambda: il.fixed_point(cell, torch.zeros(3, 8, dtype=F64), solver=solver, **path)

    default, reads, sync_free = (
        operations(solve()),
        operations(solve(host_reads=True)),
        operations(solve(host_reads=False)),
    )
    assert default == reads < sync_free


def test_a_frozen_sample_keeps_the_rate_it_stopped_with_while_a_coupled_batch_moves():
    # f couples the samples weakly (a mean): sample 0 converges in a few steps and is frozen
    # while sample 1 runs on; its f(z) moves with the batch but its z does not, and its rate
    # stays the secant rate measured when it stopped (about 0.5), never num / 0 = inf.
    x = torch.tensor([[1.0], [1e6]], dtype=F64)

    def f(z):
        return 0.5 * z + x + 1e-9 * z.mean()

    solver = il.Picard(max_iter=100, rtol=0.0, atol=1e-6)
    result = il.fixed_point(f, torch.zeros(2, 1, dtype=F64), solver=solver)
    assert result.status.tolist() == [il.Status.SUCCESS] * 2
    assert result.n_steps[0] < result.n_steps[1]
    assert torch.allclose(result.rate, torch.full((2,), 0.5, dtype=F64), atol=1e-2)
