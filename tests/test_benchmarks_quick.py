"""Smoke test of the benchmark suite: ``python -m benchmarks run --suite all --quick``.

It checks that every suite runs (or is skipped with a recorded reason) and that the JSON,
Markdown and plots have the expected fields. It never checks a speed: speed is measured in
``benchmarks/``, not asserted in tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("solvers", "freezing", "backward", "memory", "peers", "dense", "gpu", "sync")
ENV_FIELDS = ("date", "host", "cpu", "torch", "implicitlayers", "device", "torch_threads")

pytestmark = pytest.mark.skipif(
    not (ROOT / "benchmarks" / "__main__.py").exists(),
    reason="needs the source tree's benchmarks/ package",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run every suite once in quick mode on the CPU; return the output folder."""
    out = tmp_path_factory.mktemp("bench-quick")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "run",
            "--suite",
            "all",
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_results_json_has_environment_and_every_suite(quick_run: Path) -> None:
    data = json.loads((quick_run / "results.json").read_text())
    assert data["quick"] is True
    assert data["command"].startswith("python -m benchmarks run")
    for field in ENV_FIELDS:
        assert data["environment"][field] not in (None, ""), field
    assert set(data["suites"]) == set(SUITES)
    for name, suite in data["suites"].items():
        assert suite["status"] in ("ok", "skipped"), (name, suite.get("reason"))
        if suite["status"] == "skipped":
            assert suite["reason"], name
            continue
        assert suite["records"], name
        assert all("recorded_at" in r for r in suite["records"]), name
        for plot in suite["plots"]:
            assert (quick_run / plot).stat().st_size > 0, plot


def test_per_suite_json_files_carry_the_environment(quick_run: Path) -> None:
    for name in SUITES:
        data = json.loads((quick_run / f"{name}.json").read_text())
        assert data["name"] == name
        assert data["environment"]["date"]
        assert data["environment"]["torch"]


def test_gpu_suite_is_skipped_with_a_reason_on_cpu(quick_run: Path) -> None:
    gpu = json.loads((quick_run / "gpu.json").read_text())
    assert gpu["status"] == "skipped"
    assert "CUDA" in gpu["reason"]


def test_expected_measurement_fields(quick_run: Path) -> None:
    suites = json.loads((quick_run / "results.json").read_text())["suites"]
    solves = [r for r in suites["solvers"]["records"] if r["kind"] == "solve"]
    assert {r["solver"] for r in solves} == {"picard", "anderson", "broyden"}
    for r in solves:
        for field in ("rtol", "n_f_evals", "time_s", "overhead_inline", "overhead_isolated"):
            assert field in r, field
    traces = [r for r in suites["solvers"]["records"] if r["kind"] == "trace"]
    assert traces and all(len(r["relative_residual"]) >= 1 for r in traces)
    backward = [r for r in suites["backward"]["records"] if r["kind"] == "backward"]
    assert {"JFB", "Implicit(Anderson)"} <= {r["rule"] for r in backward}
    for r in backward:
        for field in ("backward_time_in_vjps", "cosine_to_exact", "peak_bytes"):
            assert field in r, field
    memory = suites["memory"]["records"]
    assert {r["method"] for r in memory} == {"DEQ anderson", "DEQ picard", "unrolled"}
    assert all(r["saved_bytes"] > 0 for r in memory)
    freezing = [r for r in suites["freezing"]["records"] if r["kind"] == "freezing_ratio"]
    assert freezing and all("work_ratio" in r for r in freezing)
    dense = suites["dense"]["records"]
    assert any(r["kind"] == "dense" and not r["extrapolated"] for r in dense)
    assert any(r["kind"] == "dense" and r["extrapolated"] for r in dense)
    assert any(r["kind"] == "matrix_free" for r in dense)
    if suites["peers"]["status"] == "ok":
        assert any("time_ratio" in r for r in suites["peers"]["records"])
    sync = [r for r in suites["sync"]["records"] if r["kind"] == "check_every"]
    assert {r["check_every"] for r in sync} == {1, 4}
    for key in {(r["problem"], r["solver"]) for r in sync}:
        every, lazy = sorted(
            (r for r in sync if (r["problem"], r["solver"]) == key), key=lambda r: r["check_every"]
        )
        # check_every is a functional property, not a speed: it must cut the host reads.
        assert lazy["host_reads_accelerator_path"] < every["host_reads_accelerator_path"], key


def test_acceptance_entries_are_well_formed(quick_run: Path) -> None:
    suites = json.loads((quick_run / "results.json").read_text())["suites"]
    entries = [a for s in suites.values() for a in s["acceptance"]]
    assert entries
    for a in entries:
        assert set(a) >= {"name", "description", "value", "target", "passed", "detail"}


def test_markdown_report(quick_run: Path) -> None:
    report = (quick_run / "report.md").read_text()
    assert "## Acceptance figures" in report
    for name in SUITES:
        assert f"(`{name}`)" in report
