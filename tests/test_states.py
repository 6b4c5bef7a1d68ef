"""Fixed-point correction: intermediate states of the solve, each attached by the rule."""

from __future__ import annotations

import pytest
import torch
from zoo import Affine, AffineModule

import implicitlayers as il


def _picard_iterates(problem: Affine, x: torch.Tensor, z0: torch.Tensor, upto: int):
    z, out = z0, [z0]
    for _ in range(upto):
        z = problem(z, x)
        out.append(z)
    return out


@pytest.mark.parametrize("independent", [False, True])
def test_states_are_the_solver_iterates_and_early_stoppers_give_their_answer(independent):
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    rates = torch.tensor([[0.5], [0.9]], dtype=torch.float64)
    f = lambda z, x, r: r * z + x  # noqa: E731
    solver = il.Picard(max_iter=200, rtol=1e-3, atol=0.0)
    result = il.fixed_point(
        f, torch.zeros(2, 1, dtype=torch.float64), x, rates, solver=solver,
        states=(0, 3, 30, 1000), independent_samples=independent,
    )  # fmt: skip
    assert result.n_steps.tolist()[0] < 30 < result.n_steps.tolist()[1]
    exact_k = lambda k: x * (1 - rates**k) / (1 - rates)  # noqa: E731  z_k of Picard from 0
    torch.testing.assert_close(result.states[0], torch.zeros(2, 1, dtype=torch.float64))
    torch.testing.assert_close(result.states[1], exact_k(3))
    # At k = 30 sample 0 has stopped (it gives its answer); sample 1 is at its z_30.
    torch.testing.assert_close(result.states[2][0], result.z[0])
    torch.testing.assert_close(result.states[2][1], exact_k(30)[1])
    torch.testing.assert_close(result.states[3], result.z)  # past the solve: the answer


@pytest.mark.parametrize("rule", [il.JFB(), il.ImplicitDifferentiation(), il.Neumann(terms=3)])
def test_each_state_carries_its_rules_gradient_at_its_own_point(rule):
    problem = Affine.make(n=6, d=3, contraction=0.8)
    module = AffineModule(problem)
    x = torch.randn(4, 3, dtype=torch.float64)
    c = torch.randn(4, 6, dtype=torch.float64)
    z0 = torch.zeros(4, 6, dtype=torch.float64)
    deq = il.DEQ(module, solver=il.Picard(max_iter=300, rtol=1e-12, atol=0.0), backward=rule)
    out = deq(x, z0=z0, states=(2, 5))
    iterates = _picard_iterates(problem, x, z0, 5)
    for k, state in zip((2, 5), out.states, strict=True):
        torch.testing.assert_close(state.detach(), iterates[k])
    (out.states[1] * c).sum().backward()
    # u of the rule for this linear map: JFB c; Neumann sum_{i<=3} (W^T)^i c; exact
    W = problem.W
    if isinstance(rule, il.JFB):
        u = c
    elif isinstance(rule, il.Neumann):
        u = sum(c @ torch.linalg.matrix_power(W, i) for i in range(4))
    else:
        u = problem.adjoint(c)
    torch.testing.assert_close(module.b.grad, u.sum(0))
    torch.testing.assert_close(module.W.grad, u.T @ iterates[5])  # at the state's own point
    torch.testing.assert_close(module.U.grad, u.T @ x)


def test_states_are_validated_by_name():
    with pytest.raises(ValueError, match="states must hold iteration indices"):
        il.fixed_point(lambda z: z / 2, torch.zeros(1, 1), states=(-1,))
    with pytest.raises(TypeError, match="states must be a sequence"):
        il.fixed_point(lambda z: z / 2, torch.zeros(1, 1), states=5)
