"""Suite 8: host synchronisation, ``check_every`` and ``torch.compile``.

On an accelerator, every value the driver loop reads on the host (``tolist``, ``item``,
``bool(tensor)``) waits for the queued kernels: the loop cannot run ahead of the device.
``check_every=k`` makes the loop test for its exit only every ``k`` iterations, at the price
of up to ``k - 1`` evaluations of ``f`` after the last sample stopped. This suite measures,
for ``k`` in 1..16:

* host reads per solve, counted by a :class:`~torch.overrides.TorchFunctionMode` that sees
  every ``Tensor.tolist``/``item``/``__bool__``/... call. On the CPU, where a host read is
  free, the loop reads freely; the count is then taken a second time on the code path a GPU
  runs (``fixed_point(..., host_reads=False)`` for ``check_every > 1``; with
  ``check_every=1`` a GPU takes the path with reads too);
* ``f`` evaluations and wall time per solve (CUDA events on a GPU);
* the same solves with ``f`` compiled by ``torch.compile`` (full runs only): compile time,
  and solve time against eager;
* per solver, the tensor operations (top-level ``aten`` operators, counted by
  ``torch.profiler``) and host reads per iteration outside ``f``, on the small MLP cell, for
  the default path and for the chunked one (``host_reads=False``), so that a GPU user can
  predict kernel launches and synchronisations per iteration without a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

import implicitlayers as il

from .._plots import figure, save
from .._problems import Problem
from .._report import fmt
from .._timing import measure
from .._types import SuiteContext, SuiteResult
from ._shared import SOLVER_NAMES, conv_layer, make_solver, maybe_degrad, relative_residual
from .solvers import small_f_problems

NAME = "sync"
TITLE = "Host synchronisation: check_every and torch.compile"

#: Tensor methods whose result must reach the host (each one a synchronisation on CUDA).
HOST_READS = frozenset(
    {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}
)


class HostReadCounter(TorchFunctionMode):
    """Counts calls of tensor methods that move a value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _config(ctx: SuiteContext) -> dict[str, Any]:
    if ctx.quick:
        return {"check_every": [1, 4], "repeats": 1, "degrad_size": 16, "degrad_batch": 2}
    size, batch = (128, 32) if ctx.is_cuda else (64, 4)
    return {
        "check_every": [1, 2, 4, 8, 16],
        "repeats": 5,
        "degrad_size": size,
        "degrad_batch": batch,
        "compile": True,
    }


def _count_reads(
    problem: Problem, solver: il.AbstractSolver, host_reads: bool | None = None
) -> tuple[int, il.SolverResult]:
    """Host reads of one solve; ``host_reads=False`` takes the path a GPU takes, anywhere."""
    counter = HostReadCounter()
    with torch.no_grad(), counter:
        result = il.fixed_point(problem.f, problem.z0, solver=solver, host_reads=host_reads)
    return counter.count, result


def _solve_timing(
    ctx: SuiteContext, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, solver: Any
) -> Any:
    def solve(_: Any) -> None:
        with torch.no_grad():
            il.fixed_point(f, z0, solver=solver)

    return measure(solve, device=ctx.device, repeats=ctx.repeats(5 if ctx.is_cuda else 3))


def run(ctx: SuiteContext) -> SuiteResult:
    """Run the suite."""
    cfg = _config(ctx)
    cfg.update(solvers=["picard", "anderson"], rtol=1e-4, max_iter=200)
    suite = SuiteResult(name=NAME, title=TITLE, config=dict(cfg))
    problems = [conv_layer(ctx)]
    degrad, reason = maybe_degrad(ctx, batch=cfg["degrad_batch"], size=cfg["degrad_size"])
    if degrad is not None:
        problems.append(degrad)
    else:
        suite.notes.append(f"DE-GRAD skipped: {reason}")
    rows = []
    jobs = [(p, s, k) for p in problems for s in cfg["solvers"] for k in cfg["check_every"]]
    for problem, solver_name, k in ctx.bar(jobs, "sync"):
        solver = make_solver(
            solver_name, max_iter=cfg["max_iter"], atol=0.0, rtol=cfg["rtol"], check_every=k
        )
        reads_here, result = _count_reads(problem, solver)
        # The path a GPU runs by default: with reads at check_every=1, chunked above.
        reads_device, device_result = _count_reads(
            problem, solver, host_reads=None if k == 1 else False
        )
        assert device_result.n_f_evals == result.n_f_evals
        timing = _solve_timing(ctx, problem.f, problem.z0, solver)
        record = suite.add(
            kind="check_every",
            problem=problem.name,
            solver=solver_name,
            check_every=k,
            n_f_evals=result.n_f_evals,
            host_reads=reads_here,
            host_reads_accelerator_path=reads_device,
            converged_fraction=float(result.converged.float().mean()),
            relative_residual=relative_residual(problem, result.z),
            **timing.as_dict(),
        )
        base = next(
            r
            for r in suite.records
            if r["kind"] == "check_every"
            and r["problem"] == problem.name
            and r["solver"] == solver_name
            and r["check_every"] == cfg["check_every"][0]
        )
        record["time_vs_every_iteration"] = record["time_s"] / base["time_s"]
        rows.append(
            [
                problem.name,
                solver_name,
                fmt(k),
                fmt(result.n_f_evals),
                fmt(reads_device),
                fmt(reads_here),
                fmt(record["time_s"] * 1e3),
                fmt(record["time_vs_every_iteration"]),
                fmt(record["relative_residual"]),
            ]
        )
    suite.tables.append(
        (
            f"Forward solves to rtol {cfg['rtol']} (atol 0), no autograd, on {ctx.device.type}",
            [
                "problem",
                "solver",
                "check_every",
                "f evals",
                "host reads (accelerator path)",
                f"host reads ({ctx.device.type} path)",
                "time ms",
                "time / check_every=1",
                "max rel. residual",
            ],
            rows,
        )
    )
    if cfg.get("compile"):
        _compiled_rows(ctx, suite, problems[0], cfg)
        _compiled_chunks(ctx, suite)
    _operation_counts(ctx, suite)
    _plot(ctx, suite)
    suite.notes.append(
        "Host reads are the calls of Tensor.tolist/item/__bool__/... made during one solve "
        "(counted with a TorchFunctionMode, so f's own reads would count too; these cells make "
        "none). Each one is a device synchronisation on CUDA. The 'accelerator path' count is "
        "the one a GPU run makes: on the CPU the loop reads statuses on the host every "
        "iteration because it is free there, so the CPU count is higher and its times show "
        "only the cost of the extra f evaluations that check_every > 1 spends after the last "
        "sample stopped. A GPU run of this suite times the synchronisations themselves."
    )
    return suite


def _compiled_rows(
    ctx: SuiteContext, suite: SuiteResult, problem: Problem, cfg: dict[str, Any]
) -> None:
    """Solve with ``f`` compiled by ``torch.compile`` (inductor), against eager."""
    compiled_cell = torch.compile(problem.cell)

    def compiled_f(z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = compiled_cell(z, *problem.inputs)
        return out

    t0 = time.perf_counter()
    with torch.no_grad():
        compiled_f(problem.z0)
    compile_s = time.perf_counter() - t0
    rows = []
    for k in (1, cfg["check_every"][-1]):
        solver = make_solver(
            "anderson", max_iter=cfg["max_iter"], atol=0.0, rtol=cfg["rtol"], check_every=k
        )
        eager = _solve_timing(ctx, problem.f, problem.z0, solver)
        compiled = _solve_timing(ctx, compiled_f, problem.z0, solver)
        record = suite.add(
            kind="compile",
            problem=problem.name,
            solver="anderson",
            check_every=k,
            compile_s=compile_s,
            eager_s=eager.median,
            compiled_s=compiled.median,
            speedup=eager.median / compiled.median,
        )
        rows.append(
            [
                problem.name,
                fmt(k),
                fmt(record["eager_s"] * 1e3),
                fmt(record["compiled_s"] * 1e3),
                fmt(record["speedup"]),
            ]
        )
    suite.tables.append(
        (
            f"Anderson solves with f compiled by torch.compile (inductor; first call "
            f"{compile_s:.1f} s, not included)",
            ["problem", "check_every", "eager ms", "compiled ms", "speedup"],
            rows,
        )
    )


def _compiled_chunks(ctx: SuiteContext, suite: SuiteResult, iterations: int = 30) -> None:
    """The whole solve compiled (``host_reads=False``, one chunk of ``iterations``: f, the
    step and the bookkeeping in one graph) against the eager solve and a raw loop of f, on
    the small-f MLP cell, where the bookkeeping is most of an iteration."""
    problem = small_f_problems(ctx)[0]
    options = {"max_iter": iterations, "atol": 0.0, "rtol": 1e-30, "divergence_ratio": None}
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, 64)
    rows = []
    try:
        for name in SOLVER_NAMES:
            eager_solver = make_solver(name, **options)
            chunked = make_solver(name, **options, check_every=iterations, on_unconverged="ignore")

            def solve(solver: il.AbstractSolver) -> torch.Tensor:
                return il.fixed_point(problem.cell, problem.z0, *problem.inputs, solver=solver).z

            def chunk(x: torch.Tensor, solver: il.AbstractSolver = chunked) -> torch.Tensor:
                return il.fixed_point(
                    problem.cell, problem.z0, x, solver=solver, host_reads=False
                ).z

            def raw(_: Any) -> None:
                z = problem.z0
                for _ in range(iterations):
                    z = problem.f(z)

            torch._dynamo.reset()
            compiled = torch.compile(chunk)
            with torch.no_grad():
                t0 = time.perf_counter()
                z_compiled = compiled(*problem.inputs)
                compile_s = time.perf_counter() - t0
                gap = float((z_compiled - solve(eager_solver)).abs().max())
                runs: dict[str, Callable[[Any], Any]] = {
                    "raw": raw,
                    "eager": lambda _, s=eager_solver: solve(s),
                    "compiled": lambda _, c=compiled: c(*problem.inputs),
                }
                timed = {k: measure(run, device=ctx.device, repeats=21) for k, run in runs.items()}
                times = {k: timing.median for k, timing in timed.items()}
            outside = {k: (times[k] - times["raw"]) / iterations for k in ("eager", "compiled")}
            suite.add(
                kind="compiled_chunk",
                problem=problem.name,
                solver=name,
                iterations=iterations,
                compile_s=compile_s,
                eager_s=times["eager"],
                compiled_s=times["compiled"],
                raw_s=times["raw"],
                outside_f_eager_s=outside["eager"],
                outside_f_compiled_s=outside["compiled"],
                max_abs_difference=gap,
            )
            rows.append(
                [name]
                + [fmt(outside[k] * 1e6) for k in ("eager", "compiled")]
                + [fmt(times[k] * 1e3) for k in ("eager", "compiled", "raw")]
                + [fmt(compile_s), fmt(gap)]
            )
    finally:
        torch._dynamo.reset()
        torch._dynamo.config.cache_size_limit = limit
    suite.tables.append(
        (
            f"The whole solve compiled (host_reads=False, one chunk of {iterations} iterations) "
            f"against eager, {problem.name} cell, tolerance never met",
            [
                "solver",
                "us per iteration beyond the loop of f, eager",
                "the same, compiled",
                "eager ms",
                "compiled ms",
                "eager loop of f ms",
                "compile s",
                "max abs(z compiled - z eager)",
            ],
            rows,
        )
    )
    suite.notes.append(
        "Compiled solve: the time per iteration beyond a hand-written eager loop of the same "
        "number of f calls; inductor compiles f too, so a figure below 0 means the compiled "
        "solve beats the eager loop of f alone. The compiled and eager iterates differ by "
        "rounding (float32; Broyden's secant updates amplify it; in float64 they agree to 1e-15)."
    )


def _plot(ctx: SuiteContext, suite: SuiteResult) -> None:
    fig, axes = figure(1)
    records = [r for r in suite.records if r["kind"] == "check_every"]
    for key in sorted({(r["problem"], r["solver"]) for r in records}):
        mine = [r for r in records if (r["problem"], r["solver"]) == key]
        axes[0].plot(
            [r["check_every"] for r in mine],
            [r["host_reads_accelerator_path"] for r in mine],
            "o-",
            label=f"{key[0]}, {key[1]}",
        )
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("check_every")
    axes[0].set_ylabel("host reads per solve (accelerator path)")
    axes[0].legend(fontsize=7)
    suite.plots.append(save(fig, ctx.out, "sync_host_reads.png"))


def _top_level_ops(fn: Callable[[], Any]) -> int:
    """Top-level ``aten`` operators ``fn`` runs (each a kernel launch on a GPU)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def _counts(problem: Problem, solver: il.AbstractSolver, host_reads: bool | None) -> list[int]:
    """Operators, host reads and f evaluations of one solve without autograd."""
    counter = HostReadCounter()
    with torch.no_grad(), counter:
        result = il.fixed_point(problem.f, problem.z0, solver=solver, host_reads=host_reads)
    with torch.no_grad():
        ops = _top_level_ops(
            lambda: il.fixed_point(problem.f, problem.z0, solver=solver, host_reads=host_reads)
        )
    return [ops, counter.count, result.n_f_evals]


def _operation_counts(ctx: SuiteContext, suite: SuiteResult) -> None:
    """Operators and host reads per iteration outside f, from two solves of n and 2n steps."""
    problem = small_f_problems(ctx)[0]
    with torch.no_grad():
        f_ops = _top_level_ops(lambda: problem.f(problem.z0))
    n = 8 if ctx.quick else 16
    paths: list[tuple[str, bool | None, int]] = [
        ("default, check_every=1 (any device)", None, 1),
        ("chunked (host_reads=False), check_every=1", False, 1),
        ("chunked, check_every=8 (a GPU's default at 8)", False, 8),
    ]
    rows = []
    for solver_name in SOLVER_NAMES:
        for label, host_reads, k in paths:
            counts = []
            for steps in (n, 2 * n):
                solver = make_solver(
                    solver_name,
                    max_iter=steps,
                    atol=0.0,
                    rtol=1e-30,
                    divergence_ratio=None,
                    check_every=k,
                )
                counts.append(_counts(problem, solver, host_reads))
            (ops1, reads1, evals1), (ops2, reads2, evals2) = counts
            ops = (ops2 - ops1 - (evals2 - evals1) * f_ops) / n
            reads = (reads2 - reads1) / n
            suite.add(
                kind="operations",
                problem=problem.name,
                solver=solver_name,
                path=label,
                check_every=k,
                ops_per_iteration=ops,
                host_reads_per_iteration=reads,
                f_ops=f_ops,
                ops_per_solve_fixed=ops1 - evals1 * f_ops - n * ops,
                host_reads_per_solve_fixed=reads1 - n * reads,
            )
            rows.append([solver_name, label, fmt(ops), fmt(reads)])
    suite.tables.append(
        (
            f"Tensor operations and host reads per iteration outside f ({problem.name} cell, "
            f"{f_ops} operators per call of f; every residual improves, tolerance never met)",
            ["solver", "path", "aten operators", "host reads"],
            rows,
        )
    )
    suite.notes.append(
        "Operators are the top-level aten operators torch.profiler records (on a GPU each is "
        "at least one kernel launch; views such as unsqueeze count too); host reads are the "
        "Tensor.tolist/item/__bool__ calls. Both are the difference between solves of n and 2n "
        "iterations, minus f's own operators, divided by n, so the fixed cost of a solve "
        "(validation, the final status) is left out and recorded separately."
    )
