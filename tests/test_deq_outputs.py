"""What a DEQ call returns besides z: aux outputs, the Jacobian penalty, the spectral radius."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from zoo import TanhCell

import implicitlayers as il

TIGHT = il.Anderson(max_iter=200, rtol=1e-12, atol=1e-13)


def jacobians(cell, zs, x):
    """Dense per-sample Jacobians of ``cell`` in ``z`` at ``zs``."""
    return [
        torch.autograd.functional.jacobian(lambda z, xi=xi: cell(z[None], xi[None])[0], zi)
        for zi, xi in zip(zs, x, strict=True)
    ]


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
    # implicit differentiation. (Before: the aux's gradient held z* fixed, 0.4 off here.)
    module = AuxCell()
    exact = il.ImplicitDifferentiation(solver=il.GMRES(rtol=1e-13, atol=1e-15))
    deq = il.DEQ(module, solver=TIGHT, has_aux=True, backward=exact)
    x = torch.randn(4, 3, dtype=torch.float64)
    z0 = torch.zeros(4, 5, dtype=torch.float64)
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


def test_has_aux_with_a_plain_state_output_is_named():
    deq = il.DEQ(TanhCell(n=5, d=3), has_aux=True)
    with pytest.raises(TypeError, match=r"has_aux=True\) needs f to return a pair"):
        deq(torch.randn(2, 3, dtype=torch.float64), z0=torch.zeros(2, 5, dtype=torch.float64))


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
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    z0 = (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 2, 3, dtype=torch.float64))
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


def test_jacobian_penalty_from_a_deq_call_is_the_frobenius_norm_in_expectation():
    torch.manual_seed(0)
    cell = TanhCell(n=5, d=3)
    deq = il.DEQ(cell, solver=TIGHT)
    x = torch.randn(2, 3, dtype=torch.float64)
    z0 = torch.zeros(2, 5, dtype=torch.float64)
    out = deq(x, z0=z0, jacobian_penalty=4000)
    zs = out.z.detach()
    exact = torch.stack([j.square().sum() for j in jacobians(cell, zs, x)])
    torch.testing.assert_close(out.jacobian_penalty.detach(), exact, rtol=0.1, atol=0)
    out.jacobian_penalty.mean().backward()
    assert cell.W.grad is not None and cell.W.grad.abs().sum() > 0


def test_spectral_radius_from_a_deq_call_matches_eigvals():
    cell = TanhCell(n=5, d=3, scale=0.9)
    deq = il.DEQ(cell, solver=TIGHT)
    x = torch.randn(3, 3, dtype=torch.float64)
    with torch.no_grad():
        out = deq(x, z0=torch.zeros(3, 5, dtype=torch.float64), spectral_radius=True)
    zs = out.z
    exact = torch.stack([torch.linalg.eigvals(j).abs().max() for j in jacobians(cell, zs, x)])
    assert out.spectral_radius.converged.all()
    torch.testing.assert_close(out.spectral_radius.radius, exact, rtol=0.01, atol=0)
    assert out.jacobian_penalty is None and out.aux is None


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (True, TypeError), (1.5, TypeError)])
def test_bad_jacobian_penalty_is_named(bad, error):
    with pytest.raises(error, match="jacobian_penalty"):
        il.DEQ(TanhCell(n=5, d=3))(
            torch.randn(2, 3, dtype=torch.float64),
            z0=torch.zeros(2, 5, dtype=torch.float64),
            jacobian_penalty=bad,
        )


def test_output_unpacks_and_pickles():
    out = il.DEQ(lambda z, x: 0.5 * z + x)(torch.ones(2, 1))
    z, result = out
    assert z is out.z and result is out.result
    copy = pickle.loads(pickle.dumps(out))
    assert torch.equal(copy.z, out.z) and copy.aux is None


def test_host_reads_passes_through_and_changes_no_result():
    cell = TanhCell(n=5, d=3)
    x = torch.randn(4, 3, dtype=torch.float64)
    z0 = torch.zeros(4, 5, dtype=torch.float64)
    solver = il.Anderson(check_every=4, rtol=1e-8)
    a = il.DEQ(cell, solver=solver)(x, z0=z0)
    b = il.DEQ(cell, solver=solver, host_reads=False)(x, z0=z0)
    assert torch.equal(a.z, b.z) and torch.equal(a.result.n_steps, b.result.n_steps)
    with pytest.raises(TypeError, match="host_reads must be None, True or False"):
        il.DEQ(cell, host_reads="no")


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

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    z0 = {"b": torch.zeros(3, 2, dtype=torch.float64), "a": torch.zeros(3, 3, dtype=torch.float64)}
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
