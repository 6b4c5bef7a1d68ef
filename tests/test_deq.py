"""The ``DEQ`` module: what a call returns, its options, recorded states and failed samples.

``DEQ`` wires ``f``, a solver and a backward rule together: one solve without autograd, one
application of ``f`` that attaches the solution, and the optional outputs (``aux``, the
Jacobian penalty, the spectral radius, recorded states). Samples whose solve failed get no
gradient and cannot poison the others'; that holds for every rule of the registry.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from registry import RULE_PARAMS
from torch import nn
from zoo import Affine, AffineModule, TanhCell

import implicitlayers as il
from implicitlayers import Status

F64 = torch.float64
TIGHT = il.Anderson(max_iter=200, rtol=1e-12, atol=1e-13)


def jacobians(cell, zs, x):
    """Dense per-sample Jacobians of ``cell`` in ``z`` at ``zs``."""
    return [
        torch.autograd.functional.jacobian(lambda z, xi=xi: cell(z[None], xi[None])[0], zi)
        for zi, xi in zip(zs, x, strict=True)
    ]


# --- The module and its options --------------------------------------------------------------


def test_the_default_configuration():
    deq = il.DEQ(lambda z, x: 0.5 * z + x)
    assert deq.solver == il.Anderson() and deq.backward == il.JFB()
    assert deq.independent_samples is False
    assert il.ImplicitDifferentiation(solver="anderson").solver == il.Anderson()


def test_parameters_are_registered_and_the_state_dict_round_trips():
    cell = TanhCell()
    deq = il.DEQ(cell, solver=il.Anderson(max_iter=7), backward=il.Neumann(terms=2))
    assert {n for n, _ in deq.named_parameters()} == {"f.W", "f.U", "f.b"}
    other = il.DEQ(TanhCell(seed=3))
    other.load_state_dict(deq.state_dict())
    assert torch.equal(other.f.W, cell.W)
    assert "Anderson(max_iter=7)" in repr(deq) and "Neumann(terms=2)" in repr(deq)


def test_a_per_call_solver_overrides_the_module_s():
    cell = TanhCell()
    deq = il.DEQ(cell, solver=il.Picard(max_iter=2))
    x = torch.randn(2, 3, dtype=F64)
    z0 = torch.zeros(2, 5, dtype=F64)
    _, short = deq(x, z0=z0)
    _, long = deq(x, z0=z0, solver=il.Picard(max_iter=100, rtol=1e-10))
    assert short.n_f_evals == 2 and not short.converged.any()
    assert long.converged.all()


def test_the_output_unpacks_pickles_and_prints():
    out = il.DEQ(lambda z, x: 0.5 * z + x)(torch.ones(2, 1))
    z, result = out
    assert z is out.z and result is out.result
    copy = pickle.loads(pickle.dumps(out))
    assert torch.equal(copy.z, out.z) and copy.aux is None
    assert repr(out) == f"DEQOutput(z={out.z!r}, result={out.result!r})"


def test_the_output_is_a_copy_of_the_solution():
    x = torch.ones(1, 2, dtype=F64, requires_grad=True)
    z, result = il.DEQ(lambda z, x: 0.5 * z + x, solver=il.Picard(max_iter=100))(x)
    before = result.z.clone()
    with torch.no_grad():
        z.add_(1.0)
    assert torch.equal(result.z, before)


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


def test_the_backward_rule_applies_in_eval_mode():
    cell = TanhCell()
    deq = il.DEQ(cell, backward="implicit").eval()
    z, _ = deq(torch.randn(3, 3, dtype=F64), z0=torch.zeros(3, 5, dtype=F64))
    z.sum().backward()
    assert cell.W.grad is not None and cell.W.grad.abs().sum() > 0
    assert deq.last_backward_result is not None


def test_a_module_with_a_tuple_state_trains():
    class Pair(nn.Module):
        def forward(self, z, x):
            a, b = z
            return (0.5 * torch.tanh(b) + x, 0.5 * torch.tanh(a))

    x = torch.randn(3, 4, requires_grad=True)
    z, result = il.DEQ(Pair(), backward="implicit")(x, z0=(torch.zeros(3, 4), torch.zeros(3, 4)))
    assert isinstance(z, tuple) and result.converged.all()
    (z[0].sum() + z[1].sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


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


def test_host_reads_passes_through_and_changes_no_result():
    cell = TanhCell(n=5, d=3)
    x = torch.randn(4, 3, dtype=F64)
    z0 = torch.zeros(4, 5, dtype=F64)
    solver = il.Anderson(check_every=4, rtol=1e-8)
    a = il.DEQ(cell, solver=solver)(x, z0=z0)
    b = il.DEQ(cell, solver=solver, host_reads=False)(x, z0=z0)
    assert torch.equal(a.z, b.z) and torch.equal(a.result.n_steps, b.result.n_steps)


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


def test_a_forward_evaluates_parametrizations_once():
    cell = Counting()
    Counting.Scale.calls = 0
    z, result = il.DEQ(cell, solver=il.Picard(max_iter=100))(torch.ones(1, 2, dtype=F64))
    assert result.n_f_evals > 5 and Counting.Scale.calls == 1
    torch.testing.assert_close(z, torch.full((1, 2), 2.0, dtype=F64), rtol=1e-3, atol=0)


def test_a_forward_flattens_the_state_once_and_unflattens_each_output_once(monkeypatch):
    # A dict state: f's own calls rebuild the state, check and flatten its output (one
    # unflatten, one structure and one flatten per call, inside the one FlatMap); beyond
    # those, the forward checks and flattens z0 once and unflattens each returned state once:
    # the solution, and the attached output when autograd records. With the penalty and the
    # spectral radius too.
    from implicitlayers import _tree

    counts: dict[str, int] = {}
    for name in ("flatten", "unflatten", "spec_of", "batch_size"):
        original = getattr(_tree, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(_tree, name, counted)
    calls = []

    def f(z, x):
        calls.append(1)
        return {"b": 0.5 * z["b"] + x[:, :2], "a": 0.25 * z["a"] + x[:, 2:]}

    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    z0 = {"b": torch.zeros(3, 2, dtype=F64), "a": torch.zeros(3, 3, dtype=F64)}
    for grad, penalty in ((False, 0), (True, 0), (True, 2)):
        counts.clear()
        calls.clear()
        with torch.set_grad_enabled(grad):
            out = il.DEQ(f, solver=TIGHT)(x, z0=z0, jacobian_penalty=penalty,
                                          spectral_radius=bool(penalty))  # fmt: skip
        n = len(calls)
        # spec_of recurses: a dict of two leaves is three calls, per structure taken.
        assert counts["spec_of"] == 3 * (1 + n) and counts["batch_size"] == 1, (grad, counts)
        assert counts["flatten"] == 1 + n, (grad, counts)  # z0, then each f output
        assert counts["unflatten"] == n + 1 + grad, (grad, counts)  # each f input; outputs
        assert out.result.converged.all() and list(out.z) == ["b", "a"]


# --- Autocast -----------------------------------------------------------------------------------


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


def test_parameters_get_gradients_under_autocast():
    # The solve calls f under no_grad; autocast must not reuse its weight casts, made without
    # history, in the application of f that attaches z* (pytorch/pytorch#112583, older torch).
    cell, inject = nn.Linear(16, 16), nn.Linear(16, 16)
    with torch.no_grad():
        cell.weight.mul_(0.5 / torch.linalg.matrix_norm(cell.weight, 2))

    def f(z, x):
        return torch.tanh(cell(z) + inject(x))

    deq = il.DEQ(f, solver=il.Anderson(max_iter=50, rtol=1e-2), backward="jfb")
    x = torch.randn(4, 16)
    params = [*cell.parameters(), *inject.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, result = deq(x)
        z.float().square().sum().backward()
        grads = [p.grad for p in params]
        assert all(g is not None for g in grads)
        # JFB's gradient: one application of f at the detached fixed point, fed dL/dz = 2 z.
        for p in params:
            p.grad = None
        f(result.z, x).backward(2 * z.detach())
    for g, p in zip(grads, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-2, atol=1e-4)


# --- Auxiliary outputs ---------------------------------------------------------------------------


class AuxCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = TanhCell(n=5, d=3)

    def forward(self, z, x):
        out = self.cell(z, x)
        return out, {"energy": (out**2).sum(dim=1)}


def test_aux_is_that_of_f_at_the_fixed_point_with_its_total_derivative():
    # aux = ||f(z*, x)||^2 = ||z*||^2 at the fixed point, so a loss on the aux and the same
    # loss on z must get the same (total) gradient: d z*/dW included, exactly under
    # implicit differentiation.
    module = AuxCell()
    exact = il.ImplicitDifferentiation(solver=il.GMRES(rtol=1e-13, atol=1e-15))
    deq = il.DEQ(module, solver=TIGHT, has_aux=True, backward=exact)
    x = torch.randn(4, 3, dtype=F64)
    z0 = torch.zeros(4, 5, dtype=F64)
    out = deq(x, z0=z0)
    z, result = out
    assert result.converged.all()
    torch.testing.assert_close(out.aux["energy"], (z.detach() ** 2).sum(dim=1))
    W = module.cell.W
    (through_aux,) = torch.autograd.grad(out.aux["energy"].sum(), W)
    (through_z,) = torch.autograd.grad((deq(x, z0=z0).z ** 2).sum(), W)
    torch.testing.assert_close(through_aux, through_z, rtol=1e-9, atol=1e-12)
    # ... which is not the partial derivative with z* held.
    ref = module.cell
    zs = z.detach()
    pre = zs @ ref.W.T + x @ ref.U.T + ref.b
    partial = ((2 * torch.tanh(pre) * (1 - torch.tanh(pre) ** 2)).T @ zs).detach()
    assert (through_aux - partial).abs().max() > 1e-3
    with torch.no_grad():
        out = deq(x, z0=z0)
    torch.testing.assert_close(out.aux["energy"], (out.z**2).sum(dim=1))


def test_the_solve_and_the_attach_call_f_through_one_map():
    # A tuple state with an aux output: every call of f, the solve's (no graph), the
    # attach's and the aux's (one each, with a graph), gets z0's structure; the aux is that
    # of the application at the attached fixed point.
    calls = []

    def f(z, x):
        a, b = z
        calls.append((type(z), tuple(a.shape), tuple(b.shape), torch.is_grad_enabled()))
        new_a = torch.tanh(0.5 * b.flatten(1)[:, :3] + x)
        return (new_a, (0.25 * a).repeat(1, 2).reshape(-1, 2, 3)), new_a.sum(dim=1)

    deq = il.DEQ(f, solver=TIGHT, has_aux=True)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 2, 3, dtype=F64))
    out = deq(x, z0=z0)
    n = out.result.n_f_evals
    assert out.result.converged.all() and len(calls) == n + 2
    assert {c[:3] for c in calls} == {(tuple, (2, 3), (2, 2, 3))}
    assert [c[3] for c in calls] == [False] * n + [True, True]
    b = out.z[1].detach()
    pre = 0.5 * b.flatten(1)[:, :3] + x.detach()
    torch.testing.assert_close(out.aux, torch.tanh(pre).sum(dim=1), rtol=1e-15, atol=0)
    # Total derivative under JFB: d aux/dx = sech^2 (1 + 0.5 d b*/dx), and JFB's d b*/dx is
    # the one-step partial of b_next = 0.25 a, which is 0: so sech^2.
    out.aux.sum().backward()
    torch.testing.assert_close(x.grad, 1 - torch.tanh(pre) ** 2, rtol=1e-15, atol=0)


def test_the_diagnostics_of_a_map_with_an_aux_output_are_those_of_its_state_map():
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


# --- The Jacobian penalty and the spectral radius ---------------------------------------------


def test_the_jacobian_penalty_is_the_frobenius_norm_in_expectation():
    torch.manual_seed(0)
    cell = TanhCell(n=5, d=3)
    deq = il.DEQ(cell, solver=TIGHT)
    x = torch.randn(2, 3, dtype=F64)
    z0 = torch.zeros(2, 5, dtype=F64)
    out = deq(x, z0=z0, jacobian_penalty=4000)
    zs = out.z.detach()
    exact = torch.stack([j.square().sum() for j in jacobians(cell, zs, x)])
    torch.testing.assert_close(out.jacobian_penalty.detach(), exact, rtol=0.1, atol=0)
    out.jacobian_penalty.mean().backward()
    assert cell.W.grad is not None and cell.W.grad.abs().sum() > 0


def test_the_penalty_normalises_as_the_diagnostic_does():
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


def test_the_spectral_radius_matches_eigvals():
    cell = TanhCell(n=5, d=3, scale=0.9)
    deq = il.DEQ(cell, solver=TIGHT)
    x = torch.randn(3, 3, dtype=F64)
    with torch.no_grad():
        out = deq(x, z0=torch.zeros(3, 5, dtype=F64), spectral_radius=True)
    zs = out.z
    exact = torch.stack([torch.linalg.eigvals(j).abs().max() for j in jacobians(cell, zs, x)])
    assert out.spectral_radius.converged.all()
    torch.testing.assert_close(out.spectral_radius.radius, exact, rtol=0.01, atol=0)
    assert out.jacobian_penalty is None and out.aux is None


# --- Recorded states (fixed-point correction) ---------------------------------------------------


def _picard_iterates(problem: Affine, x: torch.Tensor, z0: torch.Tensor, upto: int):
    z, out = z0, [z0]
    for _ in range(upto):
        z = problem(z, x)
        out.append(z)
    return out


@pytest.mark.parametrize("rule", RULE_PARAMS)
def test_each_recorded_state_carries_its_rule_s_gradient_at_its_own_point(rule):
    problem = Affine.make(n=6, d=3, contraction=0.8)
    module = AffineModule(problem)
    x = torch.randn(4, 3, dtype=F64)
    c = torch.randn(4, 6, dtype=F64)
    z0 = torch.zeros(4, 6, dtype=F64)
    solver = il.Picard(max_iter=300, rtol=1e-12, atol=0.0)
    out = il.DEQ(module, solver=solver, backward=rule.rule)(x, z0=z0, states=(2, 5))
    iterates = _picard_iterates(problem, x, z0, 5)
    for k, state in zip((2, 5), out.states, strict=True):
        torch.testing.assert_close(state.detach(), iterates[k])
    (out.states[1] * c).sum().backward()
    # The rule's u for this affine map does not depend on the point; u^T df/dW does.
    u = rule.u(problem.W, c)
    torch.testing.assert_close(module.b.grad, u.sum(0))
    torch.testing.assert_close(module.U.grad, u.T @ x)
    if not rule.unrolls:  # (a rule that unrolls f from the state differentiates f elsewhere)
        torch.testing.assert_close(module.W.grad, u.T @ iterates[5])  # at the state's point


# --- Failed samples ------------------------------------------------------------------------------


class _Scale(nn.Module):
    """f(z, x) = rate * z + p x per sample: rate 2 diverges, p the one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(1.0, dtype=F64))

    def forward(self, z, x, rate):
        return rate[:, None] * z + self.p * x


@pytest.mark.parametrize("rule", RULE_PARAMS)
def test_a_diverging_sample_gets_no_gradient_and_leaves_the_others_exact(rule):
    x = torch.ones(3, 1, dtype=F64)
    rate = torch.tensor([0.5, 0.5, 2.0], dtype=F64)
    cell = _Scale()
    deq = il.DEQ(cell, solver=il.Picard(max_iter=60, on_unconverged="ignore"), backward=rule.rule)
    z, result = deq(x, rate)
    assert result.statuses()[2] == Status.DIVERGED
    z.sum().backward()
    # Each good sample: z* = 2 p x, and the rule's dz*/dp = u(J = 1/2, g = 1) x (2 if exact).
    per_sample = rule.u(torch.tensor([[0.5]], dtype=F64), torch.ones(1, 1, dtype=F64)).item()
    assert cell.p.grad.item() == pytest.approx(2 * per_sample, rel=1e-6)


@pytest.mark.parametrize("rule", RULE_PARAMS)
def test_a_nan_input_sample_leaves_the_other_samples_parameter_gradients_clean(rule):
    cell = TanhCell(n=5, d=3)
    x = torch.randn(4, 3, dtype=F64)
    x_bad = x.clone()
    x_bad[2, 1] = float("nan")
    solver = il.Anderson(max_iter=100, rtol=1e-10, on_nonfinite="ignore")
    z0 = torch.zeros(4, 5, dtype=F64)
    deq = il.DEQ(cell, solver=solver, backward=rule.rule)
    z, result = deq(x_bad, z0=z0)
    assert result.statuses()[2] == Status.NONFINITE
    z[[0, 1, 3]].sum().backward()
    bad_grads = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    keep = [0, 1, 3]
    deq(x[keep], z0=z0[keep])[0].sum().backward()
    for got, want in zip(bad_grads, cell.parameters(), strict=True):
        torch.testing.assert_close(got, want.grad)


def test_a_diverged_sample_returns_its_best_iterate_without_gradient():
    x = torch.tensor([[1.0], [1.0]], dtype=F64, requires_grad=True)
    rate = torch.tensor([[0.5], [3.0]], dtype=F64)  # sample 1 diverges
    deq = il.DEQ(lambda z, x: rate * z + x, solver=il.Picard(max_iter=100), backward=il.JFB())
    z, result = deq(x)
    assert result.status.tolist() == [Status.SUCCESS, Status.DIVERGED]
    assert z[1].item() == 0.0  # z0, the iterate with the smallest residual
    z.sum().backward()
    assert x.grad.tolist() == [[1.0], [0.0]]


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


def test_a_failed_sample_has_no_jacobian_penalty():
    x = torch.tensor([[1.0, 1.0], [float("nan"), 1.0]])
    deq = il.DEQ(lambda z, x: 0.5 * z + x, solver=il.Picard(on_nonfinite="ignore"))
    out = deq(x, jacobian_penalty=2)
    assert out.jacobian_penalty[1].item() == 0.0 and out.jacobian_penalty[0].item() > 0.0
