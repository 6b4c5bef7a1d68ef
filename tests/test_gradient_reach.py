"""Every tensor that requires grad and that f depends on gets its gradient, under every rule.

However f reaches it: a top-level input, a tensor inside a dict, list, tuple, named tuple or
dataclass input, a parameter, a buffer or a plain tensor attribute of an ``nn.Module`` f, the
closure of a plain function, or a global (found by one probing application of f). The
reference for each case is the same computation with the tensor passed as a top-level input,
which the DEQ has always seen, and for implicit differentiation the closed form.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch
from registry import RULE_PARAMS
from torch import nn
from zoo import Affine

import implicitlayers as il

F64 = torch.float64
TIGHT = il.Anderson(max_iter=300, rtol=1e-13, atol=1e-14)
EXACT = il.ImplicitDifferentiation(solver=il.GMRES(rtol=1e-13, atol=1e-15))
#: Every rule of the registry.
RULES = [pytest.param(p.values[0].rule, id=p.id) for p in RULE_PARAMS]
PROBLEM = Affine.make(n=5, d=3, contraction=0.6, seed=7)


def frozen_affine(z, y, k):
    """``W z + U y + k``: the affine map with its shift ``k`` as the learnable tensor."""
    return z @ PROBLEM.W.T + y @ PROBLEM.U.T + k


def reference_grad(rule, y, k, c):
    """d(sum c z*)/dk with k a top-level input of the DEQ."""
    k = k.detach().clone().requires_grad_()
    z, _ = il.DEQ(frozen_affine, solver=TIGHT, backward=rule)(y, k, z0=torch.zeros(2, 5, dtype=F64))
    (g,) = torch.autograd.grad((c * z).sum(), k)
    return g


class Pair(NamedTuple):
    y: torch.Tensor
    k: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Inputs:
    y: torch.Tensor
    k: torch.Tensor


NESTINGS = {
    "dict": (lambda y, k: ({"y": y, "k": k},), lambda z, i: frozen_affine(z, i["y"], i["k"])),
    "list": (lambda y, k: ([y, [k]],), lambda z, i: frozen_affine(z, i[0], i[1][0])),
    "namedtuple": (lambda y, k: (Pair(y, k),), lambda z, p: frozen_affine(z, p.y, p.k)),
    "dataclass": (lambda y, k: (Inputs(y, k),), lambda z, d: frozen_affine(z, d.y, d.k)),
}


class Frozen(nn.Module):
    """``f`` as an ``nn.Module`` whose own layer is frozen (the case where the DEQ used to
    decide from ``f.parameters()`` alone that nothing needs a gradient)."""

    def __init__(self, f) -> None:
        super().__init__()
        self.fn = f
        self.lin = nn.Linear(2, 2).requires_grad_(False)

    def forward(self, z, *inputs):
        return self.fn(z, *inputs)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("nesting", list(NESTINGS))
def test_a_tensor_inside_a_nested_input_gets_its_gradient(rule, nesting):
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(2, 3, generator=gen, dtype=F64)
    k = torch.randn(2, 5, generator=gen, dtype=F64)
    c = torch.randn(2, 5, generator=gen, dtype=F64)
    pack, f = NESTINGS[nesting]
    leaf = k.clone().requires_grad_()
    deq = il.DEQ(Frozen(f), solver=TIGHT, backward=rule)
    z, _ = deq(*pack(y, leaf), z0=torch.zeros(2, 5, dtype=F64))
    assert z.requires_grad
    (c * z).sum().backward()
    torch.testing.assert_close(leaf.grad, reference_grad(rule, y, k, c), rtol=1e-10, atol=1e-12)


def test_implicit_differentiation_of_a_nested_input_is_the_closed_form():
    # dL/dk = (I - W^T)^{-1} c for L = sum c z*, z* = W z* + U y + k.
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(2, 3, generator=gen, dtype=F64)
    k = torch.randn(2, 5, generator=gen, dtype=F64, requires_grad=True)
    c = torch.randn(2, 5, generator=gen, dtype=F64)
    deq = il.DEQ(
        Frozen(lambda z, i: frozen_affine(z, i["y"], i["k"])), solver=TIGHT, backward=EXACT
    )
    z, _ = deq({"y": y, "k": k}, z0=torch.zeros(2, 5, dtype=F64))
    (c * z).sum().backward()
    torch.testing.assert_close(k.grad, PROBLEM.adjoint(c), rtol=1e-10, atol=1e-12)


class Holder(nn.Module):
    """The affine map whose shift is held by the module in the way ``how`` names; its own
    layers frozen."""

    def __init__(self, k: torch.Tensor, how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5, bias=False, dtype=F64).requires_grad_(False)
        with torch.no_grad():
            self.lin.weight.copy_(PROBLEM.W)
        self.how = how
        if how == "buffer":
            self.register_buffer("k", k)
        elif how == "attribute":
            self.k = k
        else:  # a submodule's attribute
            self.inner = nn.Module()
            self.inner.k = k

    def shift(self) -> torch.Tensor:
        return self.inner.k if self.how == "submodule" else self.k

    def forward(self, z, y):
        return self.lin(z) + y @ PROBLEM.U.T + self.shift()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("how", ["buffer", "attribute", "submodule"])
def test_a_tensor_held_by_a_frozen_module_gets_its_gradient(rule, how):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(2, 3, generator=gen, dtype=F64)
    k = torch.randn(2, 5, generator=gen, dtype=F64)
    c = torch.randn(2, 5, generator=gen, dtype=F64)
    leaf = k.clone().requires_grad_()
    deq = il.DEQ(Holder(leaf, how), solver=TIGHT, backward=rule)
    z, _ = deq(y, z0=torch.zeros(2, 5, dtype=F64))
    assert z.requires_grad
    (c * z).sum().backward()
    torch.testing.assert_close(leaf.grad, reference_grad(rule, y, k, c), rtol=1e-10, atol=1e-12)


#: Reached by f only through this global.
GLOBAL: dict = {}


def _global_shift(z, y):
    return frozen_affine(z, y, GLOBAL["k"])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("how", ["closure", "global"])
def test_a_tensor_a_plain_f_closes_over_or_reads_globally_gets_its_gradient(rule, how):
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(2, 3, generator=gen, dtype=F64)
    k = torch.randn(2, 5, generator=gen, dtype=F64)
    c = torch.randn(2, 5, generator=gen, dtype=F64)
    leaf = k.clone().requires_grad_()
    if how == "closure":
        f = lambda z, y: frozen_affine(z, y, leaf)  # noqa: E731
    else:
        GLOBAL["k"] = leaf
        f = _global_shift
    z, _ = il.DEQ(f, solver=TIGHT, backward=rule)(y, z0=torch.zeros(2, 5, dtype=F64))
    assert z.requires_grad
    (c * z).sum().backward()
    torch.testing.assert_close(leaf.grad, reference_grad(rule, y, k, c), rtol=1e-10, atol=1e-12)


def test_with_nothing_to_differentiate_the_output_carries_no_graph():
    y = torch.randn(2, 3, dtype=F64)
    k = torch.randn(2, 5, dtype=F64)
    z, result = il.DEQ(frozen_affine, solver=TIGHT)(y, k, z0=torch.zeros(2, 5, dtype=F64))
    assert result.converged.all() and not z.requires_grad and z is result.z


def test_nested_inputs_of_failed_samples_are_cleaned_before_the_attach():
    # Sample 1's nested input is NaN: it fails (NONFINITE) and gets no gradient, and its NaN
    # cannot reach sample 0's gradient or k's.
    y = torch.tensor([[0.5, -0.2, 0.1], [float("nan"), 0.0, 0.0]], dtype=F64)
    k = torch.zeros(2, 5, dtype=F64, requires_grad=True)
    solver = il.Anderson(max_iter=100, rtol=1e-12, on_nonfinite="ignore")
    deq = il.DEQ(Frozen(lambda z, i: frozen_affine(z, i["y"], i["k"])), solver=solver)
    z, result = deq({"y": y, "k": k}, z0=torch.zeros(2, 5, dtype=F64))
    assert result.status.tolist() == [il.Status.SUCCESS, il.Status.NONFINITE]
    z[0].sum().backward()
    assert torch.isfinite(k.grad).all() and k.grad[1].abs().sum() == 0
    torch.testing.assert_close(k.grad[0], torch.ones(5, dtype=F64), rtol=0, atol=0)  # JFB


def test_independent_samples_select_the_rows_of_nested_inputs_too():
    # Every tensor batched like the state, however deep, is cut to the running samples.
    rates = torch.tensor([[0.1], [0.9], [0.5]], dtype=F64)
    x = torch.tensor([[1.0], [2.0], [3.0]], dtype=F64)
    seen = []

    def f(z, inputs):
        seen.append((z.shape[0], inputs["rate"][0].shape[0], inputs["x"].shape[0]))
        return inputs["rate"][0] * z + inputs["x"]

    solver = il.Picard(max_iter=500, rtol=1e-12, atol=0.0)
    nested = {"rate": [rates], "x": x}
    result = il.fixed_point(f, torch.zeros(3, 1, dtype=F64), nested, solver=solver,
                            independent_samples=True)  # fmt: skip
    assert result.converged.all()
    torch.testing.assert_close(result.z, x / (1 - rates), rtol=1e-10, atol=0)
    assert all(a == b == c for a, b, c in seen) and {s[0] for s in seen} == {1, 2, 3}
