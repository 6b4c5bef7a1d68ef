r"""Suite 1: Picard, Anderson and Broyden on the DE-GRAD operator and a standard DEQ layer.

For every problem, solver and relative tolerance: the number of ``f`` evaluations, the wall
time of the solve, and the solver's own overhead

.. math::

    \text{overhead} = \frac{t_\text{solve}}{n_f \, t_f},

measured two ways: *inline* (``f`` timed inside the same solve, so both terms come from the
same run: the primary figure on a shared CPU) and *isolated* (``t_f`` timed on its own). Also
the residual-versus-iteration traces (``trace=True``).

Two more measurements, for DEQs whose ``f`` is small (where the bookkeeping, not ``f``,
decides the speed):

* time outside ``f`` per iteration on small-``f`` problems (an MLP cell, a sparse graph
  convolution), ``max_iter`` iterations with a tolerance never met, against a hand-written
  Picard loop timed in the same run, alternated repeat by repeat;
* ``f`` evaluations on a set of small float64 maps at ``rtol=1e-10``, several of which Picard
  solves in 5 to 12 evaluations, where Anderson must not cost more than Picard.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

import implicitlayers as il

from .._plots import figure, save
from .._problems import Problem, graph_problem, mlp_problem, small_map_problems
from .._report import fmt
from .._timing import CallTimer, measure, synchronize
from .._types import Acceptance, SuiteContext, SuiteResult
from ._shared import SOLVER_NAMES, conv_layer, make_solver, maybe_degrad

NAME = "solvers"
TITLE = "Solvers: f evaluations, time to tolerance, overhead"
ACCEPTANCE_SIZE = 64
ACCEPTANCE_RTOL = 1e-4
#: Time outside f per iteration on the MLP cell, in microseconds (the issue's CPU targets).
OVERHEAD_TARGET_US = {"picard": 30.0, "anderson": 120.0, "broyden": 120.0}


def _config(ctx: SuiteContext) -> dict[str, Any]:
    if ctx.quick:
        return {
            "rtols": [1e-2, 1e-4],
            "degrad_sizes": [16],
            "degrad_batch": 1,
            "full_sweep_sizes": [16],
            "max_iter": 200,
            "repeats": 1,
            "trace_rtol": 1e-4,
        }
    return {
        "rtols": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6],
        "degrad_sizes": [32, 64, 128],
        "degrad_batch": 2,
        "full_sweep_sizes": [32, 64, 128],
        "max_iter": 500,
        "repeats": 3,
        "trace_rtol": 1e-6,
    }


def _time_solve(
    ctx: SuiteContext, problem: Problem, solver: il.AbstractSolver, repeats: int
) -> dict[str, Any]:
    """Solve ``repeats`` times after one warm-up; time the solve and ``f`` inside it."""
    timer = CallTimer(problem.cell)
    runs: list[tuple[float, float, int]] = []
    result = None
    for i in range(repeats + 1):
        timer.reset()
        t0 = time.perf_counter()
        result = il.fixed_point(timer, problem.z0, *problem.inputs, solver=solver)
        synchronize(ctx.device)
        elapsed = time.perf_counter() - t0
        if i > 0:  # the first call is the warm-up
            runs.append((elapsed, timer.seconds, result.n_f_evals))
    assert result is not None
    times = [r[0] for r in runs]
    # On a GPU, f returns before its kernels finish, so only the isolated figure is valid.
    inline = [r[0] / r[1] for r in runs] if not ctx.is_cuda else [float("nan")]
    return {
        "n_f_evals": result.n_f_evals,
        "max_n_steps": int(result.n_steps.max()),
        "converged_fraction": float(result.converged.float().mean()),
        "max_residual": float(result.residual.max()),
        "statuses": [s.name for s in result.statuses()],
        "time_s": statistics.median(times),
        "time_samples_s": times,
        "f_time_in_solve_s": statistics.median(r[1] for r in runs),
        "overhead_inline": statistics.median(inline),
        "overhead_inline_samples": inline,
    }


def _trace(problem: Problem, solver: il.AbstractSolver) -> list[float]:
    """Median over the batch of residual / initial residual, per iteration."""
    result = il.fixed_point(problem.cell, problem.z0, *problem.inputs, solver=solver)
    assert result.trace is not None
    trace = result.trace / result.trace[0].clamp_min(1e-30)
    return [float(v) for v in trace.median(dim=1).values]


def _problems(ctx: SuiteContext, cfg: dict[str, Any], suite: SuiteResult) -> list[Problem]:
    problems = [conv_layer(ctx)]
    for size in cfg["degrad_sizes"]:
        problem, reason = maybe_degrad(ctx, batch=cfg["degrad_batch"], size=size)
        if problem is None:
            suite.notes.append(f"DE-GRAD problems skipped: {reason}")
            break
        problems.append(problem)
    return problems


def run(ctx: SuiteContext) -> SuiteResult:
    """Run the suite."""
    cfg = _config(ctx)
    suite = SuiteResult(name=NAME, title=TITLE, config=dict(cfg))
    problems = _problems(ctx, cfg, suite)
    traces: dict[str, dict[str, list[float]]] = {}
    jobs = []
    for problem in problems:
        size = problem.info.get("size")
        full = problem.info["family"] != "degrad" or size in cfg["full_sweep_sizes"]
        rtols = cfg["rtols"] if full else [ACCEPTANCE_RTOL]
        jobs += [(problem, s, rtol) for s in SOLVER_NAMES for rtol in rtols]
    seen: set[str] = set()
    for problem, solver_name, rtol in ctx.bar(jobs, "solvers"):
        # f is timed alone right before each solve, so the isolated overhead compares
        # measurements taken moments apart on a shared machine.
        with torch.no_grad():
            timing = measure(lambda _, p=problem: p.f(p.z0), device=ctx.device, repeats=5, warmup=1)
        if problem.name not in seen:
            seen.add(problem.name)
            suite.add(kind="f_eval", problem=problem.name, **problem.info, **timing.as_dict())
        solver = make_solver(solver_name, max_iter=cfg["max_iter"], atol=0.0, rtol=rtol)
        stats = _time_solve(ctx, problem, solver, cfg["repeats"])
        stats["overhead_isolated"] = stats["time_s"] / (stats["n_f_evals"] * timing.median)
        suite.add(
            kind="solve",
            problem=problem.name,
            **problem.info,
            solver=solver_name,
            solver_repr=repr(solver),
            rtol=rtol,
            t_f_isolated_s=timing.median,
            **stats,
        )
    for problem in ctx.bar(problems, "solver traces"):
        traces[problem.name] = {}
        for solver_name in SOLVER_NAMES:
            solver = make_solver(
                solver_name, max_iter=cfg["max_iter"], atol=0.0, rtol=cfg["trace_rtol"], trace=True
            )
            traces[problem.name][solver_name] = _trace(problem, solver)
            suite.add(
                kind="trace",
                problem=problem.name,
                solver=solver_name,
                rtol=cfg["trace_rtol"],
                relative_residual=traces[problem.name][solver_name],
            )
    _summarise(ctx, suite, problems, traces)
    _traffic_floor(ctx, suite, problems[0])
    _small_f_overhead(ctx, suite)
    _small_maps(suite)
    return suite


#: Per solver: the history slots its default reads per step and how many times it reads them
#: (Anderson: one product with the residuals and one mix of the iterates; Broyden, at full
#: memory: two products and two mixes), besides the residual test every solver makes.
HISTORY_READS = {"picard": (0, 0), "anderson": (5, 1), "broyden": (10, 2)}


def _traffic_floor(ctx: SuiteContext, suite: SuiteResult, problem: Problem) -> None:
    r"""The inline overhead no implementation of each algorithm can beat on ``problem``.

    Times, in this run, only the memory traffic the algorithm must do per iteration: the
    residual test :math:`\|f(z) - z\|` and :math:`\|f(z)\|`, and the history products
    and mixes (batched matrix products over state-sized slots), on buffers that stay in
    cache between repeats (so a lower bound), then :math:`1 + t_\text{traffic} / t_f`.
    """
    with torch.no_grad():
        z = problem.z0.flatten(1)
        fz = problem.f(problem.z0).flatten(1)
        f_time = measure(lambda _: problem.f(problem.z0), device=ctx.device, repeats=5).median
        rows = []
        for name in SOLVER_NAMES:
            slots, passes = HISTORY_READS[name]
            W = torch.randn(z.shape[0], max(slots, 1), z.shape[1], device=z.device)
            c = torch.randn(z.shape[0], max(slots, 1), device=z.device)

            def traffic(_: Any, W: torch.Tensor = W, c: torch.Tensor = c, passes: int = passes):
                torch.linalg.vector_norm(fz - z, dim=1), torch.linalg.vector_norm(fz, dim=1)
                for _ in range(passes):
                    torch.bmm(fz[:, None, :], W.transpose(1, 2))
                    torch.bmm(c[:, None, :], W)

            t = measure(traffic, device=ctx.device, repeats=9).median
            floor = 1.0 + t / f_time
            measured = [
                r["overhead_inline"]
                for r in suite.records
                if r["kind"] == "solve" and r["problem"] == problem.name and r["solver"] == name
            ]
            worst = max(measured) if measured else None
            suite.add(
                kind="traffic_floor",
                problem=problem.name,
                solver=name,
                history_slots=slots,
                history_passes=passes,
                traffic_s=t,
                f_s=f_time,
                floor_inline=floor,
                measured_inline_max=worst,
            )
            rows.append([name, f"{slots} x {passes * 2}", fmt(t * 1e6), fmt(floor), fmt(worst)])
            suite.acceptance.append(
                Acceptance(
                    f"inline_overhead_conv_{name}",
                    f"inline overhead on the {problem.name} layer, {name}, worst tolerance",
                    worst,
                    "<= 1.10",
                    None if worst is None else worst <= 1.10,
                    f"floor {fmt(floor)}: the memory traffic of the algorithm alone, in cache",
                )
            )
    suite.tables.append(
        (
            f"The inline overhead no implementation can beat on the {problem.name} layer: the "
            f"memory traffic each algorithm must do per iteration, timed in cache, against f "
            f"({fmt(f_time * 1e3)} ms)",
            ["solver", "history slots x reads", "us per iteration", "floor", "measured (worst)"],
            rows,
        )
    )


def small_f_problems(ctx: SuiteContext) -> list[Problem]:
    """The MLP cell (batch 64, width 64) and the graph layer (batch 8, 256 nodes x 16)."""
    if ctx.quick:
        return [
            mlp_problem(batch=8, width=16, device=ctx.device),
            graph_problem(batch=2, nodes=32, features=4, extra_edges=32, device=ctx.device),
        ]
    return [mlp_problem(device=ctx.device), graph_problem(device=ctx.device)]


def stagnating_problem(ctx: SuiteContext) -> Problem:
    """The MLP cell contracting by 0.5: its float32 residual stalls near round-off after about
    25 iterations, so on a budget of 100 most iterations improve no sample's best."""
    width, batch = (16, 8) if ctx.quick else (64, 64)
    problem = mlp_problem(batch=batch, width=width, contraction=0.5, device=ctx.device)
    problem.name = f"MLP {width}, contraction 0.5 (stagnating)"
    problem.info["family"] = "mlp-stagnating"
    return problem


def _raw_loop(problem: Problem, iterations: int, device: torch.device) -> Any:
    """A hand-written Picard loop: ``iterations`` calls of f and nothing else."""

    def run() -> int:
        with torch.no_grad():
            z = problem.z0
            for _ in range(iterations):
                z = problem.f(z)
        synchronize(device)
        return iterations

    return run


def _solve(problem: Problem, solver: il.AbstractSolver, device: torch.device) -> Any:
    """One solve of ``problem``; returns its f evaluations."""

    def run() -> int:
        with torch.no_grad():
            result = il.fixed_point(problem.cell, problem.z0, *problem.inputs, solver=solver)
        synchronize(device)
        return result.n_f_evals

    return run


def _small_f_overhead(ctx: SuiteContext, suite: SuiteResult) -> None:
    """Time outside f per iteration against a raw Picard loop, alternated repeat by repeat."""
    iterations, repeats = (10, 3) if ctx.quick else (30, 41)
    rows = []
    # The fast path (every residual improving) at 30 and 100 iterations, and a stagnating
    # solve at 100: one stopping rule should cost the same either way.
    cases = [(p, iterations) for p in small_f_problems(ctx)]
    long = 20 if ctx.quick else 100
    cases += [(small_f_problems(ctx)[0], long), (stagnating_problem(ctx), long)]
    for problem, budget in cases:
        options = {"max_iter": budget, "atol": 0.0, "rtol": 1e-30, "divergence_ratio": None}
        runs = {"raw": _raw_loop(problem, budget, ctx.device)}
        for name in SOLVER_NAMES:
            runs[name] = _solve(problem, make_solver(name, **options), ctx.device)
        evals = {key: run() for key, run in runs.items()}  # warm-up
        times: dict[str, list[float]] = {key: [] for key in runs}
        order = list(runs)
        for i in range(repeats):
            for key in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                runs[key]()
                times[key].append(time.perf_counter() - t0)
        per_f = statistics.median(times["raw"]) / budget
        for name in SOLVER_NAMES:
            # Per repeat: the solve minus the raw loop of the same repeat (scaled to the solve's
            # evaluations), per iteration.
            outside = [
                (t - r * evals[name] / budget) / budget
                for t, r in zip(times[name], times["raw"], strict=True)
            ]
            q1, _, q3 = statistics.quantiles(outside, n=4) if repeats > 1 else [outside[0]] * 3
            record = suite.add(
                kind="overhead_small_f",
                problem=problem.name,
                **problem.info,
                solver=name,
                iterations=budget,
                n_f_evals=evals[name],
                f_call_s=per_f,
                outside_f_per_iteration_s=statistics.median(outside),
                outside_f_q1_s=q1,
                outside_f_q3_s=q3,
                outside_f_samples_s=outside,
            )
            rows.append(
                [
                    problem.name,
                    str(budget),
                    name,
                    fmt(record["outside_f_per_iteration_s"] * 1e6),
                    f"{fmt(q1 * 1e6)} to {fmt(q3 * 1e6)}",
                    fmt(per_f * 1e6),
                    fmt(record["outside_f_per_iteration_s"] / per_f),
                ]
            )
    suite.tables.append(
        (
            "Time outside f per iteration, small f (tolerance never met), against a raw Picard "
            "loop in the same run",
            [
                "problem",
                "iterations",
                "solver",
                "us outside f",
                "quartiles",
                "us per f call",
                "x one f call",
            ],
            rows,
        )
    )
    suite.notes.append(
        "Small-f overhead: each repeat times a hand-written loop `for _ in range(n): z = f(z)` "
        "and one solve per solver, alternating the order every repeat; the time outside f is "
        "(solve - raw loop x f evaluations / n) / n, per repeat, then the median. It includes "
        "fixed_point's fixed cost (validation, result) spread over the iterations."
    )
    overhead = [r for r in suite.records if r["kind"] == "overhead_small_f"]
    fast = {r["solver"]: r for r in overhead if r["family"] == "mlp" and r["iterations"] == long}
    for r in overhead:
        if r["family"] != "mlp-stagnating":
            continue
        ratio = r["outside_f_per_iteration_s"] / fast[r["solver"]]["outside_f_per_iteration_s"]
        suite.acceptance.append(
            Acceptance(
                f"stagnating_over_fast_{r['solver']}",
                f"time outside f per iteration, stagnating over improving MLP cell, "
                f"{r['iterations']} iterations, {r['solver']}",
                ratio,
                "<= 1.3",
                ratio <= 1.3,
                f"stagnating {fmt(r['outside_f_per_iteration_s'] * 1e6)} us, improving "
                f"{fmt(fast[r['solver']]['outside_f_per_iteration_s'] * 1e6)} us",
            )
        )
    mlp = [r for r in overhead if r["family"] == "mlp" and r["iterations"] == iterations]
    for r in mlp:
        target = OVERHEAD_TARGET_US[r["solver"]]
        value = r["outside_f_per_iteration_s"] * 1e6
        suite.acceptance.append(
            Acceptance(
                f"outside_f_us_{r['solver']}_mlp",
                f"time outside f per iteration, {r['problem']} cell, {r['solver']} (us)",
                value,
                f"<= {target:g}",
                value <= target,
                f"batch {r['batch']}, {r['iterations']} iterations, quartiles "
                f"{fmt(r['outside_f_q1_s'] * 1e6)} to {fmt(r['outside_f_q3_s'] * 1e6)} us; one f "
                f"call {fmt(r['f_call_s'] * 1e6)} us",
            )
        )


def _small_maps(suite: SuiteResult) -> None:
    """f evaluations to rtol 1e-10 on small float64 maps, Picard against the accelerated."""
    options = {"max_iter": 500, "atol": 0.0, "rtol": 1e-10}
    solvers = {
        "picard": il.Picard(**options),
        "anderson": il.Anderson(**options),
        "anderson, no safeguard": il.Anderson(**options, safeguard=False),
        "broyden": il.Broyden(**options),
    }
    rows = []
    for problem in small_map_problems():
        evals, converged = {}, {}
        for name, solver in solvers.items():
            result = il.fixed_point(problem.cell, problem.z0, solver=solver)
            evals[name], converged[name] = result.n_f_evals, bool(result.converged.all())
        suite.add(
            kind="small_map",
            problem=problem.name,
            picard_easy=problem.info["picard_easy"],
            n_f_evals=evals,
            converged=converged,
        )
        rows.append(
            [problem.name, "yes" if problem.info["picard_easy"] else "no"]
            + [str(evals[n]) + ("" if converged[n] else " (not converged)") for n in solvers]
        )
    suite.tables.append(
        (
            "f evaluations to rtol 1e-10 (atol 0, float64, batch 4) on small maps",
            ["map", "Picard-easy", *solvers],
            rows,
        )
    )
    easy = [r for r in suite.records if r["kind"] == "small_map" and r["picard_easy"]]
    excess = [(r["n_f_evals"]["anderson"] - r["n_f_evals"]["picard"], r["problem"]) for r in easy]
    worst = max(excess)
    suite.acceptance.append(
        Acceptance(
            "anderson_vs_picard_easy_maps",
            "most f evaluations Anderson needs beyond Picard's on the Picard-easy maps",
            float(worst[0]),
            "<= 1",
            worst[0] <= 1,
            f"worst: {worst[1]}; " + ", ".join(f"{p}: {d:+d}" for d, p in excess),
        )
    )


def _summarise(
    ctx: SuiteContext,
    suite: SuiteResult,
    problems: list[Problem],
    traces: dict[str, dict[str, list[float]]],
) -> None:
    solves = [r for r in suite.records if r["kind"] == "solve"]
    rows = [
        [
            r["problem"],
            r["solver"],
            fmt(r["rtol"]),
            fmt(r["n_f_evals"]),
            fmt(r["converged_fraction"]),
            fmt(r["time_s"] * 1e3),
            fmt(r["overhead_inline"]),
            fmt(r["overhead_isolated"]),
        ]
        for r in solves
    ]
    suite.tables.append(
        (
            "f evaluations, time and overhead to reach each relative tolerance",
            [
                "problem",
                "solver",
                "rtol",
                "f evals",
                "converged",
                "time ms",
                "overhead inline",
                "overhead isolated",
            ],
            rows,
        )
    )
    f_rows = [
        [r["problem"], str(r["batch"]), fmt(r["time_s"] * 1e3)]
        for r in suite.records
        if r["kind"] == "f_eval"
    ]
    suite.tables.append(("One evaluation of f (no grad)", ["problem", "batch", "ms"], f_rows))
    suite.notes.append(
        "Solvers use their defaults (Anderson history_size=5, regularization=1e-6; Broyden "
        "history_size=10) with atol=0, so each solve stops per sample at "
        "||f(z)-z|| <= rtol ||f(z)||. "
        "Overhead inline = solve time / time spent inside f during that same solve; overhead "
        "isolated = solve time / (f evals x median time of one f call timed alone just before "
        "the solve). The inline figure is the primary one: both of its terms come from the same "
        "solves, while the isolated one mixes two moments of a shared machine (it can even drop "
        "below 1 when f happened to be timed during a slow spell)."
    )
    _acceptance(suite)
    _plots(ctx, suite, problems, traces)


def _acceptance(suite: SuiteResult) -> None:
    at = [
        r
        for r in suite.records
        if r["kind"] == "solve"
        and r.get("family") == "degrad"
        and r.get("size") == ACCEPTANCE_SIZE
        and r["rtol"] == ACCEPTANCE_RTOL
    ]
    if not at:
        suite.acceptance.append(
            Acceptance(
                "solver_overhead_degrad64",
                "solver overhead on DE-GRAD 64x64 (worst solver, rtol 1e-4)",
                None,
                "<= 1.15",
                None,
                "DE-GRAD 64x64 not measured in this run (quick mode or imaging missing)",
            )
        )
        return
    by_solver = {r["solver"]: r for r in at}
    key = (
        "overhead_isolated"
        if any(r["overhead_inline"] != r["overhead_inline"] for r in at)
        else "overhead_inline"
    )  # NaN inline figures (CUDA): use the isolated ones
    worst = max(by_solver.values(), key=lambda r: r[key])
    detail = ", ".join(
        f"{s}: {fmt(r['overhead_inline'])} inline / {fmt(r['overhead_isolated'])} isolated"
        for s, r in by_solver.items()
    )
    suite.acceptance.append(
        Acceptance(
            "solver_overhead_degrad64",
            "solver overhead on DE-GRAD 64x64 (worst solver, rtol 1e-4)",
            worst[key],
            "<= 1.15",
            worst[key] <= 1.15,
            detail,
        )
    )
    ratio = by_solver["anderson"]["n_f_evals"] / by_solver["picard"]["n_f_evals"]
    suite.acceptance.append(
        Acceptance(
            "anderson_vs_picard_fevals",
            "Anderson f evals / Picard f evals on DE-GRAD 64x64 at rtol 1e-4",
            ratio,
            "<= 0.5",
            ratio <= 0.5,
            f"Anderson {by_solver['anderson']['n_f_evals']} vs Picard "
            f"{by_solver['picard']['n_f_evals']} (Picard converged fraction "
            f"{fmt(by_solver['picard']['converged_fraction'])})",
        )
    )


def _plots(
    ctx: SuiteContext,
    suite: SuiteResult,
    problems: list[Problem],
    traces: dict[str, dict[str, list[float]]],
) -> None:
    fig, axes = figure(len(problems), width=4.2)
    for ax, problem in zip(axes, problems, strict=True):
        for solver_name, trace in traces[problem.name].items():
            ax.semilogy(range(1, len(trace) + 1), trace, label=solver_name)
        ax.set_title(problem.name, fontsize=9)
        ax.set_xlabel("iteration (f evaluations)")
        ax.set_ylabel("residual / initial residual (batch median)")
        ax.legend(fontsize=8)
    suite.plots.append(save(fig, ctx.out, "solvers_residual_trace.png"))
    swept = [
        p
        for p in problems
        if len({r["rtol"] for r in suite.records if r.get("problem") == p.name and "rtol" in r}) > 1
    ]
    fig, axes = figure(2 * len(swept), width=4.0)
    for i, problem in enumerate(swept):
        for solver_name in SOLVER_NAMES:
            rows = [
                r
                for r in suite.records
                if r["kind"] == "solve"
                and r["problem"] == problem.name
                and r["solver"] == solver_name
            ]
            rtols = [r["rtol"] for r in rows]
            axes[2 * i].loglog(rtols, [r["n_f_evals"] for r in rows], "o-", label=solver_name)
            axes[2 * i + 1].loglog(rtols, [r["time_s"] for r in rows], "o-", label=solver_name)
        for ax, label in ((axes[2 * i], "f evaluations"), (axes[2 * i + 1], "time to rtol (s)")):
            ax.invert_xaxis()
            ax.set_xlabel("rtol")
            ax.set_ylabel(label)
            ax.set_title(problem.name, fontsize=9)
            ax.legend(fontsize=8)
    suite.plots.append(save(fig, ctx.out, "solvers_cost_vs_rtol.png"))
