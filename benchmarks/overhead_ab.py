"""Time outside f per iteration: this tree against another checkout, in one process.

``python benchmarks/overhead_ab.py --before DIR`` imports the ``implicitlayers`` package of the
checkout ``DIR`` (e.g. ``git worktree add DIR <commit>``) under another name beside this one,
then times both trees' solves of the small-f MLP cell alternately, repeat by repeat with the
order flipped every repeat, against a hand-written loop of f: before/after figures that a
shared machine's slow moments hit alike. The package imports itself relatively, which is what
lets a copy load under another name.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import implicitlayers as il  # noqa: E402
from benchmarks._problems import mlp_problem  # noqa: E402

SOLVERS = ("Picard", "Anderson", "Broyden")


def load_copy(checkout: Path, name: str = "implicitlayers_before") -> ModuleType:
    """The ``implicitlayers`` package of ``checkout``, imported as ``name``."""
    source = checkout / "implicitlayers"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"--before {checkout}: no implicitlayers/__init__.py there")
    folder = Path(tempfile.mkdtemp(prefix="overhead-ab-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    shutil.copytree(source, folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=81)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    before = load_copy(args.before)
    problem = mlp_problem(device=torch.device("cpu"))
    options: dict[str, Any] = {
        "max_iter": args.iterations,
        "atol": 0.0,
        "rtol": 1e-30,
        "divergence_ratio": None,
    }

    def raw() -> None:
        z = problem.z0
        for _ in range(args.iterations):
            z = problem.f(z)

    runs: dict[str, Any] = {"raw": raw}
    for tree, package in (("before", before), ("now", il)):
        for name in SOLVERS:
            solver = getattr(package, name)(**options)
            runs[f"{name} {tree}"] = lambda p=package, s=solver: p.fixed_point(
                problem.cell, problem.z0, *problem.inputs, solver=s
            )
    times: dict[str, list[float]] = {key: [] for key in runs}
    order = list(runs)
    with torch.no_grad():
        for run in runs.values():
            run()
        for i in range(args.repeats):
            for key in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                runs[key]()
                times[key].append(time.perf_counter() - t0)
    per_f = statistics.median(times["raw"]) / args.iterations
    print(f"one call of f: {per_f * 1e6:.1f} us; time outside f per iteration (median, quartiles):")
    for key in order[1:]:
        outside = [(t - r) / args.iterations for t, r in zip(times[key], times["raw"], strict=True)]
        q1, median, q3 = statistics.quantiles(outside, n=4)
        print(f"  {key:16s} {median * 1e6:7.1f} us ({q1 * 1e6:.0f} to {q3 * 1e6:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
