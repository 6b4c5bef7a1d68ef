"""``benchmarks/deblur_throughput.py``: the flagship's networks and sizes, every phase timed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deblur_celeba as flagship

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import deblur_throughput


def test_the_benchmark_times_the_presets_networks_and_sizes() -> None:
    for name, (depth, width, norms, train, test) in deblur_throughput.PRESETS.items():
        s = flagship.resolve(name, {"data_dir": "unused"})
        assert (s.depth, s.width, s.batch_norm, s.spectral_norm) == (depth, width, norms, norms)
        assert (s.train_crop or s.image_size, s.image_size) == (train, test)
        assert s.anchor == 0.1 and s.batch_size == 8


def test_every_variant_and_phase_is_reported(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path), "--presets", "small", "--repeats", "1", "--iterations", "1"]
    assert deblur_throughput.main([*argv, "--variants", "fp32", "bf16"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    rates = report["presets"]["small"]
    assert set(rates) == set(deblur_throughput.PHASES)
    assert all(set(r) == {"fp32", "bf16"} and min(r.values()) > 0 for r in rates.values())
    assert "| small | DEQ training |" in (tmp_path / "results.md").read_text()
