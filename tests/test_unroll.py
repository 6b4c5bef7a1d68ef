"""``unroll``: gradients of the plain loop, with and without checkpointing, in bounded memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from zoo import TanhCell

import implicitlayers as il
from implicitlayers._unroll import unroll
from implicitlayers.nn import VariationalDropout, one_map

F64 = torch.float64


def plain_loop(f, z, x, steps):
    for _ in range(steps):
        z = f(z, x)
    return z


def grads_of(out_fn, tensors, c):
    """Gradients of ``sum(c * out)`` with respect to ``tensors``."""
    out = out_fn()
    return torch.autograd.grad((c * out).sum(), tensors)


@pytest.mark.parametrize("checkpoint_every", [None, 1, 3, 4, 10, 25])
def test_unroll_gradients_are_the_plain_loops(checkpoint_every):
    cell = TanhCell(n=5, d=3, scale=0.9)
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    z0 = torch.randn(4, 5, dtype=F64, requires_grad=True)
    c = torch.randn(4, 5, dtype=F64)
    wrt = [z0, x, *cell.parameters()]
    z = unroll(cell, z0, x, steps=10, checkpoint_every=checkpoint_every)
    assert torch.equal(z.detach(), plain_loop(cell, z0, x, 10).detach())
    got = torch.autograd.grad((c * z).sum(), wrt)
    want = grads_of(lambda: plain_loop(cell, z0, x, 10), wrt, c)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_unroll_handles_tuple_and_dict_states(checkpoint_every):
    W = torch.randn(4, 4, dtype=F64, requires_grad=True)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)

    def pair(z, x):
        a, b = z
        return (torch.tanh(0.4 * b @ W + x), 0.5 * torch.sin(a))

    def named(z, x):
        a, b = pair((z["a"], z["b"]), x)
        return {"a": a, "b": b}

    zeros = torch.zeros(3, 4, dtype=F64)
    for f, z0, leaves in (
        (pair, (zeros, zeros), lambda z: z),
        (named, {"a": zeros, "b": zeros}, lambda z: (z["a"], z["b"])),
    ):
        z = unroll(f, z0, x, steps=5, checkpoint_every=checkpoint_every)
        assert type(z) is type(z0)
        a, b = leaves(z)
        got = torch.autograd.grad(a.sum() + 3 * b.sum(), [W, x])
        a, b = leaves(plain_loop(f, z0, x, 5))
        want = torch.autograd.grad(a.sum() + 3 * b.sum(), [W, x])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def saved_state_bytes(fn):
    """Bytes of the distinct tensors autograd saves while ``fn`` runs, parameters excluded
    (a tensor saved twice, such as an input every segment sees, counts once)."""
    seen = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_checkpointing_bounds_the_saved_states():
    cell = TanhCell(n=64, d=64, scale=0.9)
    x = torch.randn(16, 64, dtype=F64)
    z0 = torch.zeros(16, 64, dtype=F64)
    state = z0.numel() * z0.element_size()
    steps = 32
    plain, _ = saved_state_bytes(lambda: unroll(cell, z0, x, steps=steps))
    assert plain >= steps * state  # at least one state per step
    for every in (4, 8, 16):
        saved, z = saved_state_bytes(
            lambda e=every: unroll(cell, z0, x, steps=steps, checkpoint_every=e)
        )
        # Only the inputs of the steps / every segments (and x) stay; the backward pass
        # recomputes each segment's states from its input.
        assert saved <= (steps // every) * state + x.nbytes, (every, saved / state)
        z.sum().backward()
    assert saved < plain / 8


def test_backward_recomputes_each_segment_once_last_first():
    cell = TanhCell(n=5, d=3, scale=0.9)
    x = torch.randn(2, 3, dtype=F64)
    seen = []

    def f(z, x):
        seen.append(float(z[0, 0].detach()))  # which state each call starts from
        return cell(z, x)

    z0 = torch.randn(2, 5, dtype=F64)
    z = unroll(f, z0, x, steps=10, checkpoint_every=4)
    forward, seen[:] = list(seen), []
    z.sum().backward()
    # Segments [0, 4), [4, 8), [8, 10), recomputed from their saved inputs, one at a time.
    assert seen == forward[8:10] + forward[4:8] + forward[0:4]

    seen.clear()
    unroll(f, z0, x, steps=10).sum().backward()
    assert len(seen) == 10  # without checkpointing, the backward pass calls f no more


class NormedCell(nn.Module):
    """A spectral-normalised cell with variational dropout: both must stay one map."""

    def __init__(self):
        super().__init__()
        self.lin = spectral_norm(nn.Linear(6, 6).double())
        self.drop = VariationalDropout(p=0.3)

    def forward(self, z, x):
        return torch.tanh(0.9 * self.drop(self.lin(z)) + x)


def test_unroll_enters_one_map_for_modules():
    cell = NormedCell().train()
    x = torch.randn(3, 6, dtype=F64)
    z0 = torch.zeros(3, 6, dtype=F64)
    reference = copy.deepcopy(cell)
    torch.manual_seed(0)
    got = unroll(cell, z0, x, steps=6)
    torch.manual_seed(0)
    with one_map(reference):
        want = plain_loop(reference, z0, x, 6)
    torch.testing.assert_close(got, want, atol=1e-14, rtol=0)


def test_checkpointed_module_replays_its_weights_and_masks():
    cell = NormedCell().train()
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    z0 = torch.zeros(3, 6, dtype=F64)
    c = torch.randn(3, 6, dtype=F64)
    reference = copy.deepcopy(cell)

    torch.manual_seed(1)
    z = unroll(cell, z0, x, steps=8, checkpoint_every=3)
    # Another forward before the backward pass: a new mask, another power iteration.
    unroll(cell, z0, x, steps=8, checkpoint_every=3)
    u_before = cell.lin.parametrizations.weight[0]._u.clone()
    params = [x, *cell.parameters()]
    got = torch.autograd.grad((c * z).sum(), params)
    # The backward pass neither advanced the power iteration nor drew masks.
    assert torch.equal(cell.lin.parametrizations.weight[0]._u, u_before)

    torch.manual_seed(1)
    want_z = unroll(reference, z0, x, steps=8)
    want = torch.autograd.grad((c * want_z).sum(), [x, *reference.parameters()])
    torch.testing.assert_close(z, want_z, atol=0, rtol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_unroll_without_grad_records_nothing():
    cell = TanhCell()
    x = torch.randn(2, 3, dtype=F64)
    with torch.no_grad():
        z = unroll(cell, torch.zeros(2, 5, dtype=F64), x, steps=4, checkpoint_every=2)
    assert not z.requires_grad
    torch.testing.assert_close(z, plain_loop(cell, torch.zeros(2, 5, dtype=F64), x, 4).detach())


def test_warm_up_then_equilibrium():
    cell = TanhCell(n=5, d=3, scale=0.6)
    deq = il.DEQ(cell, solver=il.Anderson(max_iter=100, rtol=1e-10))
    x = torch.randn(4, 3, dtype=F64)
    z0 = torch.zeros(4, 5, dtype=F64)
    z = unroll(deq.f, z0, x, steps=8, checkpoint_every=4)
    z.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cell.parameters())
    z_star, result = deq(x, z0=z0)
    assert result.converged.all()
    # Eight steps of a 0.6-contraction already sit near the fixed point.
    assert float((z.detach() - z_star.detach()).abs().max()) < 0.6**8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, r"steps must be >= 1, got 0"),
        ({"steps": 2.5}, TypeError, r"steps must be an int, got 2.5"),
        ({"steps": 4, "checkpoint_every": 0}, ValueError, r"checkpoint_every must be >= 1"),
        ({"steps": 4, "checkpoint_every": 2.0}, TypeError, r"checkpoint_every must be an int"),
    ],
)
def test_unroll_validates_its_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        unroll(TanhCell(), torch.zeros(2, 5, dtype=F64), torch.zeros(2, 3, dtype=F64), **kwargs)


def test_unroll_rejects_bad_f_and_states():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="steps"):
        unroll(lambda z, x: z, torch.zeros(2, 3), x)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"f must be an nn\.Module or callable"):
        unroll(3, torch.zeros(2, 3), x, steps=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a state must be a Tensor"):
        unroll(lambda z, x: z, 1.0, x, steps=2)
    with pytest.raises(ValueError, match=r"returned \(B, 4\) for a state of structure \(B, 3\)"):
        unroll(lambda z, x: torch.zeros(2, 4), torch.zeros(2, 3), x, steps=2)
