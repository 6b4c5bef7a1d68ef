"""Interrupting a run (SIGTERM, ``--max-steps``) and resuming it equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import deblur_celeba as flagship
import pytest
import torch
from deblur import data
from deblur.state import StopFlag, stop_on_signals
from deblur_tiny import TINY

#: Two epochs of two steps after two pretraining steps, with batch norm and spectral norm.
RUN = [*TINY, "--epochs", "2", "--no-evaluate", "--checkpoint-every", "1"]
RUN += ["--batch-norm", "--spectral-norm"]  # their buffers must resume exactly too


def _final(out: Path) -> tuple[dict, list[dict]]:
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return checkpoint, log


def _assert_same_run(a: Path, b: Path) -> None:
    ckpt_a, log_a = _final(a)
    ckpt_b, log_b = _final(b)
    assert ckpt_a["progress"]["global_step"] == ckpt_b["progress"]["global_step"] == 4
    for key, value in ckpt_a["model"].items():
        assert torch.equal(value, ckpt_b["model"][key]), key
    state_a, state_b = ckpt_a["optimizer"]["state"], ckpt_b["optimizer"]["state"]
    for index, entry in state_a.items():
        assert float(entry["step"]) == float(state_b[index]["step"]) == 4
        assert torch.equal(entry["exp_avg"], state_b[index]["exp_avg"])
    assert ckpt_a["scheduler"] == ckpt_b["scheduler"]
    strip = ("time", "sec_per_step")
    assert [{k: v for k, v in r.items() if k not in strip} for r in log_a] == [
        {k: v for k, v in r.items() if k not in strip} for r in log_b
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert flagship.main(["train", *RUN, "--output-dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("stop_at_call", [1, 4], ids=["during-pretraining", "during-deq"])
def test_sigterm_then_resume_matches_uninterrupted(
    stop_at_call: int, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = data.augment

    def augment_then_signal(x: torch.Tensor, seeds: list[int], crop: int | None) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == stop_at_call:  # as if the user pressed Ctrl-C / the job got SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
        return original(x, seeds, crop)

    monkeypatch.setattr(data, "augment", augment_then_signal)
    argv = ["train", *RUN, "--output-dir", str(tmp_path)]
    assert flagship.main(argv) == 0
    stopped = torch.load(tmp_path / "last.pt", weights_only=True)["progress"]
    if stop_at_call == 1:
        assert (stopped["phase"], stopped["pretrain_step"]) == ("pretrain", 1)
    else:  # calls 1-2 pretrain, 3-4 are DEQ steps 1-2 (epoch 1)
        assert (stopped["phase"], stopped["global_step"], stopped["epoch"]) == ("deq", 2, 0)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(data, "augment", original)
    assert flagship.main([*argv, "--resume"]) == 0
    _assert_same_run(uninterrupted, tmp_path)


def test_max_steps_then_resume_matches_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    argv = ["train", *RUN, "--output-dir", str(tmp_path)]
    assert flagship.main([*argv, "--max-steps", "3"]) == 0
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["progress"]["global_step"] == 3
    assert checkpoint["progress"]["step_in_epoch"] == 1  # mid-epoch 2
    assert all(float(s["step"]) == 3 for s in checkpoint["optimizer"]["state"].values())
    assert checkpoint["scheduler"]["last_epoch"] == 3
    assert flagship.main([*argv, "--resume", "--checkpoint-every", "2"]) == 0  # may change
    _assert_same_run(uninterrupted, tmp_path)


def test_stop_flag_handler_sets_flag_and_restores() -> None:
    before = signal.getsignal(signal.SIGINT)
    flag = StopFlag()
    with stop_on_signals(flag):
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_checkpoints_follow_the_cadence_of_each_phase(tmp_path: Path) -> None:
    """``--checkpoint-every 2`` counts pretraining steps, then DEQ steps: with 2 pretraining
    steps the DEQ phase saves on its even steps only (the pretraining count must not stand in
    for it: 2 % 2 == 0 would save after every DEQ step)."""
    from deblur import state

    saves, save = [], state.save

    def spy(saved: dict, path: Path) -> None:
        saves.append((path.name, saved["progress"]["phase"], saved["progress"]["global_step"]))
        save(saved, path)

    argv = [*TINY, "--epochs", "2", "--no-evaluate", "--checkpoint-every", "2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state, "save", spy)
        assert flagship.main(["train", *argv, "--output-dir", str(tmp_path)]) == 0
    deq = {step for name, phase, step in saves if phase == "deq"}
    assert deq == {0, 2, 4}  # epoch 0's validation, then steps 2 and 4 (and their validations)
