"""``benchmarks/paper_gpu.sh``, the GPU script, run on the CPU at tiny sizes (about a minute)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY = "--image-size 32 --train-crop 16 --depth 3 --width 8 --batch-size 4 --limit 8"
TINY += " --val-size 4 --test-limit 4 --pretrain-steps 2 --epochs 1 --max-iter 8"
TINY += " --eval-max-iter 8 --budgets 1 --eval-batch-size 4 --figure-samples 2 --workers 0"


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils' timeout",
)
def test_the_gpu_script_trains_stops_and_scores_the_paper_preset(tmp_path: Path) -> None:
    faces = tmp_path / "faces"
    faces.mkdir()
    g = np.random.default_rng(0)
    for i in range(20):  # stand-ins for CelebA JPEGs (178 x 218, as the aligned set)
        pixels = g.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(faces / f"{i:06d}.jpg")
    out = tmp_path / "out"
    env = os.environ | {"DEVICE": "cpu", "PYTHON": sys.executable, "TRAIN_SECONDS": "600"}
    env |= {"SUITE": "gpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "benchmarks/paper_gpu.sh", str(faces), str(out), *TINY.split()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    suite = json.loads((out / "bench" / "results.json").read_text())
    assert suite["suites"]["gpu"]["status"] == "skipped"  # on the CPU, with the reason
    results = json.loads((out / "paper" / "results.json").read_text())
    settings = results["settings"]
    assert (settings["depth"], settings["batch_norm"], settings["spectral_norm"]) == (3, True, True)
    assert settings["anchor"] == 0.1 and settings["autocast"] == "auto"
    assert results["images"] == 4 and results["image_shape"] == [3, 32, 32]
    assert "tight" in results  # the equilibrium check ran
    assert "paper preset:" in done.stdout and (out / "paper" / "last.pt").is_file()
