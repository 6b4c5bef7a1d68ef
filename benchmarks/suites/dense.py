"""Suite 6: the paper's cost argument, dense Jacobian inversion against matrix-free.

The implicit gradient needs :math:`u = (I - J^\\top)^{-1} g` with :math:`J = \\partial T /
\\partial x` at the fixed point of the DE-GRAD operator :math:`T`. Gilton et al. argue that
forming and inverting :math:`I - J` densely is out of reach for images (they inverted a
4000 x 4000 system in 2.27 s and could not go further). Here, for growing image sizes
(:math:`n = 3 s^2` unknowns):

* dense: :math:`J` by ``torch.func.jacrev`` (chunked), then ``torch.linalg.solve``;
* matrix-free: :meth:`ImplicitDifferentiation.adjoint` with Anderson, VJPs only, up to the
  full 128 x 128 x 3 = 49,152-dimensional problem.

The dense method is only run while its extrapolated cost stays under a budget; beyond that
the cost is extrapolated from power laws fitted to the measured sizes and recorded as such.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

import implicitlayers as il

from .._memory import cuda_peak_bytes, profiler_peak_bytes
from .._plots import figure, save
from .._problems import Problem, TanhConvCell
from .._report import fmt, mib
from .._timing import synchronize
from .._types import SuiteContext, SuiteResult
from ._shared import maybe_degrad

NAME = "dense"
TITLE = "Dense Jacobian inversion versus matrix-free implicit backward"
PAPER_N, PAPER_SECONDS = 4000, 2.27


def _config(ctx: SuiteContext) -> dict[str, Any]:
    if ctx.quick:
        return {
            "sizes": [4, 6, 8, 12, 64, 128],
            "mf_sizes": [4, 8, 16],
            "dense_time_budget_s": 3.0,
            "chunk": 64,
            "repeats": 1,
        }
    return {
        "sizes": [8, 16, 24, 32, 36, 48, 64, 96, 128],
        "mf_sizes": [8, 16, 32, 36, 64, 96, 128],
        "dense_time_budget_s": 30.0,
        "chunk": 128,
        "repeats": 3,
    }


def _problem(ctx: SuiteContext, size: int) -> Problem:
    problem, _ = maybe_degrad(ctx, batch=1, size=size)
    if problem is not None:
        return problem
    # Stand-in with the same state shape when the imaging module is missing.
    cell = TanhConvCell(3, size, 0.9).eval().to(ctx.device)
    x = torch.randn(1, 3, size, size, device=ctx.device)
    return Problem(
        f"tanh-conv 3x{size}x{size}",
        cell,
        (x,),
        torch.zeros_like(x),
        {"family": "tanh_conv", "size": size, "dim": 3 * size * size},
    )


def _fixed_point(problem: Problem) -> Tensor:
    solver = il.Anderson(max_iter=300, atol=0.0, rtol=1e-6)
    return il.fixed_point(problem.cell, problem.z0, *problem.inputs, solver=solver).z


def _dense(problem: Problem, z: Tensor, g: Tensor, chunk: int) -> tuple[Tensor, float, float]:
    shape = z.shape

    def flat_f(x: Tensor) -> Tensor:
        return problem.cell(x.view(shape), *problem.inputs).reshape(-1)

    synchronize(z.device)
    t0 = time.perf_counter()
    jac = torch.func.jacrev(flat_f, chunk_size=chunk)(z.reshape(-1).detach())
    synchronize(z.device)
    t1 = time.perf_counter()
    eye = torch.eye(jac.shape[0], dtype=jac.dtype, device=jac.device)
    u = torch.linalg.solve(eye - jac.T, g.reshape(-1))
    synchronize(z.device)
    t2 = time.perf_counter()
    return u, t1 - t0, t2 - t1


def _matrix_free(problem: Problem, z: Tensor, g: Tensor) -> tuple[Tensor, int]:
    rule = il.ImplicitDifferentiation(solver=il.Anderson(max_iter=200, atol=0.0, rtol=1e-6))
    z_in = z.detach().requires_grad_(True)
    with torch.enable_grad():
        fz = problem.cell(z_in, *problem.inputs).reshape(1, -1)

    def vjp(v: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(fz, z_in, v, retain_graph=True)
        return out.reshape(1, -1)

    u, result = rule.adjoint(vjp, g.reshape(1, -1))
    assert result is not None
    return u.detach().reshape(-1), result.n_f_evals


def _peak(fn: Any, ctx: SuiteContext) -> dict[str, Any]:
    """Allocator peak of one call (the profiler on the CPU; no second RSS run)."""
    if ctx.is_cuda:
        return {"peak_bytes": cuda_peak_bytes(fn, ctx.device), "peak_method": "cuda"}
    return {"peak_bytes": profiler_peak_bytes(fn), "peak_method": "torch.profiler"}


def _fit(ns: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares power law ``y = a n^b`` over the given points; returns ``(a, b)``."""
    b, log_a = np.polyfit(np.log(ns), np.log(ys), 1)
    return float(math.exp(log_a)), float(b)


def run(ctx: SuiteContext) -> SuiteResult:
    """Run the suite."""
    cfg = _config(ctx)
    suite = SuiteResult(name=NAME, title=TITLE, config=dict(cfg))
    if maybe_degrad(ctx, batch=1, size=8)[0] is None:
        suite.notes.append(
            "implicitlayers.imaging is missing: a tanh conv layer with the same "
            "3 x s x s state stands in for the DE-GRAD operator."
        )
    dense_pts: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(11)
    for size in ctx.bar(sorted(set(cfg["sizes"]) | set(cfg["mf_sizes"])), "dense"):
        n = 3 * size * size
        est = _extrapolate(dense_pts, n) if size in cfg["sizes"] else None
        run_dense = size in cfg["sizes"] and (
            est is None or est["time_s"] <= cfg["dense_time_budget_s"]
        )
        if size in cfg["sizes"] and not run_dense:
            assert est is not None
            suite.add(
                kind="dense",
                size=size,
                n=n,
                extrapolated=True,
                **est,
                reason=f"extrapolated time {est['time_s']:.0f} s exceeds the "
                f"{cfg['dense_time_budget_s']:.0f} s budget",
            )
        if not run_dense and size not in cfg["mf_sizes"]:
            continue
        problem = _problem(ctx, size)
        problem.cell.requires_grad_(False)  # only d/dz is wanted: no graph to the weights
        z = _fixed_point(problem)
        g = torch.randn(z.shape, generator=gen).to(z)
        u_dense = None
        if run_dense:
            box: dict[str, Any] = {}

            def dense_run(
                _: Any = None,
                box: dict[str, Any] = box,
                args: tuple[Problem, Tensor, Tensor] = (problem, z, g),
            ) -> None:
                box["out"] = _dense(*args, cfg["chunk"])

            if not dense_pts:
                dense_run()  # warm-up: the first vmap call pays one-off costs
            dense_run()  # timed inside _dense
            u_dense, t_jac, t_solve = box["out"]
            memory = _peak(dense_run, ctx)
            rec = suite.add(
                kind="dense",
                size=size,
                n=n,
                extrapolated=False,
                jacobian_time_s=t_jac,
                solve_time_s=t_solve,
                time_s=t_jac + t_solve,
                jacobian_bytes=n * n * z.element_size(),
                **memory,
            )
            dense_pts.append(rec)
        if size in cfg["mf_sizes"]:
            out: dict[str, Any] = {}

            def mf_run(
                _: Any = None,
                out: dict[str, Any] = out,
                args: tuple[Problem, Tensor, Tensor] = (problem, z, g),
            ) -> None:
                out["u"], out["vjps"] = _matrix_free(*args)

            times = []
            for _ in range(cfg["repeats"]):
                t0 = time.perf_counter()
                mf_run()
                synchronize(ctx.device)
                times.append(time.perf_counter() - t0)
            memory = _peak(mf_run, ctx)
            agree = None
            if u_dense is not None:
                agree = float((out["u"] - u_dense).norm() / u_dense.norm())
            suite.add(
                kind="matrix_free",
                size=size,
                n=n,
                time_s=float(np.median(times)),
                time_samples_s=times,
                vjps=out["vjps"],
                relative_difference_to_dense=agree,
                **memory,
            )
    _extrapolate_remaining(suite, dense_pts)
    _summarise(ctx, suite)
    return suite


def _extrapolate(points: list[dict[str, Any]], n: int) -> dict[str, Any] | None:
    """Predicted dense time and memory at ``n`` from the measured points (None if < 2)."""
    pts = [p for p in points if not p["extrapolated"]]
    if len(pts) < 2:
        return None
    pts = pts[-3:]
    ns = [p["n"] for p in pts]
    a_j, b_j = _fit(ns, [p["jacobian_time_s"] for p in pts])
    a_s, b_s = _fit(ns, [max(p["solve_time_s"], 1e-6) for p in pts])
    # Exponents are bounded by theory: n VJPs of O(n) work, and an O(n^3) factorisation.
    t_jac = a_j * n**b_j
    t_solve = a_s * n**b_s
    t_solve_cubic = pts[-1]["solve_time_s"] * (n / pts[-1]["n"]) ** 3
    element = pts[-1]["jacobian_bytes"] / pts[-1]["n"] ** 2
    return {
        "jacobian_time_s": t_jac,
        "solve_time_s": max(t_solve, t_solve_cubic),
        "time_s": t_jac + max(t_solve, t_solve_cubic),
        "jacobian_bytes": int(element * n * n),
        "peak_bytes_estimate": int(3 * element * n * n),
        "fit": {"jacobian_exponent": b_j, "solve_exponent": b_s},
    }


def _extrapolate_remaining(suite: SuiteResult, points: list[dict[str, Any]]) -> None:
    """Refit the extrapolated records on all measured points (the final, best estimate)."""
    for rec in suite.records:
        if rec["kind"] == "dense" and rec["extrapolated"]:
            est = _extrapolate(points, rec["n"])
            if est is not None:
                rec.update(est)


def _summarise(ctx: SuiteContext, suite: SuiteResult) -> None:
    dense = {r["n"]: r for r in suite.records if r["kind"] == "dense"}
    free = {r["n"]: r for r in suite.records if r["kind"] == "matrix_free"}
    rows = []
    for n in sorted(set(dense) | set(free)):
        d, m = dense.get(n), free.get(n)
        size = (d or m or {})["size"]
        rows.append(
            [
                f"{size}x{size}x3",
                f"{n:,}",
                "-"
                if d is None
                else fmt(d["jacobian_time_s"]) + (" (est.)" if d["extrapolated"] else ""),
                "-" if d is None else fmt(d["solve_time_s"]),
                "-" if d is None else mib(d.get("peak_bytes") or d.get("peak_bytes_estimate")),
                "-" if d is None else mib(d["jacobian_bytes"]),
                "-" if m is None else fmt(m["time_s"]),
                "-" if m is None else str(m["vjps"]),
                "-" if m is None else mib(m["peak_bytes"]),
                "-" if m is None else fmt(m["relative_difference_to_dense"]),
            ]
        )
    suite.tables.append(
        (
            "Computing u = (I - J^T)^{-1} g for one image (float32; est. = extrapolated, not run)",
            [
                "image",
                "n",
                "dense: jacobian s",
                "dense: solve s",
                "dense: peak MiB",
                "dense: J MiB",
                "matrix-free s",
                "VJPs",
                "matrix-free peak MiB",
                "rel. diff. to dense u",
            ],
            rows,
        )
    )
    measured = [r for r in dense.values() if not r["extrapolated"]]
    if measured:
        near = min(measured, key=lambda r: abs(r["n"] - PAPER_N))
        suite.notes.append(
            f"The paper inverted a {PAPER_N} x {PAPER_N} system in {PAPER_SECONDS} s. Here the "
            f"dense route at n = {near['n']:,} took {fmt(near['time_s'])} s "
            f"({fmt(near['jacobian_time_s'])} s forming J by {near['n']:,} VJPs, "
            f"{fmt(near['solve_time_s'])} s solving)"
            + (
                f"; the matrix-free adjoint solve at the same size took "
                f"{fmt(free[near['n']]['time_s'])} s."
                if near["n"] in free
                else "."
            )
        )
    largest = max(free.values(), key=lambda r: r["n"]) if free else None
    if largest is not None and largest["n"] in dense:
        d = dense[largest["n"]]
        suite.notes.append(
            f"At n = {largest['n']:,} the matrix-free solve took {fmt(largest['time_s'])} s "
            f"({largest['vjps']} VJPs, peak {mib(largest['peak_bytes'])} MiB); the dense route "
            f"is {'estimated' if d['extrapolated'] else 'measured'} at {fmt(d['time_s'])} s "
            f"and a {mib(d['jacobian_bytes'])} MiB Jacobian."
        )
    suite.notes.append(
        "Dense: torch.func.jacrev (chunked vmap of VJPs) then torch.linalg.solve(I - J^T, g). "
        "Matrix-free: ImplicitDifferentiation(Anderson(rtol=1e-6)).adjoint with VJPs from "
        "autograd. Extrapolation: power laws t = a n^b fitted to the last three measured sizes, "
        "the solve never below cubic growth; memory = 3 n^2 floats (J, I - J^T, LU)."
    )
    fig, axes = figure(2, width=5.0)
    for key, label, style in (
        ("jacobian_time_s", "dense: form J", "s-"),
        ("solve_time_s", "dense: solve", "^-"),
        ("time_s", "dense: total", "o-"),
    ):
        for extrap, ls in ((False, style), (True, "--")):
            pts = sorted((n, r[key]) for n, r in dense.items() if r["extrapolated"] is extrap)
            if pts:
                axes[0].loglog(
                    *zip(*pts, strict=True), ls, label=label + (" (est.)" if extrap else "")
                )
    if free:
        pts = sorted((n, r["time_s"]) for n, r in free.items())
        axes[0].loglog(*zip(*pts, strict=True), "o-", color="k", label="matrix-free")
    axes[0].axvline(PAPER_N, color="grey", lw=0.8, ls=":")
    axes[0].set_xlabel("unknowns n = 3 s^2")
    axes[0].set_ylabel("seconds")
    axes[0].legend(fontsize=7)
    mem_d = sorted(
        (n, (r.get("peak_bytes") or r.get("peak_bytes_estimate") or 0) / 2**20)
        for n, r in dense.items()
    )
    axes[1].loglog(*zip(*mem_d, strict=True), "o--", label="dense (measured / est.)")
    if free:
        mem_f = sorted((n, (r["peak_bytes"] or 0) / 2**20) for n, r in free.items())
        axes[1].loglog(*zip(*mem_f, strict=True), "o-", color="k", label="matrix-free")
    axes[1].set_xlabel("unknowns n")
    axes[1].set_ylabel("peak MiB")
    axes[1].legend(fontsize=7)
    suite.plots.append(save(fig, ctx.out, "dense_vs_matrix_free.png"))
