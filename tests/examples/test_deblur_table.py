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
from benchmarks import deblur_photos, deblur_table

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
        assert 0 <= row["tight_converged"] <= 1 and 10 < row["tight_psnr_standard"] < 60
        assert 0 < row["radius_mean"] <= row["radius_max"] and 0 <= row["radius_settled"] <= 1
    # VJPs through the cell per step (from the rule and the logged adjoint iterations): JFB one
    # (the parameters' VJP), Neumann with k = 2 terms k + 1, the phantom gradient's k = 2
    # steps k, implicit 1 + the adjoint solve's.
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
    assert (pnp["strength"], pnp["step_size"], pnp["max_iter"]) in deblur_table.PNP_GRID


def test_a_time_budget_stops_every_rule_alike(tmp_path: Path) -> None:
    argv = [*ARGS[: ARGS.index("--rules")], "--rules", "jfb", "implicit", "--time-budget", "1e-6"]
    assert deblur_table.main([*argv, "--quiet", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["table"]
    assert rows["jfb"]["steps"] == rows["implicit"]["steps"] == 1  # the first step spends it


def test_an_interrupted_table_resumes_where_it_stopped(tmp_path: Path) -> None:
    argv = [*ARGS[: ARGS.index("--rules")], "--rules", "jfb", "implicit", "--turn-steps", "1"]
    argv += ["--quiet", "--out", str(tmp_path)]
    train, turns = deblur_table.flagship.train, []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        turns.append(args[2].name)  # the rule's folder
        if len(turns) == 4:  # pretraining, then jfb, implicit, and jfb's second turn
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deblur_table.flagship, "train", interrupted)
        with pytest.raises(KeyboardInterrupt):
            deblur_table.main(argv)
    assert turns == ["pretrain", "jfb", "implicit", "jfb"]
    assert deblur_table.main(argv) == 2  # the folder holds a run: --resume, or another --out
    with pytest.MonkeyPatch.context() as mp:  # nor is anything tuned again
        mp.setattr(deblur_table, "tune", lambda *args: pytest.fail("tuned again on resume"))
        assert deblur_table.main([*argv, "--resume"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["table"]
    # One step per turn; 2 epochs of 2 steps in all, none repeated, none lost.
    assert rows["jfb"]["steps"] == rows["implicit"]["steps"] == 4
    assert rows["jfb"]["epochs"] == rows["implicit"]["epochs"] == 2


def test_the_docs_figure_restores_built_in_photographs(table: dict[str, Any]) -> None:
    """``benchmarks/deblur_photos.py``: whole crops of scikit-image photographs, every method."""
    checkpoint, out = table["out"] / "jfb" / "best.pt", table["out"] / "photos.png"
    argv = ["--checkpoint", str(checkpoint), "--table", str(table["out"] / "results.json")]
    assert deblur_photos.main([*argv, "--size", "16", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as image:  # six columns (truth, measurement, CG, TV, PnP, DE-GRAD)
        assert image.width > 5 * image.height / len(deblur_photos.CROPS)


def test_a_signal_stops_the_table_at_a_checkpoint(tmp_path: Path) -> None:
    argv = [*ARGS[: ARGS.index("--rules")], "--rules", "jfb", "--quiet", "--out", str(tmp_path)]
    train = deblur_table.flagship.train

    def signalled(*args: Any, **kwargs: Any) -> Any:
        if args[2].name == "jfb":  # as the handler does on SIGTERM during the first step
            kwargs["stop"].reason = "SIGTERM"
        return train(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deblur_table.flagship, "train", signalled)
        assert deblur_table.main(argv) == 2  # "stopped by SIGTERM; continue with --resume"
    saved = torch.load(tmp_path / "jfb" / "last.pt", weights_only=True)
    assert saved["progress"]["global_step"] == 1 and saved["progress"]["phase"] == "deq"
    assert deblur_table.main([*argv, "--resume"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["table"]
    assert rows["jfb"]["steps"] == 4
