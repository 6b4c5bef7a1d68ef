"""The ``evaluate`` and ``restore`` commands on a tiny trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import deblur_celeba as flagship
import numpy as np
import pytest
from PIL import Image


def test_evaluate_is_deterministic_and_takes_overrides(trained_run: Path, tmp_path: Path) -> None:
    argv = ["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--output-dir", str(tmp_path)]
    argv += ["--budgets", "1", "3", "--figure-samples", "3", "--no-progress", "--quiet"]
    assert flagship.main(argv) == 0
    for name in ("results.json", "results.md", "reconstructions.png", "psnr_vs_iterations.png"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["budget_psnr_standard"]) == ["0", "1", "3"]
    assert report["trained_steps"] == 2 and report["settings"]["budgets"] == [1, 3]
    # Same measurements, same numbers as the evaluation at the end of training.
    assert report["table"] == json.loads((trained_run / "results.json").read_text())["table"]
    # Settings that would change the model cannot be given to evaluate.
    with pytest.raises(SystemExit):
        flagship.main([*argv, "--depth", "4"])


def _write_png(path: Path, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 7) % 256, (y * 11) % 256, rng.integers(0, 256, (height, width))], -1)
    Image.fromarray(image.astype(np.uint8)).save(path)


def test_restore_simulate_reports_psnr(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sharp, out = tmp_path / "sharp.png", tmp_path / "out.png"
    _write_png(sharp, 21, 30)  # any size: the cell is convolutional
    argv = ["restore", "--checkpoint", str(trained_run / "best.pt"), "--input", str(sharp)]
    assert flagship.main([*argv, "--output", str(out), "--simulate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"restored {sharp} (21x30) -> {out} in ")
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"measurement", "tikhonov_cg", "degrad"}
    for row in rows.values():  # PSNR, then the paper's convention 6.02 dB lower, then SSIM
        assert float(row[2]) - float(row[6].rstrip("),")) == pytest.approx(6.02, abs=0.011)
        assert 0 < float(row[8]) <= 1
    with Image.open(out) as img:
        assert img.size == (30, 21) and img.mode == "RGB"


def test_restore_without_simulate_restores_the_file_as_given(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blurred, out = tmp_path / "blurred.png", tmp_path / "restored.png"
    _write_png(blurred, 16, 16)
    argv = ["restore", "--checkpoint", str(trained_run / "best.pt"), "--input", str(blurred)]
    assert flagship.main([*argv, "--output", str(out), "--eval-max-iter", "3"]) == 0
    text = capsys.readouterr().out
    assert " 3 iterations" in text and "PSNR" not in text  # no reference, no PSNR
    with Image.open(out) as img, Image.open(blurred) as given:
        assert img.size == (16, 16) and not np.array_equal(np.asarray(img), np.asarray(given))


def test_restore_rejects_bad_paths(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["restore", "--checkpoint", str(trained_run / "best.pt")]
    assert flagship.main([*argv, "--input", "missing.png", "--output", "o.png"]) == 2
    assert "--input 'missing.png' does not exist" in capsys.readouterr().err
    _write_png(tmp_path / "in.png", 16, 16)
    assert flagship.main([*argv, "--input", str(tmp_path / "in.png"), "--output", "o"]) == 2
    assert "--output 'o' needs an image suffix" in capsys.readouterr().err
