"""What the fast paths must not change: Anderson's safeguard, host reads, compiled chunks.

The driver loop has two paths (host reads every iteration where they are free; none inside
a chunk of ``check_every`` iterations elsewhere) and a fast iteration for the common case;
Anderson keeps a relative ridge and rejects extrapolations that raise the residual. These
tests pin the results, not the timings (those are in ``benchmarks/``).
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import implicitlayers as il

F64 = torch.float64
SOLVERS = [il.Picard, il.Anderson, il.Broyden]
IDS = ["picard", "anderson", "broyden"]


# --- Anderson on maps that Picard solves in a few steps ------------------------------------


def _picard_easy_maps():
    """Maps Picard solves in 5 to 12 evaluations at rtol 1e-10 (float64, batch 4)."""
    gen = torch.Generator().manual_seed(19)
    n = 28
    W1, b1 = torch.randn(8, n, generator=gen, dtype=F64) / math.sqrt(n), torch.randn(8, dtype=F64)
    W2, b2 = torch.randn(n, 8, generator=gen, dtype=F64) / math.sqrt(8), torch.randn(n, dtype=F64)
    A = torch.randn(64, 64, generator=gen, dtype=F64)
    A = A / torch.linalg.matrix_norm(A, 2)
    x = torch.randn(4, 64, generator=gen, dtype=F64)
    r0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64).repeat(4, 1)

    def robertson(y):
        a, b, c = y.unbind(dim=1)
        return torch.stack(
            (-0.04 * a + 1e4 * b * c, 0.04 * a - 3e7 * b**2 - 1e4 * b * c, 3e7 * b**2), 1
        )

    start = 0.5 * torch.ones(4, n, dtype=F64)
    return {
        "0.1 softplus MLP": (lambda z: 0.1 * (F.softplus(z @ W1.T + b1) @ W2.T + b2), start),
        "Robertson midpoint": (lambda y: r0 + 1e-4 * robertson(0.5 * (r0 + y)), r0.clone()),
        "tanh 0.05": (lambda z: torch.tanh(0.05 * z @ A.T + x), torch.zeros(4, 64, dtype=F64)),
        "tanh 0.1": (lambda z: torch.tanh(0.1 * z @ A.T + x), torch.zeros(4, 64, dtype=F64)),
        "tanh 0.2": (lambda z: torch.tanh(0.2 * z @ A.T + x), torch.zeros(4, 64, dtype=F64)),
        "sqrt(10 / (z + 10))": (lambda z: torch.sqrt(10 / (z + 10)), torch.ones(4, 5, dtype=F64)),
        "0.3 sin z + 1": (lambda z: 0.3 * torch.sin(z) + 1, torch.zeros(4, 5, dtype=F64)),
    }


@pytest.mark.parametrize("name", list(_picard_easy_maps()))
def test_anderson_needs_at_most_one_evaluation_more_than_picard_on_picard_easy_maps(name):
    f, z0 = _picard_easy_maps()[name]
    options = {"max_iter": 100, "atol": 0.0, "rtol": 1e-10}
    picard = il.fixed_point(f, z0, solver=il.Picard(**options))
    anderson = il.fixed_point(f, z0, solver=il.Anderson(**options))
    assert picard.converged.all() and anderson.converged.all()
    assert picard.n_f_evals <= 12  # the map is Picard-easy
    assert anderson.n_f_evals <= picard.n_f_evals + 1


def test_the_ridge_stays_relative_to_each_residual():
    # Residuals shrink 20x per step: after four steps the newest is 1e-5 of the oldest, where a
    # ridge relative to the largest residual swamps the newest rows and pulls the mix back to
    # old iterates (the former Anderson needed 9 evaluations here, Picard 7).
    f, z0 = _picard_easy_maps()["tanh 0.05"]
    options = {"max_iter": 100, "atol": 0.0, "rtol": 1e-10}
    for regularization in (1e-6, 1e-3):
        result = il.fixed_point(f, z0, solver=il.Anderson(regularization=regularization, **options))
        assert result.converged.all() and result.n_f_evals <= 7


def _history(solver, residual_scale):
    """Two steps on a scalar-like map, then an iterate whose residual is ``residual_scale``
    times the last one: returns the state, that iterate, f of it and the last (z, f(z))."""
    z0 = torch.zeros(3, 4, dtype=F64)
    f0 = torch.ones(3, 4, dtype=F64)
    state = solver.init(z0)
    z1, state, _ = solver.step(state, z0, f0, 0)  # plain: z1 = f0
    f1 = z1 + 0.5 * (f0 - z0)
    z2, state, _ = solver.step(state, z1, f1, 1)  # extrapolated
    f2 = z2 + residual_scale * (f1 - z1)
    return state, z2, f2, z1, f1


@pytest.mark.parametrize("mixing", [1.0, 0.5])
def test_safeguard_rejects_an_extrapolation_that_raises_the_residual(mixing):
    solver = il.Anderson(history_size=3, mixing=mixing)
    state, z2, f2, z1, f1 = _history(solver, residual_scale=3.0)
    z3, state, breakdown = solver.step(state, z2, f2, 2)
    # Back to the plain step from the base z1, which Picard would have taken; not a breakdown.
    torch.testing.assert_close(z3, torch.lerp(z1, f1, mixing), atol=1e-15, rtol=0)
    assert not breakdown.any()
    # The plain step is not tested again: the next step mixes as usual.
    assert torch.isinf(state["bar"]).all()


def test_safeguard_keeps_an_extrapolation_that_lowers_the_residual_and_can_be_turned_off():
    guarded, plain = il.Anderson(history_size=3), il.Anderson(history_size=3, safeguard=False)
    state, z2, f2, _, _ = _history(guarded, residual_scale=0.5)
    kept, _, _ = guarded.step(state, z2, f2, 2)
    state, z2, f2, _, _ = _history(plain, residual_scale=0.5)
    unguarded, _, _ = plain.step(state, z2, f2, 2)
    torch.testing.assert_close(kept, unguarded, atol=0, rtol=0)
    state, z2, f2, _, f1 = _history(plain, residual_scale=3.0)
    raised, _, _ = plain.step(state, z2, f2, 2)
    assert not torch.allclose(raised, f1)  # without the safeguard, the mix goes on


@pytest.mark.parametrize("shift", [1, 2])
def test_anderson_iterates_do_not_depend_on_which_slot_holds_which_pair(shift):
    # Every pair goes to slot iteration % m: a run whose slots are shifted (as if the loop had
    # counted from `shift`) mixes the same pairs, so it takes the same steps.
    solver = il.Anderson(history_size=3)
    gen = torch.Generator().manual_seed(0)
    W = 0.3 * torch.randn(6, 6, generator=gen, dtype=F64)
    f = lambda z: torch.tanh(z @ W.T + 1)  # noqa: E731
    z = torch.zeros(2, 6, dtype=F64)
    a, b = solver.init(z), solver.init(z)
    za = zb = z
    for k in range(7):
        za, a, _ = solver.step(a, za, f(za), k)
        zb, b, _ = solver.step(b, zb, f(zb), k + shift)
        torch.testing.assert_close(za, zb, atol=1e-13, rtol=0)
    assert not torch.equal(a["X"], b["X"])  # the slots did differ


def test_safeguard_is_validated_by_name():
    with pytest.raises(TypeError, match="safeguard"):
        il.Anderson(safeguard="yes")


# --- The two loop paths agree to the last bit ----------------------------------------------


def _coupled(z, x):
    # Samples couple through the batch mean, so a sample that converged early can leave the
    # tolerance again while the others move (and is revived).
    return 0.5 * z + x + 0.4 * z.mean(0, keepdim=True)


def _non_monotone(z, x):
    # Contracts (spectral radius 0.6) but its norm is above 1: residuals rise before they fall.
    A = torch.tensor([[0.6, 1.5], [0.0, 0.6]], dtype=z.dtype)
    return z @ A.T + x


def _assert_same(a, b):
    assert torch.equal(a.status, b.status)
    assert torch.equal(a.n_steps, b.n_steps)
    assert a.n_f_evals == b.n_f_evals
    assert torch.equal(a.z, b.z)
    assert torch.equal(a.residual, b.residual)
    torch.testing.assert_close(a.rate, b.rate, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(a.trace, b.trace, atol=0, rtol=0, equal_nan=True)
    for sa, sb in zip(a.states, b.states, strict=True):
        assert torch.equal(sa, sb)


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize(
    ("f", "x"),
    [
        (_coupled, torch.tensor([[1.0], [2.0], [3.0], [40.0]], dtype=F64)),
        (_non_monotone, torch.tensor([[1.0, -2.0], [0.5, 3.0], [-4.0, 1.0]], dtype=F64)),
    ],
    ids=["coupled", "non-monotone"],
)
def test_host_reads_do_not_change_any_output(cls, check_every, f, x):
    solver = cls(max_iter=40, atol=0.0, rtol=1e-9, check_every=check_every, trace=True)

    def solve(host_reads):
        z0 = torch.zeros_like(x)
        return il.fixed_point(f, z0, x, solver=solver, host_reads=host_reads, states=(0, 3, 17))

    _assert_same(solve(None), solve(False))
    _assert_same(solve(None), solve(True))


def test_a_solve_that_ends_on_a_worse_iterate_returns_the_best_and_measures_it():
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64)
    z0 = torch.zeros_like(x)
    result = il.fixed_point(_non_monotone, z0, x, solver=il.Picard(max_iter=3, trace=True))
    # Residuals rise from the first iterate on, so z_0 is returned, and measured once more.
    assert torch.equal(result.z, z0)
    assert result.n_f_evals == 4
    fz = _non_monotone(z0, x)
    torch.testing.assert_close(result.residual, torch.linalg.vector_norm(fz - z0, dim=1))


def test_picard_reports_no_breakdown_and_custom_solvers_may_return_none():
    class Halve(il.AbstractSolver):
        def init(self, z):
            return {}

        def step(self, state, z, fz, iteration):
            return 0.5 * (z + fz), state, None

    result = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 1), solver=Halve(max_iter=5))
    assert (result.status == int(il.Status.MAX_ITER)).all()
    result = il.fixed_point(lambda z: 2 * z + 1, torch.zeros(2, 1), solver=il.Picard(max_iter=5))
    assert not (result.status == int(il.Status.BREAKDOWN)).any()


def test_host_reads_is_validated():
    with pytest.raises(TypeError, match="host_reads"):
        il.fixed_point(lambda z: z, torch.zeros(1, 1), host_reads="sometimes")


@pytest.mark.parametrize(
    ("device", "check_every", "reads"),
    [("cpu", 1, True), ("cpu", 8, True), ("cuda", 1, True), ("cuda", 8, False), ("mps", 2, False)],
)
def test_the_default_path_reads_the_host_where_free_or_every_iteration_anyway(
    device, check_every, reads
):
    # With check_every=1 the chunked path would read the host every iteration as well, so the
    # default takes the path with reads (fewer operations) on every device.
    from implicitlayers.solvers._loop import default_host_reads

    assert default_host_reads(torch.device(device), check_every) is reads


def test_a_state_of_images_and_a_non_contiguous_f_output_are_handled():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.mul_(0.1)
    x = torch.randn(3, 2, 5, 5, dtype=F64)
    f = lambda z: torch.tanh(conv(z) + x).transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731
    result = il.fixed_point(f, torch.zeros_like(x), solver=il.Anderson(rtol=1e-10, atol=0.0))
    assert result.converged.all() and result.z.shape == x.shape
    torch.testing.assert_close(f(result.z), result.z, atol=1e-8, rtol=0)


# --- No host read inside a chunk ----------------------------------------------------------

HOST_READS = frozenset({"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu"})


class _HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
def test_without_host_reads_the_loop_reads_once_per_chunk(cls):
    gen = torch.Generator().manual_seed(0)
    W = 0.95 * torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=F64))[0]
    x = 0.1 * torch.randn(3, 8, generator=gen, dtype=F64)
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731

    def reads(check_every):
        solver = cls(max_iter=24, atol=0.0, rtol=1e-30, check_every=check_every)
        with _HostReads() as counter:
            result = il.fixed_point(
                f, torch.zeros(3, 8, dtype=F64), solver=solver, host_reads=False
            )
        assert result.n_f_evals >= 24  # the tolerance is never met
        return counter.count

    # One read between two chunks; a fixed number for the whole solve (the returned batch
    # and the non-finite policy).
    fixed = reads(24)
    assert fixed <= 2
    for k in (1, 4, 8):
        assert reads(k) - fixed == 24 // k - 1


class _Operations(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", SOLVERS, ids=IDS)
@pytest.mark.parametrize("host_reads", [None, False], ids=["host", "sync-free"])
@pytest.mark.parametrize("trace", [False, True])
def test_the_rms_norm_costs_one_operation_per_solve_not_per_iteration(cls, host_reads, trace):
    # The rms test runs in l2 units with atol scaled once (a float); only the reported
    # residual (and the trace) are divided by sqrt(n), once at the end.
    gen = torch.Generator().manual_seed(0)
    W = 0.95 * torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=F64))[0]
    f = lambda z: torch.tanh(z @ W.T + 0.1)  # noqa: E731

    def operations(norm):
        solver = cls(max_iter=24, atol=1e-30, rtol=1e-30, norm=norm, trace=trace)
        with _Operations() as counter, _HostReads() as reads:
            result = il.fixed_point(
                f, torch.zeros(3, 8, dtype=F64), solver=solver, host_reads=host_reads
            )
        assert result.n_f_evals == 24  # the tolerance is never met
        return counter.count, reads.count, result

    (l2_ops, l2_reads, l2), (rms_ops, rms_reads, rms) = operations("l2"), operations("rms")
    assert rms_ops - l2_ops == (2 if trace else 1) and rms_reads == l2_reads
    assert torch.equal(rms.residual, l2.residual / math.sqrt(8))


# --- The chunk compiles as one graph ------------------------------------------------------


@pytest.mark.slow
# torch's own import chain for inductor warns about its TorchScript internals.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_solve_gives_the_eager_results_sample_by_sample():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 32, generator=gen, dtype=F64)
    W = W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(3, 32, generator=gen, dtype=F64)
    rates = torch.tensor([0.01, 0.6, 0.95], dtype=F64)  # stops in the second chunk; runs on
    solver = il.Anderson(max_iter=8, check_every=4, atol=0.0, rtol=1e-10)

    def f(z, x, rates):
        return torch.tanh(rates[:, None] * (z @ W.T) + x)

    def solve(x, rates):
        result = il.fixed_point(
            f, torch.zeros(3, 32, dtype=F64), x, rates, solver=solver, host_reads=False
        )
        return result.z, result.status, result.n_steps, result.residual

    graphs = []

    def record(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward

    eager = solve(x, rates)
    compiled = torch.compile(solve, backend="inductor")(x, rates)
    assert eager[1].tolist() == [
        int(il.Status.SUCCESS),
        int(il.Status.MAX_ITER),
        int(il.Status.MAX_ITER),
    ]
    assert torch.equal(compiled[1], eager[1]) and torch.equal(compiled[2], eager[2])
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(compiled[3], eager[3], atol=1e-12, rtol=1e-9)
    # One chunk, f and the solver's step included, is one graph (no break inside).
    torch._dynamo.reset()
    torch.compile(solve, backend=record)(x, rates)
    chunks = [g for g in graphs if any("tanh" in t for t in g) and any("solve_ex" in t for t in g)]
    assert chunks, "no graph holds both f and the Anderson step"
    assert max(sum("tanh" in t for t in g) for g in graphs) >= 1
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_compiled_rms_solve_keeps_one_graph_per_chunk_and_the_eager_results():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 32, generator=gen, dtype=F64)
    W = W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(3, 32, generator=gen, dtype=F64)
    rates = torch.tensor([0.01, 0.6, 0.95], dtype=F64)
    solver = il.Anderson(max_iter=8, check_every=4, atol=1e-6, rtol=0.0, norm="rms", trace=True)

    def solve(x, rates):
        result = il.fixed_point(
            lambda z, x, rates: torch.tanh(rates[:, None] * (z @ W.T) + x),
            torch.zeros(3, 32, dtype=F64),
            x,
            rates,
            solver=solver,
            host_reads=False,
        )
        return result.z, result.status, result.n_steps, result.residual, result.trace

    graphs = []

    def record(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward

    eager = solve(x, rates)
    compiled = torch.compile(solve, backend=record)(x, rates)
    assert eager[1].tolist()[0] == int(il.Status.SUCCESS)
    for got, want in zip(compiled, eager, strict=True):
        assert torch.equal(got, want)
    chunks = [g for g in graphs if any("tanh" in t for t in g) and any("solve_ex" in t for t in g)]
    assert chunks, "no graph holds both f and the Anderson step"
    torch._dynamo.reset()


def test_the_final_evaluation_runs_after_the_solver_memory_is_released():
    # Residuals stall at round-off, so the best iterate is an earlier one and f is evaluated
    # once more at the returned batch: by then the loop has released the solver's history
    # (which would otherwise add to the solve's peak memory).
    history = []

    class Watched(il.Anderson):
        def init(self, z):
            state = super().init(z)
            history.append(weakref.ref(state["G"]))
            return state

    alive = []
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(16, 16, generator=gen)
    W *= 0.9 / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(8, 16, generator=gen)

    def f(z):  # float32: the residual reaches round-off within 40 iterations
        alive.append(history[0]() is not None)
        return torch.tanh(z @ W.T + x)

    solver = Watched(max_iter=40, atol=0.0, rtol=1e-30)
    result = il.fixed_point(f, torch.zeros(8, 16), solver=solver)
    assert result.n_f_evals == 41 and len(alive) == 41
    assert all(alive[:40]) and not alive[40]
    assert (result.residual < 1e-5).all()
