"""The comparison pipeline (``examples/deblur/compare.py``) on tiny built-in data.

One tiny end-to-end run (16x16 crops, DnCNN 3x8, one epoch, every backward rule) is shared by
the tests below; it takes seconds on a CPU. The baselines' own correctness is tested in
``tests/imaging``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from deblur import compare
from deblur.compare_baselines import SealedDataset
from deblur.compare_report import run_checks, summarize_rule
from deblur.compare_training import CallCount, CountingBackward, parse_rules

import implicitlayers as il

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "--image-size", "16", "--depth", "3", "--width", "8", "--batch-size", "4",
    "--builtin-train-crops", "8", "--builtin-val-crops", "4", "--builtin-test-crops", "4",
    "--pretrain-steps", "2", "--epochs", "1", "--max-iter", "8", "--eval-max-iter", "8",
    "--figure-samples", "2", "--eval-batch-size", "4", "--device", "cpu",
    "--no-progress", "--quiet", "--neumann-terms", "1", "--tune-limit", "3",
    "--wiener-eps", "0.001", "0.01", "--gd-max-steps", "15", "--gd-tikhonov", "0.01", "0.1",
    "--tv-lambdas", "0.001", "0.01", "--tv-iters", "10",
    "--pnp-strengths", "0.5", "1.0", "--pnp-steps", "1.0", "--pnp-max-iters", "4",
]  # fmt: skip

ROWS = (
    "measurement",
    "direct_inverse",
    "wiener",
    "gradient_descent",
    "gradient_descent_tikhonov",
    "tikhonov_cg",
    "tv",
    "pnp",
    "deq_implicit",
    "deq_neumann1",
    "deq_jfb",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny comparison, with spies on what tuning saw and when the test split was read."""
    out = tmp_path_factory.mktemp("compare")
    events: list[tuple[str, Any]] = []
    tune, train = compare.tune_baselines, compare.train_rules
    read = SealedDataset.__getitem__

    def spy_tune(operator: Any, x: torch.Tensor, *args: Any) -> Any:
        events.append(("tune", x.clone()))
        return tune(operator, x, *args)

    def spy_train(*args: Any, **kwargs: Any) -> Any:
        events.append(("train", None))
        return train(*args, **kwargs)

    def spy_read(self: SealedDataset, index: int) -> torch.Tensor:
        image = read(self, index)  # raises while sealed
        events.append(("test", image.clone()))
        return image

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare, "tune_baselines", spy_tune)
        mp.setattr(compare, "train_rules", spy_train)
        mp.setattr(SealedDataset, "__getitem__", spy_read)
        assert compare.main([*TINY, "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    return {"out": out, "report": report, "events": events}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_results_have_every_row_with_finite_metrics(run: dict[str, Any]) -> None:
    report = run["report"]
    rows = {row["key"]: row for row in report["table"]}
    assert tuple(rows) == ROWS
    for key, row in rows.items():
        assert _finite(row["psnr_standard"]) and _finite(row["psnr_paper"]), key
        # [-1, 1] with peak 1 is exactly 20 log10(2) = 6.02 dB below [0, 1] with peak 1
        assert row["psnr_standard"] - row["psnr_paper"] == pytest.approx(6.0206, abs=1e-3)
        assert 0 < row["ssim"] <= 1, key
    for key in ("wiener", "gradient_descent", "gradient_descent_tikhonov", "tv", "pnp"):
        assert rows[key]["hyperparameters"] and _finite(rows[key]["val_psnr_standard"]), key
    assert rows["tikhonov_cg"]["hyperparameters"] == {"lam": 0.01, "steps": 60}
    assert rows["direct_inverse"]["hyperparameters"] == {"eps": 0.0}
    assert rows["tv"]["hyperparameters"]["lam"] in (0.001, 0.01)
    assert rows["tv"]["paper"] == {"row": "TV", "psnr_paper": 26.79, "ssim": 0.86}
    assert rows["deq_jfb"]["paper"]["psnr_paper"] == 26.88
    assert rows["deq_implicit"]["paper"]["psnr_paper"] == 32.43
    for name in ("results.md", "table1.png", "val_psnr_vs_time.png", "config.json"):
        assert (run["out"] / name).is_file(), name
    markdown = (run["out"] / "results.md").read_text()
    assert "| DEQ, JFB |" in markdown and "32.43 / 0.94" in markdown


def test_learned_methods_report_time_memory_iterations_and_vjps(run: dict[str, Any]) -> None:
    learned = run["report"]["learned"]
    assert set(learned) == {"deq_implicit", "deq_neumann1", "deq_jfb"}
    for key, cost in learned.items():
        for field in ("seconds_per_epoch", "seconds_per_epoch_median", "process_peak_mib"):
            assert _finite(cost[field]) and cost[field] > 0, (key, field)
        assert cost["step_memory_mib_max"] >= cost["step_memory_mib_median"] >= 0
        assert cost["saved_tensor_mib"] > 0
        assert 1 <= cost["forward_iters_train"] <= 8 and 1 <= cost["forward_iters_test"] <= 8
        assert [p["epoch"] for p in cost["curve"]] == [0, 1]
        assert cost["curve"][0]["train_seconds"] == 0 < cost["curve"][1]["train_seconds"]
    assert learned["deq_jfb"]["vjps_per_step"] == 1
    assert learned["deq_neumann1"]["vjps_per_step"] == 2
    implicit = learned["deq_implicit"]
    assert implicit["vjps_per_step"] == 1 + implicit["adjoint_n_f_evals"] > 2
    assert 0 <= implicit["adjoint_converged"] <= 1
    assert learned["deq_jfb"]["adjoint_converged"] is None
    # Every rule records one application of f; the rules that take VJPs also keep what the
    # derivative with respect to z needs, which JFB skips.
    saved = {key: cost["saved_tensor_mib"] for key, cost in learned.items()}
    assert saved["deq_implicit"] == saved["deq_neumann1"]
    assert 0 < saved["deq_jfb"] <= saved["deq_implicit"]


def test_checks_are_reported_not_assumed(run: dict[str, Any]) -> None:
    checks = run["report"]["checks"]
    names = [c["name"] for c in checks]
    assert sum("above TV" in n for n in names) == 3
    assert any(n.startswith("PnP above") for n in names)
    assert any("within 0.5 dB" in n for n in names) and any("0.6 x" in n for n in names)
    assert all(c["passed"] in (True, False) and c["detail"] for c in checks)


def test_tuning_never_touches_the_test_split(run: dict[str, Any]) -> None:
    events = run["events"]
    kinds = [kind for kind, _ in events]
    assert kinds.index("tune") < kinds.index("train") < kinds.index("test")
    assert "test" not in kinds[: kinds.index("train") + 1]
    tuning = events[kinds.index("tune")][1]
    test_images = [image for kind, image in events if kind == "test"]
    assert len(tuning) == 3 and test_images
    for image in tuning:
        assert not any(torch.equal(image, t) for t in test_images)
    assert run["report"]["splits"]["counts"] == {"train": 8, "val": 4, "test": 4}


def test_the_test_split_is_sealed_until_unsealed() -> None:
    sealed = SealedDataset([torch.zeros(1)])  # type: ignore[arg-type]
    assert len(sealed) == 1
    with pytest.raises(RuntimeError, match="read before the final evaluation"):
        sealed[0]
    sealed.unseal()
    assert torch.equal(sealed[0], torch.zeros(1))


class _Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.3 * self.lin(z) + x)


@pytest.mark.parametrize(
    "rule",
    [il.JFB(), il.Neumann(terms=3), il.ImplicitDifferentiation(solver=il.Picard(max_iter=40))],
    ids=["jfb", "neumann3", "implicit"],
)
def test_counting_backward_counts_vjps_and_keeps_the_gradient(rule: il.AbstractBackward) -> None:
    torch.manual_seed(0)
    f, x = _Affine().double(), torch.randn(3, 6, dtype=torch.float64)
    solver = il.Anderson(max_iter=100, rtol=1e-10, atol=1e-12)
    grads = []
    for backward in (rule, CountingBackward(inner=rule, counter=(count := CallCount()))):
        deq = il.DEQ(f, solver=solver, backward=backward)
        f.zero_grad()
        deq(x).z.square().sum().backward()
        grads.append(f.lin.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    if isinstance(rule, il.JFB):
        assert count.n == 0
    elif isinstance(rule, il.Neumann):
        assert count.n == 3
    else:
        assert deq.last_backward_result is not None
        assert count.n == deq.last_backward_result.n_f_evals > 1


def test_summaries_and_checks_from_synthetic_logs() -> None:
    val = {"event": "val", "psnr_paper": 14.0, "fwd_iters_mean": 9}
    log = [
        {**val, "epoch": 0, "psnr_standard": 20.0},
        {"event": "train", "epoch": 0, "sec_per_step": 1.0},
        {"event": "train", "epoch": 0, "sec_per_step": 3.0},
        {**val, "epoch": 1, "psnr_standard": 25.0},
    ]
    cost = {"fwd_iters_mean": 8.0, "vjps": 1, "adjoint_n_f_evals": None, "adjoint_converged": None}
    cost |= {"saved_tensor_bytes": 2**20, "peak_mib": 100.0, "step_mib": 2.0}
    costs = [{**cost, "sec_per_step": 1.0}, {**cost, "sec_per_step": 3.0}]
    summary = summarize_rule(log, costs, steps_per_epoch=2)
    assert [p["train_seconds"] for p in summary["curve"]] == [0.0, 4.0]
    assert summary["seconds_per_epoch"] == 4.0 and summary["seconds_per_epoch_median"] == 4.0
    assert summary["saved_tensor_mib"] == 1.0 and summary["adjoint_n_f_evals"] is None
    values = {"tv": 30.0, "pnp": 31.0, "gradient_descent": 29.0}
    values |= {"gradient_descent_tikhonov": 31.5, "deq_jfb": 32.0, "deq_implicit": 32.6}
    rows = {key: {"method": key, "psnr_standard": value} for key, value in values.items()}
    learned = {
        "deq_jfb": {"seconds_per_epoch_median": 5.0, "seconds_per_epoch": 5.0},
        "deq_implicit": {"seconds_per_epoch_median": 10.0, "seconds_per_epoch": 10.0},
    }
    outcome = {c["name"]: c["passed"] for c in run_checks(rows, learned)}
    assert outcome["deq_jfb above TV"] and outcome["deq_implicit above TV"]
    assert outcome["PnP above gradient_descent"] is True
    assert outcome["PnP above gradient_descent_tikhonov"] is False
    assert outcome["JFB within 0.5 dB of implicit differentiation (test PSNR)"] is False
    assert outcome["JFB training time per epoch below 0.6 x implicit's"] is True


def test_parser_plugs_into_a_subcommand_parser() -> None:
    parser = argparse.ArgumentParser()
    compare.add_compare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--out", "somewhere", "--rules", "jfb", "--epochs", "2"])
    assert args.command == "compare" and args.out == "somewhere" and args.rules == ["jfb"]
    assert args.epochs == 2 and not hasattr(args, "depth")  # unset: the preset decides
    assert parse_rules(["jfb", "neumann"], [1, 5])[2].key == "neumann5"
    with pytest.raises(ValueError, match="neumann-terms must be integers >= 0"):
        parse_rules(["neumann"], [-1])


def test_bad_settings_fail_fast_with_the_flag_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.main(["--neumann-terms", "-1", "--quiet"]) == 2
    assert "--neumann-terms must be integers >= 0" in capsys.readouterr().err


def test_runs_as_a_script() -> None:
    script = ROOT / "examples" / "deblur" / "compare.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--tune-limit" in done.stdout and "JFB paper's comparison" in done.stdout


def test_flagship_script_dispatches_compare(tmp_path: Path) -> None:
    import deblur_celeba

    out = tmp_path / "via-flagship"
    tiny = [a for a in TINY if a != "--quiet"]
    assert deblur_celeba.main(["compare", *tiny, "--rules", "jfb", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "deq_jfb" in json.dumps(results)


def test_contractive_cell_passes_through(tmp_path: Path) -> None:
    out = tmp_path / "contractive"
    argv = [*TINY, "--rules", "jfb", "--cell", "contractive", "--out", str(out)]
    assert compare.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["cell"] == "contractive" and results["config"]["step_size"] == 0.5
    assert results["training"].startswith("contractive cell, ContractiveDnCNN 3x8")
    checkpoint = torch.load(out / "jfb" / "best.pt", weights_only=True)
    assert checkpoint["config"]["cell"] == "contractive"
    assert "lipschitz_bound" in checkpoint["metrics"]
