"""``benchmarks/deblur_table.py``, the paper's Table 2, on tiny built-in data (seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from deblur_tiny import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import deblur_table

ARGS = [a for a in TINY if a != "--quiet"] + ["--epochs", "2", "--tune-limit", "3"]
ARGS += ["--neumann-terms", "2", "--rules", "jfb", "neumann", "phantom", "implicit", "--quiet"]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("table")
    seen: dict[str, Any] = {}
    tune, run = deblur_table.tune, deblur_table.run

    def spy_tune(A: Any, x: torch.Tensor, d: torch.Tensor, denoiser: Any) -> Any:
        seen["tuned_on"] = x.clone()
        return tune(A, x, d, denoiser)

    def spy_run(opts: Any, overrides: dict[str, Any]) -> Any:
        import deblur_celeba
        from deblur.data import make_splits

        splits = make_splits(deblur_celeba.resolve(opts.preset, overrides))
        seen["test"] = [splits.test[i] for i in range(len(splits.test))]
        return run(opts, overrides)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deblur_table, "tune", spy_tune)
        mp.setattr(deblur_table, "run", spy_run)
        assert deblur_table.main([*ARGS, "--out", str(out)]) == 0
    return {"out": out, "report": json.loads((out / "results.json").read_text()), **seen}


def test_every_row_reports_both_conventions_and_the_papers_numbers(table: dict[str, Any]) -> None:
    rows = table["report"]["table"]
    assert list(rows) == [
        "measurement",
        "tikhonov_cg",
        "tv",
        "pnp",
        "jfb",
        "neumann",
        "phantom",
        "implicit",
    ]
    for key, row in rows.items():
        assert row["psnr_standard"] - row["psnr_paper"] == pytest.approx(6.0206, abs=1e-3), key
        assert 0 < row["ssim"] <= 1, key
    assert rows["tv"]["paper"] == [26.79, 0.86] and rows["implicit"]["paper"] == [32.43, 0.94]
    assert rows["jfb"]["paper"] == [26.88, 0.91] and "paper" not in rows["neumann"]
    markdown = (table["out"] / "results.md").read_text()
    assert "| DEQ, JFB |" in markdown and "26.88 / 0.91" in markdown
    assert (table["out"] / "reconstructions.png").is_file()


def test_learned_rows_report_their_costs(table: dict[str, Any]) -> None:
    rows = table["report"]["table"]
    for rule in ("jfb", "neumann", "phantom", "implicit"):
        row = rows[rule]
        assert row["steps"] == 4  # 2 epochs of 2 steps, interleaved sessions resumed exactly
        assert 1 <= row["forward_iterations"] <= 8 and 0 <= row["converged_fraction"] <= 1
        assert row["seconds_per_epoch"] > 0 and row["training_seconds"] > 0
        assert row["peak_mib"] is None or row["peak_mib"] >= 0
    # VJPs through the cell per step: JFB one (the parameters' VJP), Neumann with k = 2 terms
    # k + 1, the phantom gradient's k = 2 steps k, implicit 1 + the adjoint solve's.
    assert rows["jfb"]["vjps_per_step"] == 1 and rows["neumann"]["vjps_per_step"] == 3
    assert rows["phantom"]["vjps_per_step"] == 2 and rows["implicit"]["vjps_per_step"] > 3
    assert (
        0 <= rows["implicit"]["adjoint_converged"] <= 1 and rows["jfb"]["adjoint_converged"] is None
    )


def test_baselines_are_tuned_on_validation_images_only(table: dict[str, Any]) -> None:
    tuned_on, test = table["tuned_on"], table["test"]
    assert len(tuned_on) == 3 and test
    assert not any(torch.equal(v, t) for v in tuned_on for t in test)
    tuned = table["report"]["tuned"]
    assert tuned["tv"]["lam"] in deblur_table.TV_LAMBDAS
    pnp = tuned["pnp"]
    assert (pnp["strength"], pnp["step_size"], pnp["iters"]) in deblur_table.PNP_GRID


def test_a_time_budget_stops_every_rule_alike(tmp_path: Path) -> None:
    argv = [*ARGS[: ARGS.index("--rules")], "--rules", "jfb", "implicit", "--time-budget", "1e-6"]
    assert deblur_table.main([*argv, "--quiet", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["table"]
    assert rows["jfb"]["steps"] == rows["implicit"]["steps"] == 1  # the first step spends it
