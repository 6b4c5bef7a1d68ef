"""Splitting solvers and ``MonotoneDEQ``: uniqueness, certified rates, bounds and gradients.

The reference equilibrium is a dense semismooth Newton solution in float64, checked to a
residual of 1e-12; every claim of the certificate is tested against it.
"""

from __future__ import annotations

import pytest
import torch
from monotone_zoo import F64, dense_M, dense_newton
from torch.func import functional_call

import implicitlayers as il


def layer(kind: str, seed: int) -> tuple[il.nn.MonotoneCell, torch.Tensor]:
    """A cell with random weights (scaled so that ||W|| > 1) and an input batch."""
    torch.manual_seed(seed)
    if kind == "dense":
        cell: il.nn.MonotoneCell = il.nn.MonotoneLinear(3, 8, margin=0.5).double()
        params = (cell.A, cell.B)
        x = torch.randn(5, 3, dtype=F64)
    elif kind == "lben":
        cell = il.nn.LBEN(3, 8, 2, lipschitz=2.0, margin=0.5).double()
        params = (cell.V, cell.S)
        x = torch.randn(5, 3, dtype=F64)
    else:
        cell = il.nn.MonotoneConv2d(1, 2, margin=0.5).double()
        params = (cell.A, cell.B)
        x = torch.randn(5, 1, 3, 5, dtype=F64)  # odd sizes
    with torch.no_grad():
        for p in params:
            p.mul_(1.5)  # ||W|| about 2.7
        if kind == "lben":
            cell.bias.normal_()
    return cell, x


def newton_solution(cell: il.nn.MonotoneCell, x: torch.Tensor) -> torch.Tensor:
    shape = cell.state_shape(x)
    M = dense_M(cell, shape)
    W = torch.eye(M.shape[0], dtype=F64) - M
    return dense_newton(W, cell.inject(x).detach().reshape(len(x), -1))


KINDS = ["dense", "lben", "conv"]
SOLVERS = [
    il.nn.PeacemanRachford(max_iter=500, rtol=1e-9, atol=1e-12),
    il.nn.PeacemanRachford(alpha=0.2, max_iter=2000, rtol=1e-9, atol=1e-12),
    il.nn.ForwardBackward(max_iter=5000, rtol=1e-9, atol=1e-12),
]
STARTS = 6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_solver_from_every_start_lands_within_the_certified_bound(kind: str, seed: int):
    """Uniqueness: one Newton solution; every solver, from 6 random starts, within its bound."""
    cell, x = layer(kind, seed)
    z_star = newton_solution(cell, x)
    assert z_star.abs().max() > 0.1  # a non-trivial equilibrium (some units active)
    shape = cell.state_shape(x)
    gen = torch.Generator().manual_seed(seed)
    # The starts as one batch: sample i * B + b is input b from start i.
    xs = x.repeat(STARTS, *([1] * (x.dim() - 1)))
    z_star = z_star.repeat(STARTS, 1)
    for solver in SOLVERS:
        z0 = 5 * torch.randn(len(xs), *shape, dtype=F64, generator=gen)
        with torch.no_grad():
            out = il.MonotoneDEQ(cell, solver=solver)(xs, z0=z0)
        assert bool(out.result.converged.all()), out.result.summary()
        error = (out.z.reshape(len(xs), -1) - z_star).norm(dim=1)
        assert out.error_bound is not None
        assert bool((error <= out.error_bound + 1e-12).all()), (solver, error, out.error_bound)
        assert bool((out.error_bound < 1e-4).all())  # and not vacuous


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("solver", SOLVERS[:1] + SOLVERS[2:], ids=["PR", "FB"])
def test_residuals_shrink_at_least_at_the_certified_rate(kind, solver):
    import dataclasses

    cell, x = layer(kind, 2)
    deq = il.MonotoneDEQ(cell, solver=dataclasses.replace(solver, trace=True, rtol=1e-7))
    with torch.no_grad():
        out = deq(x, z0=3 * torch.randn(len(x), *cell.state_shape(x), dtype=F64))
    cert, result = out.certificate, out.result
    assert cert is not None and result.trace is not None
    trace = result.trace  # (K, B): sample b runs for n_steps[b] iterations
    for b in range(len(x)):
        r = trace[: int(result.n_steps[b]), b]
        assert bool((r[1:] <= cert.rate * r[:-1] * (1 + 1e-9) + 1e-15).all())
    # The loop's secant estimate of the rate never exceeds the certified one.
    assert bool((result.rate <= cert.rate * (1 + 1e-9)).all())


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_a_priori_iterations_guarantee_the_error(kind):
    """Run exactly cert.iterations(...) steps and check the error bound it promised."""
    cell, x = layer(kind, 4)
    z_star = newton_solution(cell, x)
    shape = cell.state_shape(x)
    z0 = torch.randn(len(x), *shape, dtype=F64)
    probe = il.MonotoneDEQ(cell, solver=il.nn.PeacemanRachford(max_iter=1, trace=True))
    with torch.no_grad():
        first = probe(x, z0=z0)
    r0 = float(first.result.trace[0].max())
    cert = first.certificate
    target = 1e-5
    k = cert.iterations(target, initial_residual=r0)
    # k steps after z0 means k + 1 evaluations of the map; tolerances that never stop it.
    solver = il.nn.PeacemanRachford(max_iter=k + 1, rtol=0.0, atol=1e-300)
    with torch.no_grad():
        out = il.MonotoneDEQ(cell, solver=solver)(x, z0=z0)
    error = (out.z.reshape(len(x), -1) - z_star).norm(dim=1)
    assert bool((error <= target).all())
    assert bool((error <= cert.error_after(k, r0)).all())
    assert k > 3  # the test means something: the start was not already within the target


def test_a_batch_solves_like_each_sample_alone_and_dtypes_agree():
    cell, x = layer("dense", 5)
    deq = il.MonotoneDEQ(cell, solver=il.nn.PeacemanRachford(rtol=1e-10, atol=1e-12))
    with torch.no_grad():
        z = deq(x).z
        alone = torch.cat([deq(x[i : i + 1]).z for i in range(len(x))])
        compact = il.MonotoneDEQ(cell, solver=deq.solver, independent_samples=True)(x).z
        out32 = il.MonotoneDEQ(cell.float(), solver=il.nn.PeacemanRachford())(x.float())
    torch.testing.assert_close(alone, z, rtol=0, atol=1e-9)
    torch.testing.assert_close(compact, z, rtol=0, atol=1e-9)
    assert out32.z.dtype == torch.float32
    assert bool(out32.result.converged.all())
    assert out32.error_bound is not None
    err32 = (out32.z.double() - z).norm(dim=1)
    assert bool((err32 <= out32.error_bound.double() + 1e-5).all())


def test_every_success_has_a_small_residual_of_the_equilibrium_map():
    cell, x = layer("conv", 6)
    for solver in (il.nn.PeacemanRachford(rtol=1e-6), il.nn.ForwardBackward(rtol=1e-6)):
        with torch.no_grad():
            out = il.MonotoneDEQ(cell, solver=solver)(x)
        assert bool(out.result.converged.all())
        # Re-evaluated, independently of the solver: the natural residual and its bound.
        natural = (cell(out.z, x) - out.z).flatten(1).norm(dim=1)
        assert bool((natural <= 1e-4 * out.z.flatten(1).norm(dim=1)).all())
        assert bool((cell.certify(out.z, x) <= 1e-3).all())


def test_a_warm_start_from_the_iterated_variable_saves_iterations():
    cell, x = layer("dense", 12)
    deq = il.MonotoneDEQ(cell, solver=il.nn.PeacemanRachford(max_iter=300, rtol=1e-8))
    with torch.no_grad():
        out = deq(x)
        warm = deq(x + 1e-3, z0=out.result.z)
        cold = deq(x + 1e-3)
    assert bool(warm.result.converged.all()) and bool(cold.result.converged.all())
    assert warm.result.n_steps.sum() < 0.8 * cold.result.n_steps.sum()
    assert warm.error_bound is not None and cold.error_bound is not None
    gap = (warm.z - cold.z).norm(dim=1)
    assert bool((gap <= warm.error_bound + cold.error_bound).all())  # one equilibrium


def test_certify_false_skips_the_certificate_and_solves_the_same():
    cell, x = layer("dense", 7)
    with torch.no_grad():
        full = il.MonotoneDEQ(cell)(x)
        light = il.MonotoneDEQ(cell, certify=False)(x)
    assert light.certificate is None and light.error_bound is None
    assert full.certificate is not None
    torch.testing.assert_close(light.z, full.z, rtol=0, atol=0)


def test_the_layer_saves_copies_and_takes_an_empty_batch():
    import copy
    import io

    cell, x = layer("conv", 11)
    deq = il.MonotoneDEQ(cell)
    with torch.no_grad():
        z = deq(x).z
    assert sorted(deq.state_dict()) == ["cell.A", "cell.B", "cell.U.bias", "cell.U.weight"]
    buffer = io.BytesIO()
    torch.save(deq, buffer)  # the per-forward operator is not pickled
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).z, z, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(deq)(x).z, z, rtol=0, atol=0)
        empty = deq(x[:0])
    assert empty.z.shape == (0, *z.shape[1:]) and empty.error_bound is not None
    dense = il.MonotoneDEQ(il.nn.MonotoneLinear(3, 4))
    x0 = torch.zeros(0, 3, requires_grad=True)
    dense(x0).z.sum().backward()
    assert x0.grad is not None and x0.grad.shape == (0, 3)


# -- Gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "splitting"),
    [
        ("dense", il.nn.PeacemanRachford),
        ("dense", il.nn.ForwardBackward),
        ("lben", il.nn.PeacemanRachford),
        ("lben", il.nn.ForwardBackward),
        ("conv", il.nn.PeacemanRachford),  # conv + FB: the operator's gradient is checked below
    ],
)
def test_gradcheck_through_implicit_differentiation(kind, splitting):
    """Gradients in x and every parameter, through the splitting operator's fixed point."""
    torch.manual_seed(8)
    if kind == "dense":
        cell: il.nn.MonotoneCell = il.nn.MonotoneLinear(2, 4, margin=0.5).double()
        x = torch.randn(2, 2, dtype=F64)
    elif kind == "lben":
        cell = il.nn.LBEN(2, 4, 2, lipschitz=2.0, margin=0.5).double()
        x = torch.randn(2, 2, dtype=F64)
    else:
        cell = il.nn.MonotoneConv2d(1, 2, margin=1.0).double()
        x = torch.randn(1, 1, 3, 2, dtype=F64)
    tight = dict(rtol=1e-13, atol=1e-14)
    solver = splitting(max_iter=5000, **tight)
    rule = il.ImplicitDifferentiation(solver=il.GMRES(max_iter=400, **tight))
    deq = il.MonotoneDEQ(cell, solver=solver, backward=rule, certify=False)
    names = [name for name, _ in deq.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in deq.parameters())

    def fn(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        out = functional_call(deq, dict(zip(names, values, strict=True)), (x,))
        return cell.output(out.z) if kind == "lben" else out.z

    with torch.no_grad():
        z = deq(x).z
    assert z.abs().max() > 0.1 and (z == 0).any()  # ReLU both active and inactive
    inputs = (x.clone().requires_grad_(), *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert deq.last_backward_result is not None
    assert bool(deq.last_backward_result.converged.all())


@pytest.mark.parametrize(
    ("kind", "splitting"),
    [
        ("dense", il.nn.PeacemanRachford),
        ("dense", il.nn.ForwardBackward),
        ("lben", il.nn.PeacemanRachford),
        ("lben", il.nn.ForwardBackward),
        ("conv", il.nn.PeacemanRachford),  # conv + FB: thousands of steps, the same bound
    ],
)
def test_the_default_adjoint_contracts_at_the_certified_rate(kind, splitting):
    """||J|| <= rate at the fixed point, so the Picard adjoint's residuals shrink as fast."""
    cell, x = layer(kind, 10)
    rule = il.ImplicitDifferentiation(solver=il.Picard(max_iter=5000, rtol=1e-8, trace=True))
    deq = il.MonotoneDEQ(cell, solver=splitting(max_iter=5000, rtol=1e-8), backward=rule)
    out = deq(x.clone().requires_grad_())
    (out.z * torch.randn_like(out.z)).sum().backward()
    adjoint, cert = deq.last_backward_result, out.certificate
    assert adjoint is not None and cert is not None and adjoint.trace is not None
    assert bool(adjoint.converged.all())
    for b in range(len(x)):
        r = adjoint.trace[: int(adjoint.n_steps[b]), b]
        assert bool((r[1:] <= cert.rate * r[:-1] * (1 + 1e-9) + 1e-15).all())
    # And the default rule is that certified Picard adjoint.
    assert isinstance(il.MonotoneDEQ(cell).backward.solver, il.Picard)


def test_gradcheck_of_the_conv_cells_operator():
    """The periodic convolutions' Fourier operator (what forward-backward iterates), in the
    state, the input and the kernels."""
    torch.manual_seed(13)
    cell = il.nn.MonotoneConv2d(1, 2, margin=0.5).double()
    z = torch.randn(2, 2, 3, 2, dtype=F64, requires_grad=True)
    x = torch.randn(2, 1, 3, 2, dtype=F64, requires_grad=True)
    names = [name for name, _ in cell.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in cell.parameters())

    def fn(z: torch.Tensor, x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return functional_call(cell, dict(zip(names, values, strict=True)), (z, x))

    assert torch.autograd.gradcheck(fn, (z, x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def _deq_supports_torch_func() -> bool:
    probe = il.DEQ(lambda z, x: 0.5 * z + x)
    try:
        torch.func.jacrev(lambda x: probe(x).z)(torch.ones(1, 1))
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _deq_supports_torch_func(), reason="DEQ is not torch.func-ready here")
def test_torch_func_transforms_agree_with_finite_differences_and_batches():
    cell, x = layer("conv", 14)
    x = x[:2]
    deq = il.MonotoneDEQ(cell, solver=il.nn.PeacemanRachford(rtol=1e-11, atol=1e-13))
    J = torch.func.jacrev(lambda x: deq(x).z)(x)
    e = torch.zeros_like(x)
    e[1, 0, 2, 3] = 1e-6
    with torch.no_grad():
        fd = (deq(x + e).z - deq(x - e).z) / 2e-6
        batched = torch.func.vmap(lambda xi: deq(xi[None]).z[0])(x)
        whole = deq(x).z
    torch.testing.assert_close(J[:, :, :, :, 1, 0, 2, 3], fd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-9)


# -- Errors -------------------------------------------------------------------------------------


def test_splitting_solvers_refuse_other_maps():
    with pytest.raises(TypeError, match=r"il\.MonotoneDEQ\(cell, solver=il\.nn\.ForwardBackward"):
        il.fixed_point(lambda z: 0.5 * z, torch.zeros(2, 3), solver=il.nn.ForwardBackward())
    deq = il.DEQ(il.nn.MonotoneLinear(3, 3), solver=il.nn.PeacemanRachford())
    with pytest.raises(TypeError, match="PeacemanRachford iterates the splitting operator"):
        deq(torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: il.nn.ForwardBackward(alpha=0.0), ValueError, "alpha must .*alpha=0.0"),
        (lambda: il.nn.PeacemanRachford(alpha=-1), ValueError, "alpha=-1"),
        (lambda: il.nn.PeacemanRachford(alpha="1"), TypeError, "alpha must be a float"),
        (lambda: il.nn.PeacemanRachford(mixing=0.5), TypeError, "mixing"),
        (
            lambda: il.MonotoneDEQ(il.nn.MonotoneLinear(2, 2), solver=il.Anderson()),
            TypeError,
            r"il\.DEQ\(cell, solver=\.\.\.\)",
        ),
        (lambda: il.MonotoneDEQ(torch.nn.Linear(2, 2)), TypeError, "cell must be a MonotoneCell"),
        (
            lambda: il.MonotoneDEQ(il.nn.MonotoneLinear(2, 2), certify=1),
            TypeError,
            "certify must be a bool",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_an_uncertified_step_warns_and_its_bounds_still_hold():
    cell, x = layer("dense", 9)
    alpha = cell.certified_alpha((8,), il.nn.ForwardBackward())
    while cell.certificate((8,), il.nn.ForwardBackward(alpha=alpha)).certified:
        alpha *= 1.25
    solver = il.nn.ForwardBackward(alpha=alpha, max_iter=3000, rtol=1e-10)
    deq = il.MonotoneDEQ(cell, solver=solver)
    with pytest.warns(il.ConvergenceWarning, match=r"not a certified contraction.*alpha=None"):
        out = deq(x)
    assert out.certificate is not None and not out.certificate.certified
    assert out.error_bound is not None
    # FB's bound from strong monotonicity holds for any step and any state: every sample's
    # error is bounded by what the output reports, converged or not.
    error = (out.z - newton_solution(cell, x)).norm(dim=1)
    assert bool((error <= out.error_bound + 1e-12).all())
