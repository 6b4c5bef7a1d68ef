"""The ``evaluate`` and ``restore`` subcommands on a tiny trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import deblur_celeba
import numpy as np
import pytest
from PIL import Image


def test_evaluate_writes_results_and_figures(trained_run: Path, tmp_path: Path) -> None:
    argv = ["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--output-dir", str(tmp_path)]
    argv += ["--budgets", "1", "3", "--figure-samples", "3", "--no-progress", "--quiet"]
    assert deblur_celeba.main(argv) == 0
    for name in (
        "results.json",
        "results.md",
        "reconstructions.png",
        "psnr_vs_iterations.png",
        "loss_curves.png",
    ):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["budget_psnr_standard"]) == {"0", "1", "3"}
    assert report["trained_steps"] == 2
    assert "Tikhonov-CG" in (tmp_path / "results.md").read_text()
    # Evaluation is deterministic: same measurements, same numbers as after training.
    first = json.loads((trained_run / "results.json").read_text())
    assert report["table"] == first["table"]


def _write_png(path: Path, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 7) % 256, (y * 11) % 256, rng.integers(0, 256, (height, width))], -1)
    Image.fromarray(image.astype(np.uint8)).save(path)


def test_restore_simulate_reports_psnr(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sharp, out, measured = tmp_path / "sharp.png", tmp_path / "out.png", tmp_path / "blurred.png"
    _write_png(sharp, 21, 30)  # any size: the cell is convolutional
    argv = ["restore", "--checkpoint", str(trained_run / "best.pt"), "--input", str(sharp)]
    argv += ["--output", str(out), "--simulate", "--save-measurement", str(measured)]
    assert deblur_celeba.main(argv) == 0
    text = capsys.readouterr().out
    assert "degrad" in text and "PSNR" in text and "tikhonov_cg" in text
    for path in (out, measured):
        with Image.open(path) as img:
            assert img.size == (30, 21) and img.mode == "RGB"


def test_restore_round_trip_without_simulate(trained_run: Path, tmp_path: Path) -> None:
    from deblur.restore import restore_file

    blurred, out = tmp_path / "blurred.png", tmp_path / "restored.png"
    _write_png(blurred, 16, 16)
    summary = restore_file(trained_run / "best.pt", blurred, out)
    assert out.is_file() and summary["size"] == [16, 16]
    assert 1 <= summary["iterations"] <= 8
    assert "degrad" not in summary  # no reference, no PSNR


def test_restore_rejects_bad_paths(trained_run: Path, tmp_path: Path, capsys) -> None:
    argv = ["restore", "--checkpoint", str(trained_run / "best.pt")]
    assert deblur_celeba.main([*argv, "--input", "missing.png", "--output", "o.png"]) == 2
    assert "--input 'missing.png' does not exist" in capsys.readouterr().err
    _write_png(tmp_path / "in.png", 16, 16)
    assert deblur_celeba.main([*argv, "--input", str(tmp_path / "in.png"), "--output", "o"]) == 2
    assert "--output 'o' needs an image suffix" in capsys.readouterr().err
