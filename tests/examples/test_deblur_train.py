"""``examples/deblur_celeba.py train``: what a run writes, its settings and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import deblur_celeba as flagship
import pytest
import torch
from deblur import cli
from deblur.state import FORMAT
from deblur_tiny import TINY

from implicitlayers.backward import BACKWARDS
from implicitlayers.solvers import SOLVERS


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_writes_checkpoints_log_results_and_figures(trained_run: Path) -> None:
    names = ("best.pt", "last.pt", "log.jsonl", "settings.json", "results.json", "results.md")
    for name in (*names, "reconstructions.png", "loss_curves.png", "psnr_vs_iterations.png"):
        assert (trained_run / name).is_file(), name
    assert not list(trained_run.glob(".*.tmp")), "a temporary checkpoint file was left behind"
    checkpoint = torch.load(trained_run / "last.pt", weights_only=True)
    assert checkpoint["format"] == FORMAT
    progress = checkpoint["progress"]
    assert (progress["phase"], progress["pretrain_step"], progress["global_step"]) == ("done", 2, 2)
    assert checkpoint["settings"]["depth"] == 3 and checkpoint["settings"]["budgets"] == (1, 2)
    # The cosine schedule is torch's, and its state travels in the checkpoint.
    assert checkpoint["scheduler"]["last_epoch"] == 2 and checkpoint["scheduler"]["T_max"] == 2
    records = _log(trained_run)
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["lr"] == pytest.approx(1e-3) and train[1]["lr"] == pytest.approx(5.5e-4)
    assert all(1 <= r["fwd_iters_mean"] <= r["fwd_iters_max"] <= 8 for r in train)
    assert train[0]["backward_iters"] is None  # JFB solves no adjoint equation
    assert [r["epoch"] for r in records if r["event"] == "val"] == [0, 1]


def test_results_report_both_psnr_conventions(trained_run: Path) -> None:
    report = json.loads((trained_run / "results.json").read_text())
    assert report["images"] == 4 and report["image_shape"] == [3, 16, 16]
    for method in ("measurement", "tikhonov_cg", "degrad"):
        row = report["table"][method]
        # [-1, 1] with peak 1 is exactly 20 log10(2) = 6.02 dB below [0, 1] with peak 1.
        assert row["psnr_standard"] - row["psnr_paper"] == pytest.approx(6.0206, abs=1e-3)
        assert 0 < row["ssim"] <= 1
    cg, degrad = report["table"]["tikhonov_cg"], report["table"]["degrad"]
    assert report["gain_over_cg_db"] == pytest.approx(degrad["psnr_standard"] - cg["psnr_standard"])
    assert list(report["budget_psnr_standard"]) == ["0", "1", "2"]
    iterations = report["forward_iterations"]
    assert 1 <= iterations["mean"] <= iterations["max"] <= 8
    assert 0 <= iterations["converged_fraction"] <= 1 and report["images_per_second"] > 0
    markdown = (trained_run / "results.md").read_text()
    assert f"| {cg['psnr_standard']:.2f} | {cg['psnr_paper']:.2f} | {cg['ssim']:.3f} |" in markdown
    assert "benchmarks/deblur_table.py" in markdown  # where the paper's table is reproduced


def test_no_argument_is_the_demo_and_presets_are_override_dicts() -> None:
    args = (flagship.COMMANDS, flagship.Options, flagship.Settings, flagship.PRESETS, None)
    command, given, overrides = cli.parse([], *args)
    assert (command, given, overrides) == ("train", {}, {})
    demo = flagship.resolve(None, {})
    assert demo == flagship.Settings() and demo.data_dir is None
    assert (demo.kernel_size, demo.blur_std, demo.noise_std) == (5, 5.0, 0.01)
    paper = flagship.resolve("paper", {"data_dir": "x", "depth": 9})
    assert (paper.image_size, paper.width, paper.depth, paper.batch_norm) == (128, 64, 9, True)
    assert flagship.resolve(None, {"data_dir": "x"}).image_size == 64  # small with a folder
    contractive = flagship.resolve("paper", {"cell": "contractive"})
    assert (contractive.step_size, contractive.batch_norm, contractive.spectral_norm) == (
        0.5,
        False,
        False,
    )


def test_solver_and_rule_names_come_from_the_library() -> None:
    fields = {f.name: f for f in flagship.Settings.__dataclass_fields__.values()}
    assert fields["solver"].metadata["choices"] == tuple(SOLVERS)
    assert fields["backward"].metadata["choices"] == tuple(BACKWARDS)
    done = subprocess.run([sys.executable, flagship.__file__, "train", "--help"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert (
        "{" + ",".join(SOLVERS) + "}" in done.stdout
        and "{" + ",".join(BACKWARDS) + "}" in done.stdout
    )
    assert "--image-size IMAGE_SIZE" in done.stdout and "paper: 128" in done.stdout
    solver = flagship.make_solver(flagship.Settings(atol=1e-3, rtol=1e-4, max_iter=7))
    assert (solver.max_iter, solver.rtol, solver.atol, solver.norm) == (7, 1e-4, 1e-3, "rms")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kernel-size", "4"], "kernel_size must be odd"),  # the library's own check
        (["--rtol", "0", "--atol", "0"], "atol and rtol are both 0"),
        (["--max-iter", "0"], "max_iter must be >= 1"),
        (["--step-size", "-1"], "--step-size: step_size must lie in"),
        (["--train-crop", "32"], "--train-crop 32 exceeds --image-size"),
        (["--budgets", "0", "5"], "--budgets must be >= 1, got (0, 5)"),
        (["--cell", "contractive", "--step-size", "0.9"], "step_size must lie in (0.0, 0.666"),
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
        argv = ["train", *TINY, *argv, "--output-dir", str(tmp_path)]
    assert flagship.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--solver", "newton"], "--solver: invalid choice: 'newton'"),
        (["--depht", "3"], "unrecognized arguments: --depht"),
        (["restore", "--checkpoint", "x.pt"], "the following arguments are required: --input"),
    ],
)
def test_argparse_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        flagship.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unfinished_run_needs_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", *TINY, "--no-evaluate", "--output-dir", str(tmp_path)]
    assert flagship.main([*argv, "--max-steps", "1"]) == 0
    assert flagship.main(argv) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert flagship.main([*argv, "--resume", "--depth", "4"]) == 2
    assert "--depth 4 differs from the checkpoint being resumed (3)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("backward", "solver", "adjoint"),
    [("neumann", "picard", False), ("implicit", "broyden", True), ("phantom", "anderson", False)],
)
def test_other_backward_rules_and_solvers(
    backward: str, solver: str, adjoint: bool, tmp_path: Path
) -> None:
    argv = ["train", *TINY, "--backward", backward, "--solver", solver, "--no-evaluate"]
    assert flagship.main([*argv, "--max-steps", "1", "--output-dir", str(tmp_path)]) == 0
    (step,) = [r for r in _log(tmp_path) if r["event"] == "train"]
    assert step["grad_norm"] > 0
    # Only the implicit rule solves an adjoint equation, and the log reports how it went.
    assert (step["backward_iters"] is not None) == adjoint
    assert (step["backward_converged"] is not None) == adjoint
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (checkpoint["settings"]["backward"], checkpoint["settings"]["solver"]) == (
        backward,
        solver,
    )
