"""Suite 8: host synchronisation, ``check_every`` and ``torch.compile``.

On an accelerator, every value the driver loop reads on the host (``tolist``, ``item``,
``bool(tensor)``) waits for the queued kernels: the loop cannot run ahead of the device.
``check_every=k`` makes the loop test for its exit only every ``k`` iterations, at the price
of up to ``k - 1`` evaluations of ``f`` after the last sample stopped. This suite measures,
for ``k`` in 1..16:

* host reads per solve, counted by a :class:`~torch.overrides.TorchFunctionMode` that sees
  every ``Tensor.tolist``/``item``/``__bool__``/... call. On the CPU, where a host read is
  free, the loop reads freely; the count is then taken a second time with the accelerator
  code path forced, which is what a GPU runs;
* ``f`` evaluations and wall time per solve (CUDA events on a GPU);
* the same solves with ``f`` compiled by ``torch.compile`` (full runs only): compile time,
  and solve time against eager.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import implicitlayers as il
from implicitlayers.solvers import _loop

from .._plots import figure, save
from .._problems import Problem
from .._report import fmt
from .._timing import measure
from .._types import SuiteContext, SuiteResult
from ._shared import conv_layer, make_solver, maybe_degrad, relative_residual

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


@contextlib.contextmanager
def accelerator_path() -> Iterator[None]:
    """Make the loop take the code path it takes on CUDA (no free host reads) on any device."""
    saved = _loop._HOST_FREE
    setattr(_loop, "_HOST_FREE", ())  # noqa: B010 (a module constant, patched for a moment)
    try:
        yield
    finally:
        setattr(_loop, "_HOST_FREE", saved)  # noqa: B010


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


def _count_reads(problem: Problem, solver: il.AbstractSolver) -> tuple[int, il.SolverResult]:
    counter = HostReadCounter()
    with torch.no_grad(), counter:
        result = il.fixed_point(problem.f, problem.z0, solver=solver)
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
        with accelerator_path():
            reads_device, device_result = _count_reads(problem, solver)
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
