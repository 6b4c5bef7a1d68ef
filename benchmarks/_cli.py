"""Command line: ``python -m benchmarks run --suite ... --device ... --out DIR [--quick]``."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ._env import environment, now
from ._report import markdown, write_json
from ._types import SuiteContext, SuiteResult

#: Suite name -> (module under benchmarks.suites, title). Run order is this order.
SUITES: dict[str, tuple[str, str]] = {
    "solvers": ("solvers", "Solvers: f evaluations, time to tolerance, overhead"),
    "freezing": ("freezing", "Per-sample freezing (independent_samples)"),
    "backward": ("backward", "Backward rules: cost in VJPs, memory, gradient accuracy"),
    "adjoint": ("adjoint", "Adjoint solvers: GMRES against fixed-point solvers"),
    "memory": ("memory", "Training memory versus forward depth"),
    "peers": ("peers", "Against torchdeq"),
    "dense": ("dense", "Dense Jacobian inversion versus matrix-free implicit backward"),
    "gpu": ("gpu", "GPU throughput (DE-GRAD 128x128)"),
    "sync": ("sync", "Host synchronisation: check_every and torch.compile"),
    "compose": ("compose", "Transforms and compile: per-sample gradients, forward mode"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run suites and write JSON, Markdown and plots")
    run.add_argument(
        "--suite",
        default="all",
        help="'all' or comma-separated names: " + ", ".join(SUITES),
    )
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--out", required=True, type=Path, help="output folder (created)")
    run.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on the CPU, see RESULTS.md; torch's own "
        "default on CUDA)",
    )
    run.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    sub.add_parser("list", help="list the suites")
    pub = sub.add_parser("publish", help="copy a full run into benchmarks/RESULTS.md")
    pub.add_argument("run_dir", type=Path, help="the --out folder of a full run")
    return parser


def _suite_names(spec: str) -> list[str]:
    if spec == "all":
        return list(SUITES)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suite(s) {', '.join(unknown)}; valid: all, {', '.join(SUITES)}")
    return names


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    return torch.device(spec)


def run_suite(name: str, ctx: SuiteContext) -> SuiteResult:
    """Import and run one suite; an exception becomes a result with status ``"error"``."""
    module_name, title = SUITES[name]
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.suites.{module_name}")
        result: SuiteResult = module.run(ctx)
    except Exception as err:  # one broken suite must not hide the others
        result = SuiteResult(
            name=name,
            title=title,
            status="error",
            reason=f"{type(err).__name__}: {err}\n" + traceback.format_exc(limit=8),
        )
    result.config.setdefault("wall_s", round(time.perf_counter() - start, 2))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (1 when a suite errored)."""
    args = _parser().parse_args(argv)
    if args.command == "publish":
        from ._publish import publish

        print(publish(args.run_dir))
        return 0
    if args.command == "list":
        for name, (_, title) in SUITES.items():
            print(f"{name:10s} {title}")
        return 0
    names = _suite_names(args.suite)
    device = _device(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        # On a shared CPU, OpenMP barriers across threads stall whenever another process holds
        # a core (a 3x3 conv on 2x4x8x8 took 25 ms with 2 threads and 0.04 ms with 1), so
        # single-threaded timings are the stable ones.
        torch.set_num_threads(threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    command = "python -m benchmarks " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    env = environment(device)
    ctx = SuiteContext(device=device, quick=args.quick, out=out, progress=not args.no_progress)
    results: list[SuiteResult] = []
    for name in tqdm(names, desc="suites", disable=args.no_progress, dynamic_ncols=True):
        result = run_suite(name, ctx)
        results.append(result)
        write_json(
            out / f"{name}.json",
            {"environment": env, "command": command, "quick": args.quick, **result.to_json()},
        )
        status = result.status + (f" ({result.reason.splitlines()[0]})" if result.reason else "")
        tqdm.write(f"[{now()}] {name}: {status}", file=sys.stderr)
    write_json(
        out / "results.json",
        {
            "environment": env,
            "command": command,
            "quick": args.quick,
            "finished_at": now(),
            "suites": {r.name: r.to_json() for r in results},
        },
    )
    (out / "report.md").write_text(markdown(env, command, results), encoding="utf-8")
    errors = [r.name for r in results if r.status == "error"]
    if errors:
        print(f"suites with errors: {', '.join(errors)}", file=sys.stderr)
        for result in results:
            if result.status == "error":
                print(f"--- {result.name}\n{result.reason}", file=sys.stderr)
    return 1 if errors else 0
