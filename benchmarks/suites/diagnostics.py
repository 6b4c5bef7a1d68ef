"""Suite 8: proposed core fixes, measured against the shipped code and torchdeq.

Where another suite misses a target because of the core library, this suite times a
prototype of the proposed fix (:mod:`benchmarks._prototypes`, and the JFB variant in
:mod:`benchmarks.suites.backward`) against the shipped implementation and, when installed,
torchdeq with the settings of the ``peers`` suite, on the same problems, alternating repeats.
The library itself is not changed by this suite.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import implicitlayers as il

from .._memory import peak_bytes
from .._problems import Counted, Problem
from .._prototypes import SlicedBroyden
from .._report import fmt, mib
from .._timing import CallTimer, paired_ratio
from .._types import SuiteContext, SuiteResult
from ._shared import conv_layer, maybe_degrad
from .backward import JFBWithoutInputGrad
from .peers import _alternate, _theirs
from .solvers import _time_solve

NAME = "diagnostics"
TITLE = "Core diagnostics: proposed fixes measured"


def _has_torchdeq() -> bool:
    try:
        import torchdeq  # noqa: F401
    except ImportError:
        return False
    return True


def _solvers(max_iter: int, tol: float) -> dict[str, list[tuple[str, Any]]]:
    kw: dict[str, Any] = {"max_iter": max_iter, "atol": 0.0, "rtol": tol}
    return {
        "anderson": [("shipped Anderson(m=6)", il.Anderson(history_size=6, **kw))],
        "broyden": [
            (f"shipped Broyden(memory={max_iter})", il.Broyden(memory=max_iter, **kw)),
            ("proposed: filled slots only", SlicedBroyden(memory=max_iter, **kw)),
        ],
    }


def _solve_variants(
    ctx: SuiteContext, suite: SuiteResult, problem: Problem, cfg: dict[str, Any]
) -> None:
    counted = Counted(problem.cell)
    for family, variants in _solvers(cfg["max_iter"], cfg["tol"]).items():
        fns: dict[str, Callable[..., None]] = {}
        evals: dict[str, int] = {}
        timers: dict[str, CallTimer] = {}
        for label, solver in variants:
            timer = CallTimer(counted)
            timers[label] = timer

            def ours(
                solver: il.AbstractSolver = solver,
                label: str = label,
                timers: dict[str, CallTimer] = timers,
                evals: dict[str, int] = evals,
            ) -> None:
                timers[label].reset()
                with torch.no_grad():
                    r = il.fixed_point(timers[label], problem.z0, *problem.inputs, solver=solver)
                evals[label] = r.n_f_evals

            fns[label] = ours
        if cfg["torchdeq"]:
            deq = _theirs(family, cfg["max_iter"], cfg["tol"], "jfb", 1e-5).eval()
            label = "torchdeq " + family

            def theirs(deq: Any = deq, label: str = label, evals: dict[str, int] = evals) -> None:
                counted.reset()
                with torch.no_grad():
                    deq(lambda z: counted(z, *problem.inputs), problem.z0)
                evals[label] = counted.forward_calls

            fns[label] = theirs
        times = _alternate(fns, cfg["repeats"], ctx.device)
        base = times[variants[0][0]]
        for label, fn in fns.items():
            t = statistics.median(times[label])
            memory = peak_bytes(lambda _, fn=fn: fn(), ctx.device)
            suite.add(
                kind="solver_variant",
                problem=problem.name,
                family=family,
                variant=label,
                time_s=t,
                time_samples_s=times[label],
                n_f_evals=evals[label],
                ratio_to_shipped=paired_ratio(times[label], base),
                peak_bytes=memory["peak_bytes"],
            )


def _overhead_variants(
    ctx: SuiteContext, suite: SuiteResult, problem: Problem, cfg: dict[str, Any]
) -> None:
    """The solver-overhead acceptance setting (defaults, rtol 1e-4): shipped vs proposed."""
    kw: dict[str, Any] = {"max_iter": 500, "atol": 0.0, "rtol": 1e-4}
    variants = [
        ("shipped Picard()", il.Picard(**kw)),
        ("shipped Anderson()", il.Anderson(**kw)),
        ("shipped Broyden()", il.Broyden(**kw)),
        ("proposed: Broyden, filled slots only", SlicedBroyden(**kw)),
    ]
    for label, solver in variants:
        stats = _time_solve(ctx, problem, solver, cfg["repeats"])
        suite.add(
            kind="overhead_variant",
            problem=problem.name,
            variant=label,
            n_f_evals=stats["n_f_evals"],
            time_s=stats["time_s"],
            overhead_inline=stats["overhead_inline"],
            overhead_inline_samples=stats["overhead_inline_samples"],
        )


def _jfb_variants(
    ctx: SuiteContext, suite: SuiteResult, problem: Problem, cfg: dict[str, Any]
) -> None:
    solver = il.Anderson(history_size=6, max_iter=cfg["max_iter"], atol=0.0, rtol=cfg["tol"])
    z_star = il.fixed_point(problem.cell, problem.z0, *problem.inputs, solver=solver).z
    weight = torch.randn(z_star.shape, generator=torch.Generator().manual_seed(2)).to(z_star)
    start = il.Picard(max_iter=5, atol=0.0, rtol=1e-5)
    losses: dict[str, Callable[..., Tensor]] = {}
    for label, rule in (("shipped JFB", il.JFB()), ("proposed: no z-grad", JFBWithoutInputGrad())):
        deq = il.DEQ(problem.cell, solver=start, backward=rule)

        def loss(deq: il.DEQ = deq) -> Tensor:
            z, _ = deq(*problem.inputs, z0=z_star)
            return (z * weight).sum()

        losses[label] = loss
    if cfg["torchdeq"]:
        theirs = _theirs("anderson", 5, 1e-5, "jfb", 1e-5).train()

        def loss_theirs() -> Tensor:
            z, _ = theirs(lambda z: problem.cell(z, *problem.inputs), z_star)
            return (z[-1] * weight).sum()

        losses["torchdeq grad=1"] = loss_theirs
    samples: dict[str, list[float]] = {k: [] for k in losses}
    for _ in range(cfg["repeats"] + 1):
        prepared = {k: fn() for k, fn in losses.items()}
        times = _alternate(
            {k: (lambda v=v: v.backward(retain_graph=True)) for k, v in prepared.items()},
            1,
            ctx.device,
        )
        for k in losses:
            samples[k].append(times[k][0])
    base = samples["shipped JFB"][1:]
    for label, values in samples.items():
        t = statistics.median(values[1:])
        suite.add(
            kind="jfb_variant",
            problem=problem.name,
            variant=label,
            backward_time_s=t,
            time_samples_s=values[1:],
            ratio_to_shipped=paired_ratio(values[1:], base),
        )


def run(ctx: SuiteContext) -> SuiteResult:
    """Run the suite."""
    cfg = {
        "tol": 1e-4,
        "max_iter": 100,
        "repeats": ctx.repeats(5, 1),
        "torchdeq": _has_torchdeq(),
    }
    suite = SuiteResult(name=NAME, title=TITLE, config=dict(cfg))
    problems = [conv_layer(ctx)]
    degrad, reason = maybe_degrad(ctx, batch=1 if ctx.quick else 2, size=16 if ctx.quick else 64)
    if degrad is None:
        suite.notes.append(f"DE-GRAD problem skipped: {reason}")
    else:
        problems.append(degrad)
    for problem in ctx.bar(problems, "diagnostics"):
        _solve_variants(ctx, suite, problem, cfg)
        _jfb_variants(ctx, suite, problem, cfg)
        if problem is degrad:
            _overhead_variants(ctx, suite, problem, cfg)
    suite.tables.append(
        (
            f"Forward solve to rtol {cfg['tol']} (no grad), settings of the peers suite",
            ["problem", "solver", "variant", "ms", "f evals", "time / shipped", "peak MiB"],
            [
                [
                    r["problem"],
                    r["family"],
                    r["variant"],
                    fmt(r["time_s"] * 1e3),
                    str(r["n_f_evals"]),
                    fmt(r["ratio_to_shipped"]),
                    mib(r["peak_bytes"]),
                ]
                for r in suite.records
                if r["kind"] == "solver_variant"
            ],
        )
    )
    suite.tables.append(
        (
            "Solver overhead (solvers-suite setting: defaults, rtol 1e-4, f timed inside the "
            "solve)",
            ["problem", "variant", "f evals", "ms", "overhead"],
            [
                [
                    r["problem"],
                    r["variant"],
                    str(r["n_f_evals"]),
                    fmt(r["time_s"] * 1e3),
                    fmt(r["overhead_inline"]),
                ]
                for r in suite.records
                if r["kind"] == "overhead_variant"
            ],
        )
    )
    suite.tables.append(
        (
            "JFB backward (loss.backward() at the fixed point)",
            ["problem", "variant", "ms", "time / shipped"],
            [
                [
                    r["problem"],
                    r["variant"],
                    fmt(r["backward_time_s"] * 1e3),
                    fmt(r["ratio_to_shipped"]),
                ]
                for r in suite.records
                if r["kind"] == "jfb_variant"
            ],
        )
    )
    suite.notes.append((__doc__ or "").split("\n\n", 1)[1].strip())
    suite.notes.append(
        "Causes addressed: (1) Broyden multiplies by every memory slot, filled or not "
        "(memory=100 costs 100 slots from the first step); the prototype slices to the filled "
        "slots. (2) AbstractBackward.attach marks z* as requiring grad for every rule, so JFB's "
        "backward also computes the unused gradient with respect to z; the prototype does not "
        "(for rules with uses_vjp False). Anderson appears without a prototype: its "
        "incremental Gram update is shipped (fb10a18), so its row measures the shipped code "
        "against torchdeq."
    )
    return suite
