"""Suite 5: against torchdeq 0.1.0 on the same problem, solver settings and tolerance.

torchdeq is an optional import: without it the suite is skipped with the reason recorded.
Settings were matched by reading torchdeq's source (``torchdeq/solver/*.py``,
``torchdeq/core.py``, ``torchdeq/grad.py``):

* stopping: torchdeq's ``stop_mode="rel"`` stops when ``max_b ||f(z_b) - z_b|| /
  (||f(z_b)|| + 1e-9) < tol``; ours uses ``atol=0, rtol=tol``, i.e. per sample
  ``||f(z) - z|| <= tol ||f(z)||`` (then frozen). Both evaluate ``f`` on the whole batch.
* Anderson: torchdeq ``m=6, lam=1e-4, tau=1.0`` (its defaults); ours ``history_size=6,
  mixing=1.0`` and our default ``regularization=1e-6``. The ridges cannot be matched exactly:
  torchdeq adds a fixed ``1e-4 I`` to ``GG^T``, ours adds ``1e-6 max diag(GG^T) I``.
* Picard: torchdeq ``fixed_point_iter`` with ``tau=1.0``; ours ``Picard(mixing=1.0)``.
* Broyden: torchdeq keeps every update (``LBFGS_thres=None`` -> ``max_iter``) without line
  search; ours ``Broyden(history_size=max_iter)``.
* backward: JFB is torchdeq ``grad=1`` against our ``JFB()``; implicit differentiation is
  torchdeq ``ift=True, b_solver="anderson", b_stop_mode="rel"`` against our
  ``ImplicitDifferentiation(solver=Anderson(history_size=6, mixing=1.0, atol=0, rtol=b_tol))``.
  torchdeq starts the adjoint solve from 0, ours from the incoming gradient.

Besides the conv layer and DE-GRAD, the forward comparison covers two small-``f`` problems
(an MLP cell and a sparse graph convolution, from the solvers suite), where the solver's
bookkeeping rather than ``f`` decides the time: ``max_iter`` iterations each, with a tolerance
neither library meets (``tol=1e-30``; torchdeq's ``stop_mode="abs"``), so both do the same
number of evaluations.

``f`` evaluations and reverse passes are counted by the same hooks on the cell for both
libraries. Timings alternate between the libraries repeat by repeat, so a shared machine's
slow moments hit both, and each ours/theirs ratio is the median of the per-repeat ratios.

Verdict: a time ratio counts as *slower* when its median exceeds 1 by more than a 2 %
practical margin and it is above 1 in at least three quarters of the repeats (its lower
quartile is above 1); anything else above 1 is a tie, listed as such. The margin is checked
in every run by an A/A control: the same Picard solve of ours timed against an identical copy
of itself with the same harness, whose ratio should be 1 and whose distance from 1 is the
noise the margin has to cover (it is reported beside the verdict). Memory ratios are
deterministic and must be at most 1.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

import implicitlayers as il

from .._memory import CallCounter, SavedTensors, peak_bytes
from .._plots import figure, save
from .._problems import Problem
from .._report import fmt, mib
from .._timing import paired_ratio
from .._types import Acceptance, SuiteContext, SuiteResult, skipped
from ._shared import conv_and_degrad, relative_residual
from .solvers import small_f_problems

NAME = "peers"
#: Practical margin of the time verdict (see the module docstring and the A/A control).
MARGIN = 0.02
#: On a small f, each solver's total time should be at most this fraction of torchdeq's.
SMALL_F_TARGET = 0.5
TITLE = "Against torchdeq"
TORCHDEQ_SOLVERS = {"picard": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


def _ours_solver(name: str, max_iter: int, tol: float) -> il.AbstractSolver:
    options: dict[str, Any] = {"max_iter": max_iter, "atol": 0.0, "rtol": tol}
    if tol < 1e-20:  # a tolerance that is never met: run max_iter iterations, as torchdeq does
        options["divergence_ratio"] = None
    if name == "picard":
        return il.Picard(mixing=1.0, **options)
    if name == "anderson":
        return il.Anderson(history_size=6, mixing=1.0, **options)
    return il.Broyden(history_size=max_iter, **options)


def _theirs(
    solver: str, max_iter: int, tol: float, backward: str, b_tol: float, stop_mode: str = "rel"
) -> Any:
    from torchdeq import get_deq

    kwargs: dict[str, Any] = {
        "f_solver": TORCHDEQ_SOLVERS[solver],
        "f_max_iter": max_iter,
        "f_tol": tol,
        "f_stop_mode": stop_mode,
        "eval_factor": 1.0,
    }
    if backward == "ift":
        kwargs.update(
            ift=True, b_solver="anderson", b_max_iter=max_iter, b_tol=b_tol, b_stop_mode="rel"
        )
    else:
        kwargs.update(grad=1)
    return get_deq(**kwargs)


def _alternate(
    fns: Mapping[str, Callable[..., Any]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating between them, after one warm-up.

    The order flips every repeat (ours first, then theirs first, ...), so that whatever the
    first or second position gains (warm caches, a clock ramping up) is shared.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        order = list(fns.items())
        for key, fn in order if i % 2 == 0 else order[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[key].append(time.perf_counter() - t0)
    return times


def run(ctx: SuiteContext) -> SuiteResult:
    """Run the suite."""
    try:
        import torchdeq
    except ImportError as err:
        return skipped(
            NAME,
            TITLE,
            f"torchdeq is not installed ({err}); `pip install torchdeq==0.1.0` to run this suite",
        )
    tol, b_tol = 1e-4, 1e-5
    cfg = {
        "tol": tol,
        "b_tol": b_tol,
        "repeats": ctx.repeats(9, 1),
        "max_iter": 100,
        "torchdeq": torchdeq.__version__ if hasattr(torchdeq, "__version__") else "0.1.0",
    }
    suite = SuiteResult(name=NAME, title=TITLE, config=cfg)
    problems = conv_and_degrad(ctx, suite)
    jobs = [(p, s) for p in problems for s in ("picard", "anderson", "broyden")]
    for problem, solver in ctx.bar(jobs, "peers forward"):
        _forward(ctx, suite, problem, solver, cfg)
    budgets = (1, 5, 30, 100) if not ctx.quick else (1, 5)
    jobs = [
        (p, s, k)
        for p in small_f_problems(ctx)
        for s in ("picard", "anderson", "broyden")
        for k in budgets
    ]
    for problem, solver, k in ctx.bar(jobs, "peers small f"):
        small = {**cfg, "tol": 1e-30, "max_iter": k, "stop_mode": "abs"}
        _forward(ctx, suite, problem, solver, {**small, "repeats": ctx.repeats(21, 1)})
    _control(ctx, suite, problems[-1], cfg)
    jobs = [(p, b) for p in problems for b in ("jfb", "ift")]
    for problem, backward in ctx.bar(jobs, "peers training"):
        _training(ctx, suite, problem, backward, cfg)
    _summarise(ctx, suite)
    return suite


def _forward(
    ctx: SuiteContext, suite: SuiteResult, problem: Problem, solver: str, cfg: dict[str, Any]
) -> None:
    with CallCounter(problem.cell) as counted:  # for both libraries
        ours = il.DEQ(problem.cell, solver=_ours_solver(solver, cfg["max_iter"], cfg["tol"]))
        theirs = _theirs(
            solver, cfg["max_iter"], cfg["tol"], "jfb", cfg["b_tol"], cfg.get("stop_mode", "rel")
        ).eval()
        out: dict[str, Tensor] = {}
        evals: dict[str, int] = {}

        def run_ours() -> None:
            counted.reset()
            with torch.no_grad():
                out["ours"], _ = ours(*problem.inputs, z0=problem.z0)
            evals["ours"] = counted.forward_calls

        def run_theirs() -> None:
            counted.reset()
            with torch.no_grad():
                z, _ = theirs(lambda z: problem.cell(z, *problem.inputs), problem.z0)
            out["theirs"] = z[-1]
            evals["theirs"] = counted.forward_calls

        times = _alternate({"ours": run_ours, "theirs": run_theirs}, cfg["repeats"], ctx.device)
        t_ours, t_theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
        suite.add(
            kind="forward",
            problem=problem.name,
            **problem.info,
            solver=solver,
            tol=cfg["tol"],
            small_f=problem.info["family"] in ("mlp", "graph"),
            max_iter=cfg["max_iter"],
            ours_time_s=t_ours,
            theirs_time_s=t_theirs,
            ours_time_samples_s=times["ours"],
            theirs_time_samples_s=times["theirs"],
            time_ratio=paired_ratio(times["ours"], times["theirs"]),
            time_ratio_q25=_lower_quartile(times["ours"], times["theirs"]),
            ours_f_evals=evals["ours"],
            theirs_f_evals=evals["theirs"],
            ours_relative_residual=relative_residual(problem, out["ours"]),
            theirs_relative_residual=relative_residual(problem, out["theirs"]),
        )


def _control(ctx: SuiteContext, suite: SuiteResult, problem: Problem, cfg: dict[str, Any]) -> None:
    """A/A control: ours against an identical copy of ours, timed like the comparisons."""
    solver = _ours_solver("picard", cfg["max_iter"], cfg["tol"])
    copies = [il.DEQ(problem.cell, solver=solver) for _ in range(2)]

    def runner(deq: il.DEQ) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                deq(*problem.inputs, z0=problem.z0)

        return run

    times = _alternate({"a": runner(copies[0]), "b": runner(copies[1])}, cfg["repeats"], ctx.device)
    suite.add(
        kind="control",
        problem=problem.name,
        solver="picard",
        time_ratio=paired_ratio(times["a"], times["b"]),
        time_ratio_q25=_lower_quartile(times["a"], times["b"]),
        a_time_samples_s=times["a"],
        b_time_samples_s=times["b"],
    )


def _training(
    ctx: SuiteContext, suite: SuiteResult, problem: Problem, backward: str, cfg: dict[str, Any]
) -> None:
    with CallCounter(problem.cell) as counted:  # for both libraries
        rule: il.AbstractBackward = il.JFB()
        if backward == "ift":
            adjoint = il.Anderson(
                history_size=6, mixing=1.0, max_iter=cfg["max_iter"], atol=0.0, rtol=cfg["b_tol"]
            )
            rule = il.ImplicitDifferentiation(solver=adjoint)
        ours = il.DEQ(
            problem.cell,
            solver=_ours_solver("anderson", cfg["max_iter"], cfg["tol"]),
            backward=rule,
        )
        theirs = _theirs("anderson", cfg["max_iter"], cfg["tol"], backward, cfg["b_tol"]).train()
        weight = torch.randn(problem.z0.shape, generator=torch.Generator().manual_seed(5))
        weight = weight.to(problem.z0)
        params = list(problem.cell.parameters())

        def loss_ours() -> Tensor:
            problem.cell.zero_grad(set_to_none=True)
            z, _ = ours(*problem.inputs, z0=problem.z0)
            return (z * weight).sum()

        def loss_theirs() -> Tensor:
            problem.cell.zero_grad(set_to_none=True)
            z, _ = theirs(lambda z: problem.cell(z, *problem.inputs), problem.z0)
            return (z[-1] * weight).sum()

        losses = {"ours": loss_ours, "theirs": loss_theirs}
        steps = {k: (lambda fn=fn: fn().backward()) for k, fn in losses.items()}
        step_times = _alternate(steps, cfg["repeats"], ctx.device)
        backward_times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for i in range(cfg["repeats"]):
            order = list(losses.items())
            for key, fn in order if i % 2 == 0 else order[::-1]:
                loss = fn()
                t0 = time.perf_counter()
                loss.backward()
                if ctx.is_cuda:
                    torch.cuda.synchronize(ctx.device)
                backward_times[key].append(time.perf_counter() - t0)
        record: dict[str, Any] = {}
        grads = {}
        for key, fn in losses.items():
            with SavedTensors(exclude=params) as saved:
                loss = fn()
            counted.reset()
            loss.backward()
            reverse_passes = counted.reverse_calls
            grads[key] = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
            # Gradients are cleared before the measurement, not inside it: freeing them in the
            # measured window would lower the peak by whatever the previous step left behind.
            memory = peak_bytes(
                lambda _, fn=fn: fn().backward(),
                ctx.device,
                setup=lambda: problem.cell.zero_grad(set_to_none=True),
            )
            record.update(
                {
                    f"{key}_step_time_s": statistics.median(step_times[key]),
                    f"{key}_backward_time_s": statistics.median(backward_times[key]),
                    f"{key}_step_samples_s": step_times[key],
                    f"{key}_backward_samples_s": backward_times[key],
                    f"{key}_reverse_passes": reverse_passes,
                    f"{key}_saved_bytes": saved.nbytes,
                    f"{key}_peak_bytes": memory["peak_bytes"],
                }
            )
        cosine = float(torch.nn.functional.cosine_similarity(grads["ours"], grads["theirs"], dim=0))
        suite.add(
            kind="training",
            problem=problem.name,
            **problem.info,
            backward=backward,
            **record,
            step_time_ratio=paired_ratio(step_times["ours"], step_times["theirs"]),
            backward_time_ratio=paired_ratio(backward_times["ours"], backward_times["theirs"]),
            step_time_ratio_q25=_lower_quartile(step_times["ours"], step_times["theirs"]),
            backward_time_ratio_q25=_lower_quartile(
                backward_times["ours"], backward_times["theirs"]
            ),
            peak_ratio=record["ours_peak_bytes"] / max(record["theirs_peak_bytes"], 1),
            gradient_cosine_ours_vs_theirs=cosine,
        )


def _lower_quartile(ours: list[float], theirs: list[float]) -> float:
    """Lower quartile of the per-repeat ours/theirs ratios (the ratio itself for one repeat)."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    if len(ratios) < 2:
        return ratios[0]
    return statistics.quantiles(ratios, n=4)[0]


def _summarise(ctx: SuiteContext, suite: SuiteResult) -> None:
    fwd = [r for r in suite.records if r["kind"] == "forward"]
    suite.tables.append(
        (
            f"Forward solve (no grad): to rtol {suite.config['tol']} on the conv layer and "
            "DE-GRAD; 30 iterations (tolerance never met) on the small-f problems",
            [
                "problem",
                "solver",
                "ours ms",
                "torchdeq ms",
                "ours/theirs (lower quartile)",
                "ours f evals",
                "their f evals",
                "ours rel. res.",
                "their rel. res.",
            ],
            [
                [
                    r["problem"],
                    r["solver"],
                    fmt(r["ours_time_s"] * 1e3),
                    fmt(r["theirs_time_s"] * 1e3),
                    f"{fmt(r['time_ratio'])} ({fmt(r['time_ratio_q25'])})",
                    str(r["ours_f_evals"]),
                    str(r["theirs_f_evals"]),
                    fmt(r["ours_relative_residual"]),
                    fmt(r["theirs_relative_residual"]),
                ]
                for r in fwd
            ],
        )
    )
    trn = [r for r in suite.records if r["kind"] == "training"]
    suite.tables.append(
        (
            "Training step (Anderson forward + backward rule)",
            [
                "problem",
                "backward",
                "step ours/theirs (lower quartile)",
                "backward ms ours",
                "backward ms theirs",
                "backward ours/theirs (lower quartile)",
                "reverse passes ours/theirs",
                "peak MiB ours/theirs",
                "saved MiB ours/theirs",
                "grad cosine",
            ],
            [
                [
                    r["problem"],
                    r["backward"],
                    f"{fmt(r['step_time_ratio'])} ({fmt(r['step_time_ratio_q25'])})",
                    fmt(r["ours_backward_time_s"] * 1e3),
                    fmt(r["theirs_backward_time_s"] * 1e3),
                    f"{fmt(r['backward_time_ratio'])} ({fmt(r['backward_time_ratio_q25'])})",
                    f"{r['ours_reverse_passes']}/{r['theirs_reverse_passes']}",
                    f"{mib(r['ours_peak_bytes'])}/{mib(r['theirs_peak_bytes'])}",
                    f"{mib(r['ours_saved_bytes'])}/{mib(r['theirs_saved_bytes'])}",
                    fmt(r["gradient_cosine_ours_vs_theirs"], 5),
                ]
                for r in trn
            ],
        )
    )
    suite.notes.append((__doc__ or "").split("\n\n", 1)[1].strip())
    # (label, median ratio, lower quartile of the per-repeat ratios; memory: the ratio itself)
    spread = (
        [
            (f"forward {r['problem']} {r['solver']}", r["time_ratio"], r["time_ratio_q25"])
            for r in fwd
        ]
        + [
            (f"step {r['problem']} {r['backward']}", r["step_time_ratio"], r["step_time_ratio_q25"])
            for r in trn
        ]
        + [
            (
                f"backward {r['problem']} {r['backward']}",
                r["backward_time_ratio"],
                r["backward_time_ratio_q25"],
            )
            for r in trn
        ]
        + [
            (f"peak memory {r['problem']} {r['backward']}", r["peak_ratio"], r["peak_ratio"])
            for r in trn
        ]
    )
    ratios = [(k, v) for k, v, _ in spread]
    if ratios:
        worst = max(ratios, key=lambda kv: kv[1])
        memory = {k for k, _, _ in spread if k.startswith("peak memory")}

        def is_slower(key: str, median: float, q25: float) -> bool:
            if key in memory:
                return median > 1.0
            return median > 1.0 + MARGIN and q25 > 1.0

        slower = [k for k, v, q25 in spread if is_slower(k, v, q25)]
        ties = [
            f"{k} {fmt(v)} (lower quartile {fmt(q25)})"
            for k, v, q25 in spread
            if v > 1.0 and not is_slower(k, v, q25)
        ]
        verdict = f"slower: {', '.join(slower)}" if slower else "slower: none"
        verdict += f"; ties within the margin: {', '.join(ties) if ties else 'none'}"
        control = [r for r in suite.records if r["kind"] == "control"]
        if control:
            c = control[0]
            verdict += (
                f"; A/A control ({c['problem']} Picard, ours vs ours) "
                f"{fmt(c['time_ratio'])} (lower quartile {fmt(c['time_ratio_q25'])})"
            )
        suite.acceptance.append(
            Acceptance(
                "not_slower_than_torchdeq",
                "worst ours/torchdeq ratio (time or memory; < 1 = we are better); slower = "
                f"median above {1 + MARGIN:g} and above 1 in at least 3 of 4 repeats",
                worst[1],
                "no row slower",
                not slower,
                f"{verdict}; worst median: {worst[0]}; all: "
                + ", ".join(f"{k} {fmt(v)}" for k, v in ratios),
            )
        )
    small = [r for r in fwd if r.get("small_f")]
    if small:
        at30 = [r for r in small if r.get("max_iter") == 30] or small
        worst_small = max(at30, key=lambda r: r["time_ratio"])
        suite.acceptance.append(
            Acceptance(
                "small_f_vs_torchdeq",
                "worst ours/torchdeq total time on the small-f problems (30 iterations each)",
                worst_small["time_ratio"],
                f"<= {SMALL_F_TARGET:g}",
                worst_small["time_ratio"] <= SMALL_F_TARGET,
                ", ".join(f"{r['problem']} {r['solver']} {fmt(r['time_ratio'])}" for r in at30),
            )
        )
        worst_any = max(small, key=lambda r: r["time_ratio"])
        suite.acceptance.append(
            Acceptance(
                "small_f_budgets_vs_torchdeq",
                "worst ours/torchdeq total time on the small-f problems at every budget "
                "(1, 5, 30 and 100 iterations)",
                worst_any["time_ratio"],
                "<= 1",
                worst_any["time_ratio"] <= 1.0,
                ", ".join(
                    f"{r['problem']} {r['solver']} k={r.get('max_iter')} {fmt(r['time_ratio'])}"
                    for r in small
                ),
            )
        )
    fig, axes = figure(1, width=7.0, height=max(3.0, 0.25 * len(ratios)))
    axes[0].barh([k for k, _ in ratios], [v for _, v in ratios])
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("ours / torchdeq (< 1: ours better)")
    axes[0].tick_params(axis="y", labelsize=7)
    suite.plots.append(save(fig, ctx.out, "peers_ratios.png"))
