"""Suite 4: memory of a training step versus forward depth, DEQ against unrolled backprop.

A DEQ solves without autograd and attaches one application of ``f``, so its training memory
should not depend on how many forward iterations ran; backpropagating through the unrolled
iterations stores every iteration's activations. The DEQ is forced to run exactly N
iterations (``atol=1e-30, rtol=0``: never met in floating point), and compared with
``z = f(z)`` unrolled N times under autograd.

Two figures per step: bytes autograd saves for backward (``saved_tensors_hooks``: exact and
device-independent) and the allocator's peak over the whole step (forward + backward).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import Tensor

import implicitlayers as il

from .._memory import SavedTensors, peak_bytes
from .._plots import figure, save
from .._problems import Problem
from .._report import fmt, mib
from .._types import Acceptance, SuiteContext, SuiteResult
from ._shared import conv_layer, maybe_degrad, residual_block

NAME = "memory"
TITLE = "Training memory versus forward depth"


def _deq_step(problem: Problem, solver: il.AbstractSolver, weight: Tensor) -> il.SolverResult:
    deq = il.DEQ(problem.cell, solver=solver, backward=il.JFB())
    z, result = deq(*problem.inputs, z0=problem.z0)
    (z * weight).sum().backward()
    return result


def _unrolled_step(problem: Problem, depth: int, weight: Tensor) -> None:
    z = problem.z0
    for _ in range(depth):
        z = problem.cell(z, *problem.inputs)
    (z * weight).sum().backward()


def _step(
    problem: Problem,
    method: str,
    depth: int,
    weight: Tensor,
    info: dict[str, Any],
    _: Any = None,
) -> None:
    """One training step of ``method`` ("DEQ <solver>" or "unrolled") at ``depth``."""
    problem.cell.zero_grad(set_to_none=True)
    if method == "unrolled":
        _unrolled_step(problem, depth, weight)
    else:
        result = _deq_step(problem, _forced(method.split()[1], depth), weight)
        info["n_f_evals"] = result.n_f_evals


def _forced(solver_name: str, depth: int) -> il.AbstractSolver:
    options: dict[str, Any] = {"max_iter": depth, "atol": 1e-30, "rtol": 0.0}
    if solver_name == "picard":
        return il.Picard(**options)
    return il.Anderson(**options)


def run(ctx: SuiteContext) -> SuiteResult:
    """Run the suite."""
    depths = [10, 25, 50] if ctx.quick else [10, 25, 50, 100, 200]
    suite = SuiteResult(name=NAME, title=TITLE, config={"depths": depths})
    # The one-conv layer saves one state per application (the hardest case for the unrolled
    # ratio); the residual block is the typical DEQ cell of the literature.
    problems = [conv_layer(ctx), residual_block(ctx)]
    degrad, reason = maybe_degrad(ctx, batch=1, size=16 if ctx.quick else 64)
    if degrad is None:
        suite.notes.append(f"DE-GRAD problem skipped: {reason}")
    else:
        problems.append(degrad)
    methods = ["DEQ anderson", "DEQ picard", "unrolled"]
    # --quick stops the unrolled baseline at 50 iterations (the depth of its acceptance figure).
    jobs = [
        (p, m, d)
        for p in problems
        for m in methods
        for d in depths
        if not (ctx.quick and m == "unrolled" and d > 50)
    ]
    for problem, method, depth in ctx.bar(jobs, "memory"):
        weight = torch.ones_like(problem.z0)
        params = list(problem.cell.parameters())
        info: dict[str, Any] = {}
        step = functools.partial(_step, problem, method, depth, weight, info)
        with SavedTensors(exclude=params) as saved:
            t0 = time.perf_counter()
            step()
            if ctx.is_cuda:
                torch.cuda.synchronize(ctx.device)
            elapsed = time.perf_counter() - t0
        memory = peak_bytes(step, ctx.device)
        suite.add(
            kind="memory",
            problem=problem.name,
            **problem.info,
            method=method,
            depth=depth,
            forward_f_evals=info.get("n_f_evals", depth),
            saved_bytes=saved.nbytes,
            state_bytes=problem.z0.element_size() * problem.z0.numel(),
            step_time_s=elapsed,
            **memory,
        )
    _summarise(ctx, suite, problems, methods, depths)
    return suite


def _get(suite: SuiteResult, problem: str, method: str, depth: int) -> dict[str, Any]:
    return next(
        r
        for r in suite.records
        if r["problem"] == problem and r["method"] == method and r["depth"] == depth
    )


def _summarise(
    ctx: SuiteContext,
    suite: SuiteResult,
    problems: list[Problem],
    methods: list[str],
    depths: list[int],
) -> None:
    rows = [
        [
            r["problem"],
            r["method"],
            str(r["depth"]),
            str(r["forward_f_evals"]),
            mib(r["saved_bytes"]),
            mib(r["peak_bytes"]),
            fmt(r["peak_bytes"] / r["state_bytes"]) if r["peak_bytes"] is not None else "n/a",
            mib(r.get("rss_peak_bytes")),
            fmt(r["step_time_s"]),
        ]
        for r in suite.records
    ]
    suite.tables.append(
        (
            "One training step (forward + backward) per forward depth",
            [
                "problem",
                "method",
                "depth",
                "f evals",
                "autograd-saved MiB",
                "peak MiB",
                "peak / state",
                "RSS peak MiB",
                "step s",
            ],
            rows,
        )
    )
    suite.notes.append(
        "DEQ: JFB backward, solver forced to run `depth` iterations (atol=1e-30, rtol=0). "
        "Unrolled: z = f(z) `depth` times under autograd. Saved = bytes of distinct storages "
        "autograd saved for backward, parameters excluded (saved_tensors_hooks). Peak = "
        + (
            "CUDA max_memory_allocated"
            if ctx.is_cuda
            else "CPU allocator peak from "
            "torch.profiler memory events; RSS peak = growth of the process's peak resident set"
        )
        + " over the whole step; 'peak / state' is that peak in units of one batch state. The "
        "DEQ's peak includes the solver's own buffers, which do not grow with depth: Anderson "
        "keeps 2 x history_size = 10 states of history, plus the iterate, the best iterate, "
        "f(z) and the next iterate (14 states in all on the one-conv layer), Picard only the "
        "last three (about 4, and 5 during the backward). Unrolling saves about one state per "
        "iteration on the one-conv layer (tanh's output; the convolution's input is the "
        "previous one), so its unrolled/Anderson ratio at 50 iterations is bounded by about "
        "54 / 14 = 3.9 by design, whatever the bookkeeping; a cell that saves several states "
        "per application (the residual block, DE-GRAD) clears 10x with either solver. 'step s' "
        "is a single run, not a speed benchmark: the unrolled baseline's backward slows "
        "sharply from about 100 iterations because its gradient underflows into float32 "
        "denormals (torch.set_flush_denormal(True) removes the slowdown)."
    )
    lo, hi = min(depths), max(depths)
    mid = 50 if 50 in depths else sorted(depths)[len(depths) // 2]
    for problem in problems:
        for method in ("DEQ anderson", "DEQ picard"):
            a, b = _get(suite, problem.name, method, lo), _get(suite, problem.name, method, hi)
            growth = b["peak_bytes"] / a["peak_bytes"] - 1
            suite.acceptance.append(
                Acceptance(
                    f"deq_memory_flat_{method.split()[1]}_{problem.info['family']}",
                    f"{problem.name}, {method}: peak at {hi} iterations vs {lo}, relative growth",
                    growth,
                    "<= 0.10",
                    growth <= 0.10,
                    f"peak {mib(a['peak_bytes'])} -> {mib(b['peak_bytes'])} MiB; saved "
                    f"{mib(a['saved_bytes'])} -> {mib(b['saved_bytes'])} MiB",
                )
            )
            u, d = (
                _get(suite, problem.name, "unrolled", mid),
                _get(suite, problem.name, method, mid),
            )
            ratio = u["peak_bytes"] / d["peak_bytes"]
            suite.acceptance.append(
                Acceptance(
                    f"unrolled_vs_deq_{method.split()[1]}_{problem.info['family']}",
                    f"{problem.name}: unrolled peak / {method} peak at {mid} iterations",
                    ratio,
                    ">= 10",
                    ratio >= 10,
                    f"autograd-saved ratio {fmt(u['saved_bytes'] / max(d['saved_bytes'], 1))}",
                )
            )
    fig, axes = figure(2 * len(problems), width=4.2)
    for i, problem in enumerate(problems):
        for method in methods:
            recs = [
                r for r in suite.records if r["problem"] == problem.name and r["method"] == method
            ]
            for ax, key in ((axes[2 * i], "saved_bytes"), (axes[2 * i + 1], "peak_bytes")):
                ax.plot(
                    [r["depth"] for r in recs], [r[key] / 2**20 for r in recs], "o-", label=method
                )
        for ax, label in ((axes[2 * i], "autograd-saved MiB"), (axes[2 * i + 1], "peak MiB")):
            ax.set_xlabel("forward iterations")
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.set_title(problem.name, fontsize=9)
            ax.legend(fontsize=8)
    suite.plots.append(save(fig, ctx.out, "memory_vs_depth.png"))
