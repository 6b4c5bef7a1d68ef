"""The training script under DistributedDataParallel: two CPU processes, gloo backend."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from deblur_tiny import TINY

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, port: int, out: str, argv: list[str]) -> None:
    """One process, as ``torchrun --nproc_per_node=2`` would start it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deblur_celeba as flagship

    train = flagship.train

    def train_and_dump(*args, **kwargs):  # type: ignore[no-untyped-def]
        model, progress = train(*args, **kwargs)
        torch.save(model.state_dict(), Path(out) / f"rank{rank}.state")
        return model, progress

    flagship.train = train_and_dump  # type: ignore[assignment]
    if flagship.main(argv) != 0:
        raise SystemExit(1)


def test_two_process_gloo_run(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    argv = ["train", *TINY, "--builtin-crops", "16", "4", "4", "--output-dir", str(out)]
    argv += ["--no-evaluate", "--batch-norm", "--spectral-norm"]
    context = mp.spawn(_worker, args=(_free_port(), str(out), argv), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two-process run did not finish in 240 s")
    # Rank 0 alone writes checkpoints and the log.
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    # 16 crops over 2 processes = 8 each = 2 steps of 4 per epoch.
    assert checkpoint["progress"]["global_step"] == 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]
    (val,) = [r for r in records if r["event"] == "val" and r["epoch"] == 1]
    assert val["loss"] > 0  # averaged over both processes' validation images
    # Gradients were averaged: both processes end with identical weights and buffers,
    # although each trained on a different half of the data.
    state0 = torch.load(out / "rank0.state", weights_only=True)
    state1 = torch.load(out / "rank1.state", weights_only=True)
    for key, value in state0.items():
        assert torch.equal(value, state1[key]), key
    for key, value in checkpoint["model"].items():
        assert torch.equal(value, state0[key]), key
