"""Suite 3: backward rules, cost in units of one VJP, memory, and gradient accuracy.

For JFB, Neumann(k), the phantom gradients NeumannPhantom(terms=k) and
PhantomGradient(steps=k), and
ImplicitDifferentiation with each adjoint solver (GMRES among them): the time of
``loss.backward()`` in units of one vector-Jacobian product through ``f`` at the fixed point,
the allocator peak during the backward pass, the bytes autograd saved in the forward pass,
the number of reverse passes through ``f`` and of applications of ``f`` kept in the graph, and
the cosine similarity of the parameter gradient to the exact one (implicit differentiation in
float64 with both solves at rtol 1e-12).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import implicitlayers as il

from .._memory import CallCounter, SavedTensors, peak_bytes
from .._plots import figure, save
from .._problems import Problem
from .._report import fmt, mib
from .._timing import Timing, measure
from .._types import Acceptance, SuiteContext, SuiteResult
from ._shared import conv_and_degrad

NAME = "backward"
TITLE = "Backward rules: cost in VJPs, memory, gradient accuracy"
JFB_TARGET = 1.3


#: Plot marker per rule family (the rule label up to its first parenthesis).
MARKERS = {
    "JFB": "o",
    "Neumann": "s",
    "NeumannPhantom": "^",
    "PhantomGradient": "v",
    "Implicit": "D",
}
#: (k, mixing) of the phantom-gradient rows.
PHANTOM = ((2, 0.5), (5, 0.5), (10, 0.5), (5, 0.8))


def _rules(quick: bool) -> dict[str, il.AbstractBackward]:
    adjoint: dict[str, Any] = {"max_iter": 100, "atol": 0.0, "rtol": 1e-5}
    rules: dict[str, il.AbstractBackward] = {"JFB": il.JFB()}
    for k in (1, 2) if quick else (1, 2, 5, 10):
        rules[f"Neumann(k={k})"] = il.Neumann(terms=k)
    phantom = PHANTOM[:1] if quick else PHANTOM
    for k, lam in phantom:
        # k reverse passes each: powers B^0 .. B^{k-1}.
        rules[f"NeumannPhantom(terms={k - 1}, mixing={lam})"] = il.NeumannPhantom(
            terms=k - 1, mixing=lam
        )
    for k, lam in phantom:
        rules[f"PhantomGradient(steps={k}, mixing={lam})"] = il.PhantomGradient(steps=k, mixing=lam)
    solvers: dict[str, il.AbstractSolver | il.linear.AbstractLinearSolver] = {
        "Picard": il.Picard(**adjoint),
        "Anderson": il.Anderson(**adjoint),
        "Broyden": il.Broyden(**adjoint),
        "GMRES": il.GMRES(restart=20, **adjoint),
    }
    for name, solver in solvers.items():
        # Convergence is recorded from DEQ.last_backward_result, not warned about.
        rules[f"Implicit({name})"] = il.ImplicitDifferentiation(
            solver=solver, on_unconverged="ignore"
        )
    return rules


def _flat_grad(module: nn.Module) -> Tensor:
    return torch.cat(
        [
            p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
            for p in module.parameters()
        ]
    )


def _solve(problem: Problem, rtol: float, max_iter: int = 300) -> Tensor:
    solver = il.Anderson(max_iter=max_iter, atol=0.0, rtol=rtol)
    result = il.fixed_point(problem.cell, problem.z0, *problem.inputs, solver=solver)
    return result.z


def exact_gradient(problem: Problem, weight: Tensor) -> Tensor:
    """The parameter gradient of ``(z* . weight).sum()`` in float64, both solves at 1e-12."""
    p64 = problem.to(problem.z0.device, torch.float64)
    tight = il.Anderson(max_iter=500, atol=0.0, rtol=1e-12)
    deq = il.DEQ(p64.cell, solver=tight, backward=il.ImplicitDifferentiation(solver=tight))
    z, result = deq(*p64.inputs, z0=p64.z0)
    (z * weight.to(torch.float64)).sum().backward()
    if not bool(result.converged.all()):
        raise RuntimeError("the float64 reference forward solve did not reach rtol 1e-12")
    return _flat_grad(p64.cell)


def vjp_units(ctx: SuiteContext, problem: Problem, z_star: Tensor, repeats: int) -> dict[str, Any]:
    """Time one VJP through ``f`` at ``z_star``: w.r.t. the parameters, ``z``, and both."""
    params = [p for p in problem.cell.parameters() if p.requires_grad]
    z_in = z_star.detach().requires_grad_(True)
    fz = problem.cell(z_in, *problem.inputs)
    v = torch.randn_like(fz)
    out: dict[str, Any] = {}
    for label, wrt in (("params", params), ("z", [z_in]), ("z_and_params", [z_in, *params])):
        timing = measure(
            lambda _, w=wrt: torch.autograd.grad(fz, w, v, retain_graph=True),
            device=ctx.device,
            repeats=repeats,
            warmup=2,
        )
        out[f"vjp_{label}_s"] = timing.median
    return out


def _unit_vjps(problem: Problem, z_star: Tensor) -> dict[str, Callable[[], Any]]:
    """Callables computing one VJP through ``f`` at ``z_star`` (the units of time)."""
    params = [p for p in problem.cell.parameters() if p.requires_grad]
    z_in = z_star.detach().requires_grad_(True)
    fz = problem.cell(z_in, *problem.inputs)
    v = torch.randn_like(fz)
    return {
        "z_and_params": lambda: torch.autograd.grad(fz, [z_in, *params], v, retain_graph=True),
        "params": lambda: torch.autograd.grad(fz, params, v, retain_graph=True),
    }


def _paired_times(
    ctx: SuiteContext,
    forward: Callable[[], Tensor],
    unit_vjp: dict[str, Callable[[], Any]],
    repeats: int,
) -> tuple[Timing, float, float]:
    """Time ``forward().backward()``'s backward and the unit VJPs alternately.

    Returns the backward's timing and the medians over repeats of backward / VJP, so each
    ratio compares measurements taken moments apart on a shared machine.
    """
    backward, ratio, ratio_params = [], [], []
    for i in range(repeats + 1):
        t_b = measure(
            lambda loss: loss.backward(), device=ctx.device, repeats=1, warmup=0, setup=forward
        ).median
        t_u = measure(
            lambda _: unit_vjp["z_and_params"](), device=ctx.device, repeats=1, warmup=0
        ).median
        t_p = measure(lambda _: unit_vjp["params"](), device=ctx.device, repeats=1, warmup=0).median
        if i > 0:  # the first round is the warm-up
            backward.append(t_b)
            ratio.append(t_b / t_u)
            ratio_params.append(t_b / t_p)
    return Timing(tuple(backward)), statistics.median(ratio), statistics.median(ratio_params)


def run(ctx: SuiteContext) -> SuiteResult:
    """Run the suite."""
    repeats = ctx.repeats(7, 2)
    suite = SuiteResult(name=NAME, title=TITLE, config={"repeats": repeats})
    problems = conv_and_degrad(ctx, suite)
    rules = _rules(ctx.quick)
    for problem in problems:
        _run_problem(ctx, suite, problem, rules, repeats)
    _summarise(ctx, suite, problems)
    return suite


def _run_problem(
    ctx: SuiteContext,
    suite: SuiteResult,
    problem: Problem,
    rules: dict[str, il.AbstractBackward],
    repeats: int,
) -> None:
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(problem.z0.shape, generator=gen).to(problem.z0)
    exact = exact_gradient(problem, weight)
    z_star = _solve(problem, rtol=1e-6)
    units = vjp_units(ctx, problem, z_star, repeats)
    suite.add(kind="vjp_unit", problem=problem.name, **problem.info, **units)
    unit_vjp = _unit_vjps(problem, z_star)
    # The forward starts at the solved z*, so it converges on its first evaluation and the
    # timed part is the backward pass alone.
    start = il.Picard(max_iter=5, atol=0.0, rtol=1e-5)
    for label, rule in ctx.bar(list(rules.items()), f"backward {problem.name}"):
        deq = il.DEQ(problem.cell, solver=start, backward=rule)

        solve: dict[str, il.SolverResult] = {}

        def forward(deq: il.DEQ = deq, solve: dict[str, il.SolverResult] = solve) -> Tensor:
            problem.cell.zero_grad(set_to_none=True)
            z, solve["result"] = deq(*problem.inputs, z0=z_star)
            return (z * weight).sum()

        timing, in_vjps, in_param_vjps = _paired_times(ctx, forward, unit_vjp, repeats)
        forward_timing = measure(lambda _: forward(), device=ctx.device, repeats=repeats)
        memory = peak_bytes(lambda loss: loss.backward(), ctx.device, setup=forward)
        with CallCounter(problem.cell) as counted:
            with SavedTensors(problem.cell.parameters()) as saved:
                loss = forward()
            # The forward solve's own evaluations run without autograd; the rest are the rule's
            # applications of f kept in the graph (k for PhantomGradient, 1 for the others).
            graph_applications = counted.forward_calls - solve["result"].n_f_evals
            loss.backward()
            reverse_passes = counted.reverse_calls
        grad = _flat_grad(problem.cell).to(torch.float64)
        cosine = float(torch.nn.functional.cosine_similarity(grad, exact, dim=0))
        adjoint = deq.last_backward_result
        suite.add(
            kind="backward",
            problem=problem.name,
            **problem.info,
            rule=label,
            rule_repr=repr(rule),
            **timing.as_dict("backward_time"),
            backward_time_in_vjps=in_vjps,
            backward_time_in_param_vjps=in_param_vjps,
            reverse_passes=reverse_passes,
            graph_applications=graph_applications,
            **forward_timing.as_dict("forward_time"),
            saved_bytes=saved.nbytes,
            adjoint_n_f_evals=None if adjoint is None else adjoint.n_f_evals,
            adjoint_converged=None if adjoint is None else bool(adjoint.converged.all()),
            cosine_to_exact=cosine,
            relative_error_to_exact=float((grad - exact).norm() / exact.norm()),
            **memory,
        )


def _adjoint_cell(record: dict[str, Any]) -> str:
    if record["adjoint_n_f_evals"] is None:
        return "-"
    return f"{record['adjoint_n_f_evals']} ({fmt(record['adjoint_converged'])})"


def _summarise(ctx: SuiteContext, suite: SuiteResult, problems: list[Problem]) -> None:
    units = {r["problem"]: r for r in suite.records if r["kind"] == "vjp_unit"}
    rows = [
        [
            r["problem"],
            r["rule"],
            fmt(r["backward_time_s"] * 1e3),
            fmt(r["backward_time_in_vjps"]),
            fmt(r["backward_time_in_param_vjps"]),
            str(r["reverse_passes"]),
            str(r["graph_applications"]),
            fmt(r["forward_time_s"] * 1e3),
            mib(r["saved_bytes"]),
            mib(r["peak_bytes"]),
            _adjoint_cell(r),
            fmt(r["cosine_to_exact"], 6),
        ]
        for r in suite.records
        if r["kind"] == "backward"
    ]
    suite.tables.append(
        (
            "Backward pass per rule",
            [
                "problem",
                "rule",
                "backward ms",
                "in VJPs (z+params)",
                "in VJPs (params)",
                "reverse passes",
                "f in graph",
                "forward ms",
                "saved MiB",
                "backward peak MiB",
                "adjoint VJPs (converged)",
                "cosine to exact",
            ],
            rows,
        )
    )
    unit_rows = [
        [
            name,
            fmt(u["vjp_params_s"] * 1e3),
            fmt(u["vjp_z_s"] * 1e3),
            fmt(u["vjp_z_and_params_s"] * 1e3),
        ]
        for name, u in units.items()
    ]
    suite.tables.append(
        (
            "One VJP through f at z* (ms)",
            ["problem", "w.r.t. params", "w.r.t. z", "w.r.t. z and params"],
            unit_rows,
        )
    )
    suite.notes.append(
        "One VJP = one reverse pass through f at z*, `torch.autograd.grad(f(z*), (z*, "
        "params), v)` (the 'params' column divides by the reverse pass to the parameters only); "
        "each backward is timed alternately with the unit VJPs and the ratio is the median of "
        "the per-repeat ratios. "
        "The forward pass starts at the solved z*, so only loss.backward() is timed. Peak = "
        "allocator peak during loss.backward() above what was live before ("
        + ("CUDA max_memory_allocated" if ctx.is_cuda else "torch.profiler allocator events")
        + "). Exact gradient: implicit differentiation in float64, forward and adjoint solved "
        "by Anderson to rtol 1e-12. Adjoint solvers: max_iter=100, atol=0, rtol=1e-5 "
        "(GMRES with restart=20; its rtol is relative to ||g||, a fixed-point solver's to "
        "||J^T u + g||), on_unconverged='ignore', the VJPs and convergence read from "
        "DEQ.last_backward_result."
    )
    suite.notes.append(
        "Phantom gradients (Geng et al., 2021), mixing = lambda: NeumannPhantom(terms=k) sums "
        "lambda sum_{i<=k} ((1 - lambda) I + lambda J^T)^i g with k VJPs at z*, plus the "
        "reverse pass that maps u to the parameters; PhantomGradient(steps=k) backpropagates "
        "through k damped steps z <- (1 - lambda) z + lambda f(z) taken from the detached z*: "
        "k reverse passes, and the k applications of f run in the forward pass, kept in the "
        "graph. 'f in graph' counts the applications of f made under autograd after the "
        "forward solve (1 for every other rule); 'forward ms' times the whole forward from "
        "z* (the solver's one evaluation of f plus those applications); 'saved MiB' is what "
        "autograd saved for backward during it (saved_tensors_hooks, parameters excluded). "
        "At an exact fixed point the two phantom rules give the same gradient."
    )
    jfb = [r for r in suite.records if r["kind"] == "backward" and r["rule"] == "JFB"]
    if jfb:
        worst = max(jfb, key=lambda r: r["backward_time_in_vjps"])
        suite.acceptance.append(
            Acceptance(
                "jfb_backward_vjps",
                "JFB backward time in units of one VJP (worst problem)",
                worst["backward_time_in_vjps"],
                f"<= {JFB_TARGET}",
                worst["backward_time_in_vjps"] <= JFB_TARGET,
                ", ".join(
                    f"{r['problem']}: {fmt(r['backward_time_in_vjps'])} "
                    f"({fmt(r['backward_time_in_param_vjps'])} param-only VJPs)"
                    for r in jfb
                ),
            )
        )
    # Reverse passes, not time, on the x axis: they are deterministic on a shared machine.
    fig, axes = figure(len(problems), width=5.5, height=4.0)
    for ax, problem in zip(axes, problems, strict=True):
        recs = [
            r for r in suite.records if r["kind"] == "backward" and r["problem"] == problem.name
        ]
        for family, marker in MARKERS.items():
            fam = [r for r in recs if r["rule"].split("(")[0] == family]
            if not fam:
                continue
            xs = [r["reverse_passes"] for r in fam]
            ys = [1 - r["cosine_to_exact"] + 1e-16 for r in fam]
            ax.scatter(xs, ys, marker=marker, label=family)
            for r, x, y in zip(fam, xs, ys, strict=True):
                detail = r["rule"][len(family) :].strip("()").replace("mixing=", "")
                ax.annotate(detail, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("reverse passes through f in the backward pass")
        ax.set_ylabel("1 - cosine to exact gradient")
        ax.set_title(problem.name, fontsize=9)
        ax.legend(fontsize=7)
    suite.plots.append(save(fig, ctx.out, "backward_cost_vs_accuracy.png"))
