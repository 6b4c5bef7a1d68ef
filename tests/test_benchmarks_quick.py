"""Smoke test of the benchmark suite: ``python -m benchmarks run --suite all --quick``.

It checks that every suite runs (or is skipped with a recorded reason) and that the JSON,
Markdown and plots have the expected fields. It never checks a speed: speed is measured in
``benchmarks/``, not asserted in tests.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import implicitlayers as il
from benchmarks._cli import SUITES as REGISTERED_SUITES

ROOT = Path(__file__).resolve().parent.parent
#: Every suite the runner knows (its one table): each must run and report.
SUITES = tuple(REGISTERED_SUITES)
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
    assert {r["solver"] for r in solves} == set(il.solvers.SOLVERS)  # every library solver
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


#: An acceptance target: a comparison with a number (``"<= 1.15"``), or the peers suite's
#: ``"no row slower"``.
TARGET = re.compile(r"(<=|>=) (-?[0-9]+(?:\.[0-9]+)?)")
COMPARE = {"<=": operator.le, ">=": operator.ge}
ENTRY_FIELDS = {"name", "description", "value", "target", "passed", "detail"}


def _acceptance(quick_run: Path) -> dict[str, dict[str, Any]]:
    suites = json.loads((quick_run / "results.json").read_text())["suites"]
    entries = [a for s in suites.values() for a in s["acceptance"]]
    by_name = {a["name"]: a for a in entries}
    assert len(by_name) == len(entries), "acceptance names must be unique"
    return by_name


def test_acceptance_entries_are_well_formed(quick_run: Path) -> None:
    entries = _acceptance(quick_run)
    assert entries
    for name, a in entries.items():
        assert set(a) == ENTRY_FIELDS, name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        for field in ("description", "target", "detail"):
            assert isinstance(a[field], str) and a[field].strip(), (name, field)
        value, passed = a["value"], a["passed"]
        if value is None:
            # Not measured in this run: no verdict, and the detail says why.
            assert passed is None, name
            continue
        assert isinstance(value, (int, float)) and not isinstance(value, bool), name
        assert math.isfinite(value), (name, value)
        assert isinstance(passed, bool), name
        if a["target"] == "no row slower":
            # The peers suite: its verdict lists the slower rows; none can be slower when the
            # worst ours/torchdeq median ratio (the value) is at most 1.
            assert passed == ("slower: none" in a["detail"]), name
            assert passed or value > 1, name
            continue
        match = TARGET.fullmatch(a["target"])
        assert match, (name, a["target"])
        op, threshold = match.groups()
        assert passed == COMPARE[op](value, float(threshold)), (name, value, a["target"], passed)


def test_acceptance_values_are_the_recorded_measurements(quick_run: Path) -> None:
    suites = json.loads((quick_run / "results.json").read_text())["suites"]
    acceptance = _acceptance(quick_run)
    # Each suite's own JSON file carries the same entries.
    for name in SUITES:
        own = json.loads((quick_run / f"{name}.json").read_text())
        assert own["acceptance"] == suites[name]["acceptance"], name
    # JFB: the worst problem's backward time in VJPs.
    jfb = [
        r for r in suites["backward"]["records"] if r["kind"] == "backward" and r["rule"] == "JFB"
    ]
    entry = acceptance["jfb_backward_vjps"]
    assert entry["value"] == max(r["backward_time_in_vjps"] for r in jfb)
    # Memory: peaks at the depths the description names, for both DEQ solvers and every problem.
    memory = suites["memory"]["records"]
    families = {r["family"] for r in memory}
    assert families
    for family in families:
        peak = {(r["method"], r["depth"]): r["peak_bytes"] for r in memory if r["family"] == family}
        assert all(isinstance(b, int) and b > 0 for b in peak.values()), family
        for solver in ("anderson", "picard"):
            flat = acceptance[f"deq_memory_flat_{solver}_{family}"]
            hi, lo = map(
                int, re.findall(r"peak at (\d+) iterations vs (\d+),", flat["description"])[0]
            )
            assert (hi, lo) == (max(d for _, d in peak), min(d for _, d in peak)), family
            growth = peak[f"DEQ {solver}", hi] / peak[f"DEQ {solver}", lo] - 1
            assert flat["value"] == pytest.approx(growth, rel=1e-12, abs=1e-15), family
            ratio = acceptance[f"unrolled_vs_deq_{solver}_{family}"]
            mid = int(re.fullmatch(r".*peak at (\d+) iterations", ratio["description"])[1])
            expected = peak["unrolled", mid] / peak[f"DEQ {solver}", mid]
            assert ratio["value"] == pytest.approx(expected, rel=1e-12), family
    # Quick mode does not run DE-GRAD at 64x64: the solver overhead is recorded as not measured.
    solvers = suites["solvers"]
    assert 64 not in solvers["config"]["degrad_sizes"]
    assert acceptance["solver_overhead_degrad64"]["value"] is None
    assert "anderson_vs_picard_fevals" not in acceptance


def test_markdown_report(quick_run: Path) -> None:
    report = (quick_run / "report.md").read_text()
    assert "## Acceptance figures" in report
    for name in SUITES:
        assert f"(`{name}`)" in report
    # One table row per acceptance entry, with the entry's target and verdict.
    suites = json.loads((quick_run / "results.json").read_text())["suites"]
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ")]
    verdicts = {True: "**met**", False: "**missed**", None: "n/a"}
    for suite_name, suite in suites.items():
        for a in suite["acceptance"]:
            row = [r for r in rows if r[0] == f"| {suite_name}" and r[1] == a["description"]]
            assert len(row) == 1, a["name"]
            assert row[0][3:5] == [a["target"], verdicts[a["passed"]]], a["name"]


def test_adjoint_suite_gmres_solves_what_fixed_point_iteration_cannot(quick_run: Path) -> None:
    suite = json.loads((quick_run / "results.json").read_text())["suites"]["adjoint"]
    records = [r for r in suite["records"] if r["kind"] == "adjoint"]
    budget = suite["config"]["budget_vjps"]
    rho = {r["problem"]: r["rho"] for r in records}
    # One contractive problem, the others non-contractive with I - J^T invertible.
    assert sorted(r < 1 for r in rho.values()) == [False] * (len(rho) - 1) + [True], rho
    assert all(r < 2 for r in rho.values()), rho
    for r in records:
        # The loop may evaluate once more to re-measure an earlier best iterate.
        assert 0 < r["vjps"] <= budget + 1, r["solver"]
        if r["solver"].startswith("GMRES"):
            assert r["all_converged"], (r["problem"], r["dtype"])
            assert r["relative_residual_max"] <= 2e-6, (r["problem"], r["dtype"])
        if r["solver"] == "Picard" and r["rho"] > 1:
            assert not any(r["converged"]), r["dtype"]


def test_the_overhead_ab_script_times_another_checkout_beside_this_one(tmp_path: Path):
    # This tree stands in for the other checkout: the script must load it under another name
    # and report every solver of both trees (speeds are not checked).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    script = ROOT / "benchmarks" / "overhead_ab.py"
    args = [sys.executable, str(script), "--before", str(ROOT), "--iterations", "3"]
    proc = subprocess.run(
        [*args, "--repeats", "3"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    for solver in ("Picard", "Anderson", "Broyden"):
        for tree in ("before", "now"):
            assert re.search(rf"^  {solver} {tree} +-?\d+\.\d us", proc.stdout, re.M), proc.stdout
    missing = subprocess.run(
        [*args[:2], "--before", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert missing.returncode != 0 and "no implicitlayers/__init__.py" in missing.stderr
