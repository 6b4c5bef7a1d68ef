"""Smoke test of the reuse benchmarks (``benchmarks/reuse_cache.py``, ``reuse_shine.py``) at a
CI size: every part runs and its records hold what the published tables read. Speeds are
measured there, never asserted here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (ROOT / "benchmarks" / "reuse_cache.py").exists(),
    reason="needs the source tree's benchmarks/ package",
)


@pytest.mark.slow  # two epochs of training, three arms
def test_the_cache_benchmark_hits_every_repeated_sample_and_keeps_the_answers(tmp_path):
    pytest.importorskip("sklearn")
    from benchmarks import reuse_cache

    trained = tmp_path / "digits.pt"
    digits = reuse_cache.digits(2, (0,), 0.5, train_size=192, trained=trained)
    rows = {row["arm"]: row for row in digits["summary"]}
    assert set(rows) == set(reuse_cache.ARMS)
    # The first epoch meets every key once; from the second on, every key is held.
    runs = digits["runs"]
    for arm in reuse_cache.ARMS:
        first, second = runs[arm][0]
        assert first["hit_fraction"] == 0.0
        assert second["hit_fraction"] == (0.0 if arm == "no cache" else 1.0)
        assert 0.0 <= second["accuracy"] <= 1.0 and second["iterations"] > 0
    # The check: two evaluations of f per step where some key hits, none without it.
    assert runs["cache"][0][1]["check_evals_per_step"] == 2
    assert runs["cache, no check"][0][1]["check_evals_per_step"] == 0

    video = reuse_cache.video(frames=3, step=0.15, rtol=1e-4, sequences=8, trained=trained)
    totals = video["totals"]
    assert totals["cache"]["check_evals"] == 2 * (3 - 1)  # every frame after the first
    assert 0.0 <= video["prediction_agreement"] <= 1.0

    bratu = reuse_cache.bratu(paths=2, steps=8, rtol=1e-8)
    assert bratu["all_converged"]
    # Each step starts from the last step's solution: fewer iterations, the same answers.
    totals = bratu["totals"]
    assert totals["cache"]["iterations"] < totals["no cache"]["iterations"]
    assert totals["cache"]["check_evals"] == 2 * (8 - 1)
    assert bratu["largest_relative_gap_to_no_cache"] < 1e-6


def test_the_shine_benchmark_reports_every_rule_against_the_exact_gradient():
    from benchmarks import reuse_shine

    rows = reuse_shine.gradients(repeats=1, builds=(reuse_shine.conv_case,))
    assert len(rows) == len(reuse_shine.SOLVERS) * len(reuse_shine.RULES)
    for row in rows:
        assert row["forward_converged"] == 1.0
        assert math.isfinite(row["backward_ms"]) and -1.0 <= row["cosine"] <= 1.0 + 1e-9
        by_rule = {r["rule"]: r for r in rows if r["forward_solver"] == row["forward_solver"]}
        # GMRES to 1e-6 on a converged forward is the exact gradient to a few digits.
        assert by_rule["GMRES"]["cosine"] > 0.9999
        assert by_rule["JFB"]["vjps"] == 0 and by_rule["Neumann(5)"]["vjps"] == 5
        unchecked = by_rule["SHINE unchecked"]
        assert unchecked["vjps"] == 1 and all(unchecked["used_estimate"])
        # SHINE's own report: a sample either used its estimate or fell back, never both.
        shine = by_rule["SHINE"]
        for used, fell, rho in zip(
            shine["used_estimate"], shine["fell_back"], shine["estimate_residual"], strict=True
        ):
            assert used != fell
            assert used == (rho <= 0.1)
        if not any(shine["used_estimate"]):  # every sample solved: GMRES's gradient
            assert shine["cosine"] == pytest.approx(by_rule["GMRES"]["cosine"], abs=1e-6)
