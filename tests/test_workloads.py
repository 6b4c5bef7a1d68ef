"""Real workloads: DistributedDataParallel, torch.compile, autograd transforms, saving."""

from __future__ import annotations

import io
import pickle
import socket

import pytest
import torch
import torch.multiprocessing as mp
from ddp_worker import make_data, make_deq, run
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
