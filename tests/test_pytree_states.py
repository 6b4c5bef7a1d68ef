"""States that are nested dicts, lists and tuples of tensors solve like one flat tensor.

Every key order, nesting and mix of leaf sizes round-trips exactly, and a solve on the
structured state gives, leaf for leaf, the answer of the same map on the flat state (a dense
reference). A flatten that sorted dict keys while the unflatten kept insertion order would
swap values between keys of different sizes: these states have unsorted keys and unequal
leaves on purpose.
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

import implicitlayers as il
from implicitlayers import _tree

F64 = torch.float64
KEYS = ["zeta", "alpha", "mid", "b", "a", "omega"]  # never in sorted order below

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def trees(depth: int = 2):
    """Structures of leaf shapes: a shape, or a dict (unsorted keys), list or tuple of them."""
    leaf = shapes.map(lambda s: ("leaf", s))
    if depth == 0:
        return leaf
    child = trees(depth - 1)
    keyed = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True).flatmap(
        lambda keys: st.tuples(*[child for _ in keys]).map(
            lambda values: ("dict", dict(zip(sorted(keys, reverse=True), values, strict=True)))
        )
    )
    listed = st.lists(child, min_size=1, max_size=3)
    return st.one_of(
        leaf,
        keyed,
        listed.map(lambda items: ("list", items)),
        listed.map(lambda items: ("tuple", items)),
    )


def build(structure, batch: int, make):
    """The state of ``structure``, each leaf ``make((batch, *shape))``."""
    kind, body = structure
    if kind == "leaf":
        return make((batch, *body))
    if kind == "dict":
        return {k: build(v, batch, make) for k, v in body.items()}
    items = [build(v, batch, make) for v in body]
    return items if kind == "list" else tuple(items)


@settings(max_examples=60, deadline=None)
@given(structure=trees(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_flatten_and_unflatten_round_trip_exactly(structure, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    state = build(structure, batch, lambda shape: torch.randn(shape, generator=gen, dtype=F64))
    spec = _tree.spec_of(state)
    flat = _tree.flatten(state)
    assert flat.shape == (batch, spec.numel)
    back = _tree.unflatten(flat, spec)
    assert _tree.spec_of(back) == spec
    for got, want in zip(_tree.leaves(back), _tree.leaves(state), strict=True):
        assert torch.equal(got, want)
    # Dict keys come back in their own order, not sorted.
    assert _key_orders(back) == _key_orders(state)


def _key_orders(tree):
    if isinstance(tree, dict):
        return [list(tree), *[_key_orders(v) for v in tree.values()]]
    if isinstance(tree, (list, tuple)):
        return [_key_orders(v) for v in tree]
    return None


@settings(max_examples=25, deadline=None)
@given(structure=trees(), seed=st.integers(0, 2**16))
def test_a_structured_state_solves_like_the_flat_one(structure, seed):
    # f acts on the flat vector of the state, z = W z + c with ||W|| = 0.6: the structured
    # solve must give the dense solution (I - W)^{-1} c, leaf by leaf, in flattening order.
    batch = 2
    gen = torch.Generator().manual_seed(seed)
    template = build(structure, batch, lambda shape: torch.zeros(shape, dtype=F64))
    spec = _tree.spec_of(template)
    n = spec.numel
    if n == 0:
        return
    W = torch.randn(n, n, generator=gen, dtype=F64)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
    c = torch.randn(batch, n, generator=gen, dtype=F64)

    def f(z):
        flat = _tree.flatten(z)
        return _tree.unflatten(flat @ W.T + c, spec)

    solver = il.Anderson(max_iter=200, rtol=1e-13, atol=1e-14)
    result = il.fixed_point(f, template, solver=solver)
    assert result.converged.all()
    want = torch.linalg.solve(torch.eye(n, dtype=F64) - W, c.T).T
    got = _tree.flatten(result.z)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Leaf by leaf, in the state's own (unsorted) key order.
    offset = 0
    for leaf in _tree.leaves(result.z):
        size = leaf[0].numel()
        torch.testing.assert_close(leaf.reshape(batch, -1), want[:, offset : offset + size])
        offset += size


def test_a_dict_state_with_unsorted_keys_and_unequal_leaves():
    # The planted bug's case, spelled out: keys "z" (3 entries) before "a" (1 entry).
    def f(state, x):
        return {"z": 0.5 * state["z"] + x, "a": 0.25 * state["a"] + 1.0}

    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    z0 = {"z": torch.zeros(1, 3, dtype=F64), "a": torch.zeros(1, 1, dtype=F64)}
    r = il.fixed_point(f, z0, x, solver=il.Anderson(rtol=1e-12, atol=0.0))
    assert list(r.z) == ["z", "a"]
    torch.testing.assert_close(r.z["z"], 2 * x)
    torch.testing.assert_close(r.z["a"], torch.full((1, 1), 4 / 3, dtype=F64))


def test_states_may_be_dicts_whose_leaves_couple():
    def f(z, x):
        a, b = z["a"], z["b"]
        return {"a": 0.5 * b + x, "b": 0.25 * a}

    x = torch.randn(3, 2, dtype=F64)
    z0 = {"a": torch.zeros(3, 2, dtype=F64), "b": torch.zeros(3, 2, dtype=F64)}
    result = il.fixed_point(f, z0, x, solver=il.Anderson(atol=0, rtol=1e-12, max_iter=100))
    # a = 0.5 b + x, b = 0.25 a  =>  a = x / (1 - 0.125)
    torch.testing.assert_close(result.z["a"], x / 0.875)
    torch.testing.assert_close(result.z["b"], 0.25 * x / 0.875)


def test_a_state_of_images_and_a_non_contiguous_f_output_are_handled():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.mul_(0.1)
    x = torch.randn(3, 2, 5, 5, dtype=F64)
    f = lambda z: torch.tanh(conv(z) + x).transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731
    result = il.fixed_point(f, torch.zeros_like(x), solver=il.Anderson(rtol=1e-10, atol=0.0))
    assert result.converged.all() and result.z.shape == x.shape
    torch.testing.assert_close(f(result.z), result.z, atol=1e-8, rtol=0)
