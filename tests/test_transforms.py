"""A DEQ composes with torch.func, forward mode and batched gradients, under every rule.

The reference for every derivative is the rule's own formula in closed form, built from dense
per-sample Jacobians at the fixed point of a float64 tanh cell: with
:math:`J = \\partial f / \\partial z` and :math:`F = \\partial f / \\partial x`,
``ImplicitDifferentiation`` gives :math:`(I - J)^{-1} F` (the implicit function theorem), JFB
:math:`F`, ``Neumann(k)`` :math:`\\sum_{i \\le k} J^i F` and the phantom rules
:math:`\\lambda \\sum_{i < k} ((1 - \\lambda) I + \\lambda J)^i F`, the same in reverse and
forward mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import implicitlayers as il

# torch's forward-mode transforms, on their first use in a process, script a helper and warn
# that TorchScript is deprecated: torch's own internals, not this library's.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

F64 = torch.float64
TIGHT = il.Anderson(max_iter=300, rtol=1e-13, atol=1e-14)
EXACT = il.ImplicitDifferentiation(solver=il.GMRES(rtol=1e-13, atol=1e-15))


class Cell(nn.Module):
    """:math:`f(z, x) = \\tanh(W z + U x + b)` with :math:`\\|W\\|_2 = 0.6`."""

    def __init__(self, n: int = 4, d: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=gen, dtype=F64)
        self.W = nn.Parameter(0.6 * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(n, d, generator=gen, dtype=F64))
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=gen, dtype=F64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def formula(rule, J, F):
    """The rule's d z* / d x for one sample, from dense J (n, n) and F (n, d)."""
    n = J.shape[0]
    eye = torch.eye(n, dtype=F64)
    if isinstance(rule, il.ImplicitDifferentiation):
        return torch.linalg.solve(eye - J, F)
    if isinstance(rule, il.JFB):
        return F
    if isinstance(rule, il.Neumann):
        return sum(torch.linalg.matrix_power(J, i) @ F for i in range(rule.terms + 1))
    lam = rule.mixing
    terms = rule.steps - 1 if isinstance(rule, il.PhantomGradient) else rule.terms
    B = (1 - lam) * eye + lam * J
    return lam * sum(torch.linalg.matrix_power(B, i) @ F for i in range(terms + 1))


RULES = [
    EXACT,
    il.ImplicitDifferentiation(solver=il.Anderson(max_iter=200, rtol=1e-13, atol=1e-15)),
    il.JFB(),
    il.Neumann(terms=3),
    il.PhantomGradient(steps=3, mixing=0.7),
    il.NeumannPhantom(terms=3, mixing=0.7),
]
IDS = ["implicit-gmres", "implicit-anderson", "jfb", "neumann", "phantom", "neumann-phantom"]


def reference(cell, rule, x):
    """``(z*, d z*/d x)`` per sample, dense."""
    z, _ = il.DEQ(cell, solver=TIGHT)(x, z0=torch.zeros(x.shape[0], 4, dtype=F64))
    z = z.detach()
    out = []
    for zi, xi in zip(z, x, strict=True):
        J = torch.autograd.functional.jacobian(lambda v, xi=xi: cell(v[None], xi[None])[0], zi)
        F = torch.autograd.functional.jacobian(lambda v, zi=zi: cell(zi[None], v[None])[0], xi)
        out.append(formula(rule, J, F))
    return z, torch.stack(out)


def one_sample(cell, rule):
    deq = il.DEQ(cell, solver=TIGHT, backward=rule)
    return lambda xi: deq(xi[None], z0=torch.zeros(1, 4, dtype=F64)).z[0]


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_jacrev_and_jacfwd_are_the_rules_formula(rule):
    cell = Cell()
    x = torch.randn(3, 3, dtype=F64)
    _, want = reference(cell, rule, x)
    per = one_sample(cell, rule)
    for transform in (jacrev, jacfwd):
        got = torch.stack([transform(per)(xi) for xi in x])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=transform.__name__)


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_vmap_of_jacrev_and_jacfwd_over_the_batch(rule):
    cell = Cell()
    x = torch.randn(5, 3, dtype=F64)
    z, want = reference(cell, rule, x)
    per = one_sample(cell, rule)
    torch.testing.assert_close(vmap(per)(x), z, rtol=0, atol=1e-12)
    for transform in (jacrev, jacfwd):
        torch.testing.assert_close(vmap(transform(per))(x), want, rtol=1e-10, atol=1e-10)


def test_nested_vmap_folds_every_mapped_dimension_into_the_batch():
    cell = Cell()
    deq = il.DEQ(cell, solver=TIGHT)
    x = torch.randn(2, 3, 4, 3, dtype=F64)  # (outer, inner, batch, features)
    z0 = torch.zeros(4, 4, dtype=F64)
    out = vmap(vmap(lambda xb: deq(xb, z0=z0).z))(x)
    flat, _ = deq(x.reshape(24, 3), z0=torch.zeros(24, 4, dtype=F64))
    torch.testing.assert_close(out, flat.detach().reshape(2, 3, 4, 4), rtol=0, atol=1e-12)
    # Statuses stay per sample, mapped like the solution.
    status = vmap(vmap(lambda xb: deq(xb, z0=z0).result.status))(x)
    assert status.shape == (2, 3, 4) and (status == il.Status.SUCCESS).all()


def test_a_traced_solve_under_vmap_returns_each_mapped_batch_s_trace():
    # The trace is (K, B), not per sample first: under vmap it is (V, K, B), that of the one
    # folded solve, whose first rows are each mapped batch's own trace (a sample that stopped
    # repeats its last residual).
    cell = Cell()
    deq = il.DEQ(cell, solver=il.Picard(max_iter=100, rtol=1e-10, trace=True))
    x = torch.randn(3, 2, 3, dtype=F64)
    z0 = torch.zeros(2, 4, dtype=F64)
    z, trace = vmap(lambda xb: (lambda out: (out.z, out.result.trace))(deq(xb, z0=z0)))(x)
    whole = deq(x.reshape(6, 3), z0=torch.zeros(6, 4, dtype=F64)).result.trace
    assert trace.shape == (3, whole.shape[0], 2)
    assert torch.equal(trace, whole.reshape(-1, 3, 2).movedim(1, 0))
    for v in range(3):
        own = deq(x[v], z0=z0)
        assert torch.equal(trace[v, : own.result.trace.shape[0]], own.result.trace)
        torch.testing.assert_close(z[v], own.z, rtol=0, atol=1e-12)


def test_fixed_point_under_vmap():
    x = torch.randn(6, 2, 3, dtype=F64)
    f = lambda z, x: 0.5 * torch.tanh(z) + x  # noqa: E731
    z = vmap(lambda xb: il.fixed_point(f, torch.zeros_like(xb), xb, solver=TIGHT).z)(x)
    assert ((0.5 * torch.tanh(z) + x - z).abs() < 1e-12).all()


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_per_sample_gradients_by_vmap_of_grad_equal_a_loop(rule):
    cell = Cell()
    deq = il.DEQ(cell, solver=TIGHT, backward=rule)
    params = {k: v.detach() for k, v in deq.named_parameters()}
    x = torch.randn(6, 3, dtype=F64)
    target = torch.randn(6, 4, dtype=F64)

    def loss(p, xi, ti):
        z = functional_call(deq, p, (xi[None],), {"z0": torch.zeros(1, 4, dtype=F64)}).z
        return (z[0] - ti).pow(2).sum()

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(6):
        deq.zero_grad()
        z, _ = deq(x[i : i + 1], z0=torch.zeros(1, 4, dtype=F64))
        (z[0] - target[i]).pow(2).sum().backward()
        for name, p in deq.named_parameters():
            torch.testing.assert_close(batched[name][i], p.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_jvp_and_vjp_of_the_fixed_point(rule):
    cell = Cell()
    x = torch.randn(2, 3, dtype=F64)
    dx = torch.randn(2, 3, dtype=F64)
    _, want = reference(cell, rule, x)
    deq = il.DEQ(cell, solver=TIGHT, backward=rule)
    fn = lambda x: deq(x, z0=torch.zeros(2, 4, dtype=F64)).z  # noqa: E731
    _, tangent = jvp(fn, (x,), (dx,))
    torch.testing.assert_close(
        tangent, torch.einsum("bnd,bd->bn", want, dx), rtol=1e-10, atol=1e-12
    )
    v = torch.randn(2, 4, dtype=F64)
    _, pullback = vjp(fn, x)
    torch.testing.assert_close(pullback(v)[0], torch.einsum("bnd,bn->bd", want, v), rtol=1e-10,
                               atol=1e-12)  # fmt: skip
    # The same with dual tensors (torch.autograd.forward_ad).
    with fwAD.dual_level():
        z = fn(fwAD.make_dual(x, dx))
        torch.testing.assert_close(fwAD.unpack_dual(z).tangent, tangent, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rule", RULES[2:], ids=IDS[2:])
def test_batched_gradients_and_vectorised_jacobians(rule):
    cell = Cell()
    x = torch.randn(3, 3, dtype=F64, requires_grad=True)
    _, want = reference(cell, rule, x.detach())
    deq = il.DEQ(cell, solver=TIGHT, backward=rule)
    z, _ = deq(x, z0=torch.zeros(3, 4, dtype=F64))
    cotangents = torch.zeros(4, 3, 4, dtype=F64)
    cotangents[:, 1] = torch.eye(4, dtype=F64)  # the rows of sample 1's Jacobian
    (rows,) = torch.autograd.grad(z, x, cotangents, is_grads_batched=True)
    torch.testing.assert_close(rows[:, 1], want[1], rtol=1e-10, atol=1e-10)
    full = torch.autograd.functional.jacobian(
        lambda x: deq(x, z0=torch.zeros(3, 4, dtype=F64)).z, x.detach(), vectorize=True
    )
    torch.testing.assert_close(full[1, :, 1], want[1], rtol=1e-10, atol=1e-10)
    assert full[0, :, 1].abs().max() == 0  # samples do not couple


def test_autograd_batched_gradients_name_the_torch_func_way_for_the_exact_rule():
    # autograd's own vmap (is_grads_batched, vectorize=True) lacks batching rules the exact
    # rule's solve needs: refused by name, and torch.func gives the same rows exactly.
    cell = Cell()
    x = torch.randn(3, 3, dtype=F64, requires_grad=True)
    deq = il.DEQ(cell, solver=TIGHT, backward=EXACT)
    z, _ = deq(x, z0=torch.zeros(3, 4, dtype=F64))
    cotangents = torch.zeros(4, 3, 4, dtype=F64)
    cotangents[:, 1] = torch.eye(4, dtype=F64)
    with pytest.raises(RuntimeError, match=r"is_grads_batched=True.*torch\.func\.jacrev"):
        torch.autograd.grad(z, x, cotangents, is_grads_batched=True)
    _, pullback = vjp(lambda x: deq(x, z0=torch.zeros(3, 4, dtype=F64)).z, x.detach())
    rows = vmap(pullback)(cotangents)[0]
    _, want = reference(cell, EXACT, x.detach())
    torch.testing.assert_close(rows[:, 1], want[1], rtol=1e-10, atol=1e-10)


def test_gradcheck_in_both_modes_and_gradgradcheck_with_the_exact_rule():
    cell = Cell()
    deq = il.DEQ(cell, solver=TIGHT, backward=EXACT)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)

    def fn(x):
        return deq(x, z0=torch.zeros(2, 4, dtype=F64)).z

    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_backward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_the_exact_hessian_by_autograd_matches_central_differences():
    cell = Cell()
    deq = il.DEQ(cell, solver=TIGHT, backward=EXACT)

    def loss(xi):
        return deq(xi[None], z0=torch.zeros(1, 4, dtype=F64)).z.pow(3).sum()

    x = torch.randn(3, dtype=F64)
    H = torch.autograd.functional.hessian(loss, x)
    eps, numeric = 1e-5, torch.zeros(3, 3, dtype=F64)
    for i in range(3):
        e = torch.zeros(3, dtype=F64)
        e[i] = eps
        numeric[:, i] = (grad(loss)(x + e) - grad(loss)(x - e)) / (2 * eps)
    torch.testing.assert_close(H, numeric, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(H, H.T, rtol=1e-9, atol=1e-11)


def test_a_torch_func_second_order_through_the_exact_rule_is_refused_by_name():
    per = one_sample(Cell(), EXACT)
    x = torch.randn(3, dtype=F64)
    with pytest.raises(RuntimeError, match=r"second-order derivative under torch.func .* "
                       r"torch.autograd.functional.hessian"):  # fmt: skip
        hessian(lambda xi: per(xi).pow(3).sum())(x)


def test_a_torch_func_hessian_of_an_approximate_rule_is_its_formulas():
    # JFB's second derivative holds z* fixed: that of the one-step map f(z*, x) in x.
    cell = Cell()
    per = one_sample(cell, il.JFB())
    x = torch.randn(3, dtype=F64)
    z = per(x).detach()
    H = hessian(lambda xi: per(xi).sum())(x)
    want = hessian(lambda xi: cell(z[None], xi[None]).sum())(x)
    torch.testing.assert_close(H, want, rtol=1e-10, atol=1e-12)


def test_forward_mode_through_a_map_with_no_parameters_and_under_no_grad():
    # Nothing requires grad (a plain f; the input is a dual tensor, or wrapped by jvp): the
    # tangent must still flow, also under torch.no_grad(), where forward mode works too.
    # (It used to come back None, or zero, with no error.)
    gen = torch.Generator().manual_seed(5)
    W = 0.5 * torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=F64))[0]

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    deq = il.DEQ(f, solver=TIGHT, backward=EXACT)
    x = torch.randn(2, 4, generator=gen, dtype=F64)
    dx = torch.randn(2, 4, generator=gen, dtype=F64)
    z = deq(x).z.detach()
    J = torch.func.vmap(torch.func.jacrev(lambda zi, xi: f(zi[None], xi[None])[0]))(z, x)
    Fx = torch.func.vmap(torch.func.jacrev(lambda xi, zi: f(zi[None], xi[None])[0]))(x, z)
    want = torch.linalg.solve(torch.eye(4, dtype=F64) - J, torch.einsum("bij,bj->bi", Fx, dx))
    _, got = jvp(lambda x: deq(x).z, (x,), (dx,))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for context in (torch.enable_grad, torch.no_grad):
        with context(), fwAD.dual_level():
            tangent = fwAD.unpack_dual(deq(fwAD.make_dual(x, dx)).z).tangent
        assert tangent is not None, context
        torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-12)
