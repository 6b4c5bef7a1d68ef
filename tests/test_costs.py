"""What a solve costs: torch operations, host reads, graphs and memory, counted exactly.

Each path of the registry skips work whose result it knows (a mixing weight of one, every
row still running, the whole batch among the running rows), reads the host only where its
schedule says, and keeps memory flat in the number of iterations. The values are pinned
elsewhere (``test_loop.py``); these tests count that the shortcut is taken. Wall-clock
speed is measured in ``benchmarks/``, never asserted here.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from registry import PATH_PARAMS, SOLVER_PARAMS
from torch.overrides import TorchFunctionMode
from zoo import Affine, AffineModule

import implicitlayers as il

F64 = torch.float64
#: Host-side metadata queries: no kernel, not counted.
METADATA = frozenset({"__len__", "__get__", "size", "dim", "numel"})
#: Reads of tensor values on the host (a synchronisation on CUDA).
HOST_READS = frozenset({"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu"})
#: A tolerance no iterate meets, so every sample runs every iteration, and no divergence.
RUNS_ON = {"atol": 0.0, "rtol": 1e-300, "divergence_ratio": None}


class Operations(TorchFunctionMode):
    """Counts the torch functions and tensor methods called inside it (metadata aside), and
    the reads of tensor values on the host among them."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.count += name not in METADATA
        self.reads += name in HOST_READS
        return func(*args, **(kwargs or {}))


def operations(fn):
    with torch.no_grad(), Operations() as counter:
        fn()
    return counter.count


def host_reads(fn):
    with Operations() as counter:
        fn()
    return counter.reads


X = torch.linspace(0.1, 1.0, 24, dtype=F64).reshape(3, 8)


def cell(z, x=X):
    return torch.tanh(0.5 * z + x)


# --- Operations -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_picard_without_mixing_takes_fz_itself(path):
    # mixing=0.5 costs one lerp per step; mixing=1.0 none (z_next is f(z)).
    def solve(mixing):
        solver = il.Picard(max_iter=10, mixing=mixing, **RUNS_ON)
        return lambda: il.fixed_point(
            cell, torch.zeros(3, 8, dtype=F64), solver=solver, **path.options
        )

    assert operations(solve(0.5)) - operations(solve(1.0)) == 9  # nine steps between ten calls


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_recording_states_of_running_samples_costs_only_their_unflattening(solver, path):
    # While every sample runs, the recorded state is the iterate itself (no merge with the
    # best iterates of stopped samples): a flat state in the working dtype costs nothing, one
    # of images one reshape at the end, the same on every path.
    s = solver.make(max_iter=8, **RUNS_ON)

    def solve(states, shape):
        z0 = torch.zeros(shape, dtype=F64)
        x = X.reshape(shape)
        return lambda: il.fixed_point(cell, z0, x, solver=s, states=states, **path.options)

    for shape, per_state in (((3, 8), 0), ((3, 2, 4), 1)):
        spent = operations(solve((1, 3, 5), shape)) - operations(solve((), shape))
        assert spent == 3 * per_state, shape


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_the_whole_batch_running_is_passed_its_inputs_unselected(solver):
    # With running rows, f is given the running rows of its inputs; while all rows run, the
    # inputs are passed as they are (no index_select), so f taking x as an input costs what
    # f closing over x costs.
    s = solver.make(max_iter=8, **RUNS_ON)
    z0 = torch.zeros(3, 8, dtype=F64)

    def closed():
        il.fixed_point(cell, z0, solver=s, independent_samples=True)

    def given():
        il.fixed_point(cell, z0, X, solver=s, independent_samples=True)

    assert operations(given) == operations(closed)


#: Operations per Picard iteration outside f while every residual improves, by path: the
#: residual and its bound (a difference, two norms, a scaling: 4), the stopping rule (above
#: the bound and at most the divergence limit: >, <=, &), the improvement (<), and the one
#: host read of both flags (stack, all, tolist): 11; nothing is masked or written, and the
#: running rows, all of which run, take the same iteration.
PICARD_ITERATION_OPS = {"host-reads": 11, "running-rows": 11}


@pytest.mark.parametrize("path", [p for p in PATH_PARAMS if p.id in PICARD_ITERATION_OPS])
def test_a_picard_iteration_of_improving_samples_takes_the_fast_path(path):
    z0 = torch.zeros(3, 8, dtype=F64)

    def solve(steps):
        solver = il.Picard(max_iter=steps, **RUNS_ON)
        return lambda: il.fixed_point(cell, z0, solver=solver, **path.options)

    f_ops = operations(lambda: cell(z0))
    expected = PICARD_ITERATION_OPS[path.name]
    assert operations(solve(9)) - operations(solve(8)) - f_ops == expected


@pytest.mark.parametrize("path", [p for p in PATH_PARAMS if p.id in PICARD_ITERATION_OPS])
def test_an_iteration_that_does_not_improve_costs_three_operations_more(path):
    # f(z) = X - z from 0 alternates between 0 and X: every residual equals ||X||, so no
    # sample improves on its best and none stops. The one stopping rule then merges the best
    # residuals and iterates (two where and a view): 11 + 3 operations, on both row
    # selections.
    z0 = torch.zeros(3, 8, dtype=F64)

    def stagnant(z):
        return X - z

    def solve(steps):
        solver = il.Picard(max_iter=steps, **RUNS_ON)
        return lambda: il.fixed_point(stagnant, z0, solver=solver, **path.options)

    f_ops = operations(lambda: stagnant(z0))
    assert operations(solve(9)) - operations(solve(8)) - f_ops == 14


def test_on_the_cpu_the_default_path_is_the_host_read_path():
    # Host reads are free on the CPU, so the default takes the path with reads (its fast
    # iteration costs fewer operations than the sync-free path's masked one).
    def solve(**path):
        solver = il.Picard(max_iter=8, **RUNS_ON)
        return lambda: il.fixed_point(cell, torch.zeros(3, 8, dtype=F64), solver=solver, **path)

    default, reads, sync_free = (
        operations(solve()),
        operations(solve(host_reads=True)),
        operations(solve(host_reads=False)),
    )
    assert default == reads < sync_free


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


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
@pytest.mark.parametrize("path", [p for p in PATH_PARAMS if not p.values[0].running_rows])
@pytest.mark.parametrize("trace", [False, True])
def test_the_rms_norm_costs_one_operation_per_solve_not_per_iteration(solver, path, trace):
    # The rms test runs in l2 units with atol scaled once (a float); only the reported
    # residual (and the trace) are divided by sqrt(n), once at the end.
    gen = torch.Generator().manual_seed(0)
    W = 0.95 * torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=F64))[0]
    f = lambda z: torch.tanh(z @ W.T + 0.1)  # noqa: E731

    def count(norm):
        s = solver.make(max_iter=24, atol=1e-30, rtol=1e-30, norm=norm, trace=trace)
        with Operations() as counter:
            result = il.fixed_point(f, torch.zeros(3, 8, dtype=F64), solver=s, **path.options)
        assert result.n_f_evals == 24  # the tolerance is never met
        return counter.count, counter.reads, result

    (l2_ops, l2_reads, l2), (rms_ops, rms_reads, rms) = count("l2"), count("rms")
    assert rms_ops - l2_ops == (2 if trace else 1) and rms_reads == l2_reads
    assert torch.equal(rms.residual, l2.residual / math.sqrt(8))


def test_the_phantom_steps_without_mixing_cost_no_blend():
    # PhantomGradient(mixing=m) takes z <- (1 - m) z + m f(z): three operations per step more
    # than z <- f(z) (a product, a product and a sum), none when m = 1.
    x = torch.ones(2, 3, dtype=F64, requires_grad=True)

    def forward(mixing):
        rule = il.PhantomGradient(steps=4, mixing=mixing)
        deq = il.DEQ(cell, solver=il.Picard(max_iter=5), backward=rule)
        return lambda: deq(x, z0=torch.zeros(2, 3, dtype=F64))

    def counted(fn):
        with Operations() as counter:
            fn()
        return counter.count

    assert counted(forward(0.5)) - counted(forward(1.0)) == 3 * 4


def test_the_neumann_phantom_without_mixing_sums_the_plain_series():
    # NeumannPhantom(mixing=m): v <- (1 - m) v + m J^T v (three more operations a term) and
    # a final scale by m; with m = 1 neither.
    W = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=F64)
    g = torch.tensor([[1.0, 2.0]], dtype=F64)

    def adjoint(mixing):
        rule = il.NeumannPhantom(terms=3, mixing=mixing)
        return lambda: rule.adjoint(lambda v: v @ W, g)

    assert operations(adjoint(0.5)) - operations(adjoint(1.0)) == 3 * 3 + 1


# --- Host reads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_without_host_reads_the_loop_reads_once_per_chunk(solver):
    gen = torch.Generator().manual_seed(0)
    W = 0.95 * torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=F64))[0]
    x = 0.1 * torch.randn(3, 8, generator=gen, dtype=F64)
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731

    def reads(check_every):
        s = solver.make(max_iter=24, atol=0.0, rtol=1e-30, check_every=check_every)
        with Operations() as counter:
            result = il.fixed_point(f, torch.zeros(3, 8, dtype=F64), solver=s, host_reads=False)
        assert result.n_f_evals >= 24  # the tolerance is never met
        return counter.reads

    # One read between two chunks, and two for the whole solve (whether the returned batch
    # was evaluated; the non-finite policy). One chunk of the whole budget reads only the
    # policy's flag: it evaluates the returned batch without asking.
    assert reads(24) == 1
    for k in (1, 4, 8):
        assert reads(k) == 24 // k - 1 + 2


def test_the_deq_passes_host_reads_to_the_solve():
    def reads(host_reads_option):
        solver = il.Picard(max_iter=24, atol=0.0, rtol=1e-30, check_every=24)
        deq = il.DEQ(lambda z, x: 0.5 * z + x, solver=solver, host_reads=host_reads_option)
        with torch.no_grad():
            return host_reads(lambda: deq(torch.ones(2, 3, dtype=F64)))

    assert reads(False) <= 2 < 24 <= reads(True)


# --- Memory -------------------------------------------------------------------------------------


def test_a_deq_s_saved_memory_does_not_grow_with_iterations():
    cell = AffineModule(Affine.make(n=16, d=3, contraction=0.99, symmetric=True))
    x = torch.randn(4, 3, dtype=F64)

    def saved_bytes(max_iter):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        solver = il.Picard(max_iter=max_iter, atol=0.0, rtol=1e-12)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _z, result = il.DEQ(cell, solver=solver)(x, z0=torch.zeros(4, 16).double())
        assert result.n_f_evals == max_iter
        return total

    assert saved_bytes(5) == saved_bytes(100) > 0


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


# --- The sync-free chunk compiles as one graph ----------------------------------------------


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
