"""Every solve of the benchmark problems, this tree against another checkout, to the last bit.

``python benchmarks/results_ab.py --out FILE`` solves the benchmark problems (the small float64
maps, the MLP cell improving and stagnating, the graph layer, the tanh conv layer and the
DE-GRAD operator) with every solver, at three tolerances, on the three paths of the driver
loop (host reads, sync-free chunks of 4, running rows), and saves every solution, status,
step count, residual and evaluation count. ``--compare OLD NEW`` reads two such files and
prints what differs. Run the first in two checkouts (``git worktree add DIR <commit>``; ``cd
DIR && python /path/to/this/benchmarks/results_ab.py --out old.pt``) to show that a change
to the core left every result unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.getcwd())  # the checkout being measured, not this file's

import implicitlayers as il
from benchmarks import _problems as problems

PATHS = {"host": {}, "chunk4": {"host_reads": False}, "compact": {"independent_samples": True}}


def solve_all() -> dict[tuple[Any, ...], Any]:
    """Every problem x solver x tolerance x path: its outputs, or the error it raised."""
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    cases = [
        *problems.small_map_problems(),
        problems.mlp_problem(device=cpu),
        problems.mlp_problem(contraction=0.5, device=cpu),
        problems.graph_problem(device=cpu),
        problems.tanh_conv_problem(batch=4, channels=8, size=16, device=cpu),
    ]
    if problems.imaging_available() is None:
        cases.append(problems.degrad_problem(batch=2, size=32, device=cpu))
    out: dict[tuple[Any, ...], Any] = {}
    for p in cases:
        for name, cls in (
            ("picard", il.Picard),
            ("anderson", il.Anderson),
            ("broyden", il.Broyden),
        ):
            for rtol in (1e-2, 1e-4, 1e-6):
                for path, options in PATHS.items():
                    solver = cls(
                        max_iter=200,
                        rtol=rtol,
                        check_every=4 if path == "chunk4" else 1,
                        on_unconverged="ignore",
                        on_nonfinite="ignore",
                    )
                    key = (p.name, name, rtol, path)
                    try:
                        r = il.fixed_point(p.cell, p.z0, *p.inputs, solver=solver, **options)
                    except Exception as err:  # recorded: a path that raises must raise in both
                        out[key] = repr(err)[:120]
                        continue
                    out[key] = {
                        "z": r.z,
                        "status": r.status,
                        "n_steps": r.n_steps,
                        "residual": r.residual,
                        "n_f_evals": r.n_f_evals,
                    }
    return out


def compare(old_path: str, new_path: str) -> None:
    """Print the cases whose outputs differ, and the evaluation counts that changed."""
    old = torch.load(old_path, weights_only=False)
    new = torch.load(new_path, weights_only=False)
    identical, evals = 0, {}
    for key, a in old.items():
        b = new.get(key)
        if isinstance(a, str) or isinstance(b, str):
            if a != b:
                print("differs:", key, a, b)
            continue
        fields = ("z", "status", "n_steps", "residual")
        same = all(torch.equal(a[f], b[f]) for f in fields)
        identical += same
        if not same:
            print("differs:", key, [f for f in fields if not torch.equal(a[f], b[f])])
        change = b["n_f_evals"] - a["n_f_evals"]
        evals[(key[3], change)] = evals.get((key[3], change), 0) + 1
    print(
        f"identical to the last bit (solution, status, n_steps, residual): {identical}/{len(old)}"
    )
    print("n_f_evals, new minus old, by path:", evals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="save this checkout's results here")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.out:
        torch.save(solve_all(), args.out)
    else:
        parser.error("pass --out FILE or --compare OLD NEW")


if __name__ == "__main__":
    main()
