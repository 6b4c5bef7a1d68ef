"""Smoke tests of ``examples/deblur_celeba.py train`` and its command-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import deblur_celeba
import pytest
import torch
from deblur.checkpoint import FORMAT
from deblur_tiny import TINY


def test_train_writes_checkpoints_log_results_and_figures(trained_run: Path) -> None:
    for name in (
        "best.pt",
        "last.pt",
        "log.jsonl",
        "config.json",
        "results.json",
        "results.md",
        "reconstructions.png",
        "loss_curves.png",
        "psnr_vs_iterations.png",
    ):
        assert (trained_run / name).is_file(), name
    assert not list(trained_run.glob(".*.tmp")), "a temporary checkpoint file was left behind"
    checkpoint = torch.load(trained_run / "last.pt", weights_only=True)
    assert checkpoint["format"] == FORMAT
    assert checkpoint["progress"]["phase"] == "done"
    assert checkpoint["progress"]["pretrain_step"] == 2
    assert checkpoint["progress"]["global_step"] == 2  # 8 crops, batch 4, 1 epoch
    assert checkpoint["config"]["depth"] == 3
    records = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    val = [r for r in records if r["event"] == "val"]
    assert [r["step"] for r in train] == [1, 2]
    assert {"loss", "psnr_standard", "fwd_iters_mean", "sec_per_step"} <= set(train[0])
    assert [r["epoch"] for r in val] == [0, 1]  # after pretraining, and after epoch 1
    assert any(r["event"] == "pretrain" for r in records)


def test_results_report_both_psnr_conventions(trained_run: Path) -> None:
    report = json.loads((trained_run / "results.json").read_text())
    assert report["images"] == 4
    for method in ("measurement", "tikhonov_cg", "degrad"):
        row = report["table"][method]
        # [-1, 1] with peak 1 is exactly 20 log10(2) = 6.02 dB below [0, 1] with peak 1.
        assert row["psnr_standard"] - row["psnr_paper"] == pytest.approx(6.0206, abs=1e-3)
        assert 0 < row["ssim"] <= 1
    assert set(report["budget_psnr_standard"]) == {"0", "1", "2"}
    iterations = report["forward_iterations"]
    assert 1 <= iterations["mean"] <= 8 and iterations["max"] <= 8
    assert report["images_per_second"] > 0


def test_no_argument_parse_selects_the_demo() -> None:
    from deblur.cli import config_overrides, parse_args
    from deblur.config import resolve_config

    args = parse_args([])
    assert args.command == "train" and args.output_dir == "runs/deblur-demo"
    config = resolve_config(args.preset, config_overrides(args))
    assert config.preset == "demo" and config.uses_builtin_data
    assert (config.kernel_size, config.blur_std, config.noise_std) == (5, 5.0, 0.01)
    paper = resolve_config("paper", {"data_dir": "x"})
    assert (paper.image_size, paper.depth, paper.width, paper.solver) == (128, 17, 64, "anderson")
    assert paper.batch_norm and paper.spectral_norm
    literal = parse_args(["--blur-variance-literal"])
    assert literal.blur_std == pytest.approx(5**0.5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kernel-size", "4"], "--kernel-size must be odd"),
        (["--rtol", "0", "--atol", "0"], "--rtol and --atol are both 0"),
        (["--step-size", "-1"], "--step-size must be a finite number > 0"),
        (["--data-dir", "/nonexistent/celeba"], "--data-dir '/nonexistent/celeba' is not a folder"),
        (
            ["evaluate", "--checkpoint", "/nonexistent/best.pt"],
            "--checkpoint '/nonexistent/best.pt'",
        ),
    ],
)
def test_bad_values_name_the_flag_and_the_fix(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if argv[0] != "evaluate":
        argv = [*argv, "--output-dir", str(tmp_path)]
    assert deblur_celeba.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--solver", "newton"], "--solver: invalid choice: 'newton'"),
        (["--blur-variance-literal", "--blur-std", "2"], "drop --blur-std"),
        (["--depht", "3"], "unrecognized arguments: --depht"),
    ],
)
def test_argparse_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        deblur_celeba.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unfinished_run_needs_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", *TINY, "--no-evaluate", "--output-dir", str(tmp_path)]
    assert deblur_celeba.main([*argv, "--max-steps", "1"]) == 0
    assert deblur_celeba.main(argv) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert deblur_celeba.main([*argv, "--resume", "--depth", "4"]) == 2
    assert "--depth 4 differs from the checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(("backward", "solver"), [("neumann", "picard"), ("implicit", "broyden")])
def test_other_backward_rules_and_solvers(backward: str, solver: str, tmp_path: Path) -> None:
    argv = ["train", *TINY, "--backward", backward, "--solver", solver, "--no-evaluate"]
    assert deblur_celeba.main([*argv, "--max-steps", "1", "--output-dir", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    (step,) = [r for r in records if r["event"] == "train"]
    assert step["grad_norm"] > 0
    # Only the implicit rule solves an adjoint equation, and reports its iterations.
    assert (step["backward_iters"] is not None) == (backward == "implicit")
