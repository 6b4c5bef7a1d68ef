"""Real workloads: DistributedDataParallel, torch.compile, autograd transforms, saving."""

from __future__ import annotations

import io
import logging
import pickle
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from ddp_worker import make_data, make_deq, run, run_fsdp, train_unsharded
from zoo import Affine, AffineModule, TanhCell

import implicitlayers as il


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_two_processes_match_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(run, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp_grads = torch.load(out, weights_only=True)
    deq = make_deq()
    x, target = make_data()
    z, _ = deq(x, z0=torch.zeros(8, 5, dtype=torch.float64))
    ((z - target) ** 2).mean().backward()
    for name, p in deq.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, atol=1e-10, rtol=1e-8)


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_fsdp2(), reason="fully_shard (FSDP2) needs torch >= 2.6")
def test_fsdp2_two_processes_train_like_the_unsharded_model(tmp_path):
    # A DEQ inside a model sharded with fully_shard (gloo, CPU): two SGD steps on two ranks
    # with half the batch each end where the unsharded model ends on the whole batch.
    out = tmp_path / "params.pt"
    mp.spawn(run_fsdp, args=(2, free_port(), str(out)), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)
    for name, p in train_unsharded().items():
        torch.testing.assert_close(sharded[name], p, atol=1e-10, rtol=1e-8)


# Dynamo itself touches .grad of non-leaf tensors while tracing; not our code's warning.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_f_solves_and_trains():
    cell = TanhCell()
    compiled = torch.compile(cell, backend="aot_eager")  # inductor works too; slower to build
    x = torch.randn(4, 3, dtype=torch.float64)
    z0 = torch.zeros(4, 5, dtype=torch.float64)
    deq = il.DEQ(compiled, solver=il.Anderson(max_iter=50, atol=1e-12, rtol=1e-10, check_every=5))
    z, result = deq(x, z0=z0)
    reference, _ = il.DEQ(cell, solver=deq.solver)(x, z0=z0)
    assert result.converged.all()
    torch.testing.assert_close(z, reference)
    z.sum().backward()
    assert cell.W.grad is not None


# Dynamo itself touches .grad of non-leaf tensors while tracing; not our code's warning.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_a_compiled_training_step_on_the_default_path_logs_no_graph_break_warning(caplog):
    # The default path reads the host (statuses, the determinism check at the attach): each
    # read goes through a dynamo-disabled reader, so dynamo logs no "Graph break" warning.
    # (Found by a classifier trained under torch.compile: the determinism check's read did.)
    torch._dynamo.reset()
    cell = TanhCell()
    deq = il.DEQ(cell, solver=il.Picard(max_iter=40, rtol=1e-8))
    x = torch.randn(4, 3, dtype=torch.float64)
    z0 = torch.zeros(4, 5, dtype=torch.float64)
    want = deq(x, z0=z0).z
    want.sum().backward()
    want_grad = cell.W.grad.clone()
    cell.W.grad = None
    dynamo_logger = logging.getLogger("torch._dynamo")
    dynamo_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
            z = torch.compile(lambda x: deq(x, z0=z0).z, backend="aot_eager")(x)
            z.sum().backward()
    finally:
        dynamo_logger.removeHandler(caplog.handler)
        torch._dynamo.reset()
    assert not [r.getMessage() for r in caplog.records if "Graph break" in r.getMessage()]
    torch.testing.assert_close(z, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(cell.W.grad, want_grad, rtol=0, atol=1e-12)


def test_autograd_jacobian_of_a_deq_is_the_implicit_jacobian():
    problem = Affine.make(n=4, d=3, contraction=0.7)
    solver = il.Anderson(max_iter=100, atol=1e-14, rtol=1e-13)
    deq = il.DEQ(
        AffineModule(problem), solver=solver, backward=il.ImplicitDifferentiation(solver=solver)
    )
    x = torch.randn(2, 3, dtype=torch.float64)
    z0 = torch.zeros(2, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: deq(x, z0=z0).z, x)
    expected = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - problem.W, problem.U)
    torch.testing.assert_close(jac[0, :, 0], expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(jac[0, :, 1], torch.zeros(4, 3, dtype=torch.float64))


def test_state_dict_round_trip_and_weights_only_load():
    deq = il.DEQ(TanhCell(), solver=il.Broyden(history_size=4), backward=il.Neumann(terms=3))
    buffer = io.BytesIO()
    torch.save(deq.state_dict(), buffer)
    buffer.seek(0)
    restored = il.DEQ(
        TanhCell(seed=5), solver=il.Broyden(history_size=4), backward=il.Neumann(terms=3)
    )
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(3, 3, dtype=torch.float64)
    z0 = torch.zeros(3, 5, dtype=torch.float64)
    torch.testing.assert_close(restored(x, z0=z0).z, deq(x, z0=z0).z)
    # The whole module pickles too (solvers and rules are plain frozen dataclasses).
    clone = pickle.loads(pickle.dumps(deq))
    assert clone.solver == deq.solver and clone.backward == deq.backward


class _Exported(torch.nn.Module):
    """A trained DEQ for inference, as a user exports it: the solution and the statuses."""

    def __init__(self, deq: il.DEQ) -> None:
        super().__init__()
        self.deq = deq

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.deq(x, z0=torch.zeros(x.shape[0], 5, dtype=x.dtype))
        return out.z, out.result.status


LOAD_AND_RUN = """
import sys, torch
program = torch.export.load(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
z, status = program.module()(x)
torch.save({"z": z, "status": status}, sys.argv[3])
"""


def test_a_fixed_budget_deq_exports_and_runs_in_a_fresh_process(tmp_path):
    # The sync-free path in one chunk of the whole budget reads nothing on the host: it
    # exports as one graph (statuses computed by masks), and the saved program, loaded in a
    # new process that never imports this library, gives the eager answer.
    solver = il.Anderson(max_iter=12, check_every=12, rtol=1e-10, atol=0.0)
    deq = il.DEQ(TanhCell(), solver=solver, host_reads=False).eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        want_z, want_status = _Exported(deq)(x)
        program = torch.export.export(_Exported(deq), (x,))
    torch.export.save(program, tmp_path / "deq.pt2")
    torch.save(x, tmp_path / "x.pt")
    subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(tmp_path / "deq.pt2"), str(tmp_path / "x.pt"),
         str(tmp_path / "out.pt")],
        check=True,
        timeout=300,
    )  # fmt: skip
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(got["z"], want_z, rtol=0, atol=1e-12)
    assert torch.equal(got["status"], want_status)
    assert (want_status == il.Status.SUCCESS).all()


def test_the_whole_deq_compiles_as_one_graph_on_the_sync_free_path():
    # host_reads=False and one chunk of the whole budget: no host read anywhere in the
    # forward, so torch.compile captures solve, statuses and output as one graph.
    torch._dynamo.reset()
    solver = il.Anderson(max_iter=10, check_every=10, rtol=1e-10, atol=0.0)
    deq = il.DEQ(TanhCell(), solver=solver, host_reads=False).eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    z0 = torch.zeros(4, 5, dtype=torch.float64)

    def forward(x):
        out = deq(x, z0=z0)
        return out.z, out.result.status

    with torch.no_grad():
        explained = torch._dynamo.explain(forward)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        want = forward(x)
        got = torch.compile(forward, backend="aot_eager")(x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    assert torch.equal(got[1], want[1])
    torch._dynamo.reset()
