"""Suite: the DEQ under torch.func transforms and torch.compile.

Three measurements, each against the alternative a user would otherwise write:

* per-sample gradients of a small MLP cell's parameters (batch 64): ``vmap(grad(loss))``,
  one folded solve of the whole batch and batched adjoints, against a Python loop of 64
  single-sample forwards and backwards;
* the Jacobian of the fixed point in a few inputs (a tall Jacobian: state of 256, inputs of
  4): ``jacfwd`` (4 tangent solves, batched) against ``jacrev`` (256 adjoint solves,
  batched);
* ``torch.compile`` of the whole DEQ on the sync-free path in one chunk (one graph): compile
  time, and the compiled forward's time against eager, for each solver.

Each pair is timed in the same process, alternating repeat by repeat (medians).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

import implicitlayers as il

from .._report import fmt
from .._types import SuiteContext, SuiteResult
from ._shared import SOLVER_NAMES, make_solver

NAME = "compose"
TITLE = "Transforms and compile: per-sample gradients, forward mode, compiled solves"


class _Cell(nn.Module):
    """:math:`\\tanh(W z + U x)` with :math:`\\|W\\|_2 = 0.5`."""

    def __init__(self, width: int, inputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.W = nn.Linear(width, width, bias=False)
        self.U = nn.Linear(inputs, width)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + self.U(x))


def _config(ctx: SuiteContext) -> dict[str, Any]:
    if ctx.quick:
        return {"batch": 8, "width": 16, "tall": 32, "repeats": 1, "compile_iters": 4}
    return {"batch": 64, "width": 64, "tall": 256, "repeats": 5, "compile_iters": 12}


def _alternate(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each run, alternated repeat by repeat after one warm-up each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {key: [] for key in runs}
    order = list(runs)
    for i in range(repeats):
        for key in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            runs[key]()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(v) for key, v in times.items()}


#: The rules of the per-sample table: JFB, and the exact rule with GMRES's default budget and a
#: budget of 40 products (under vmap the adjoint runs its whole budget: no host read).
_PER_SAMPLE_RULES = {
    "JFB": il.JFB(),
    "ImplicitDifferentiation(GMRES max_iter=200, the default)": il.ImplicitDifferentiation(),
    "ImplicitDifferentiation(GMRES max_iter=40)": il.ImplicitDifferentiation(
        solver=il.GMRES(max_iter=40, rtol=1e-6, atol=1e-10)
    ),
}


def _per_sample(ctx: SuiteContext, cfg: dict[str, Any], suite: SuiteResult) -> None:
    batch, width = cfg["batch"], cfg["width"]
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    rows = []
    for label, rule in _PER_SAMPLE_RULES.items():
        deq = il.DEQ(_Cell(width, width), solver=il.Anderson(rtol=1e-6), backward=rule)
        params = {k: v.detach() for k, v in deq.named_parameters()}

        def loss(
            p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor, deq: il.DEQ = deq
        ) -> torch.Tensor:
            z, _ = functional_call(deq, p, (xi[None],))
            return (z[0] - yi).pow(2).sum()

        def batched(
            loss: Any = loss, params: dict[str, torch.Tensor] = params
        ) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
            return out

        def loop(deq: il.DEQ = deq) -> list[torch.Tensor]:
            grads = []
            for i in range(batch):
                deq.zero_grad()
                z, _ = deq(x[i : i + 1])
                (z[0] - y[i]).pow(2).sum().backward()
                grads.append(deq.f.W.weight.grad.clone())
            return grads

        difference = float((batched()["f.W.weight"] - torch.stack(loop())).abs().max())
        times = _alternate({"vmap": batched, "loop": loop}, cfg["repeats"])
        record = suite.add(
            kind="per_sample",
            rule=label,
            batch=batch,
            width=width,
            vmap_s=times["vmap"],
            loop_s=times["loop"],
            speedup=times["loop"] / times["vmap"],
            max_abs_difference=difference,
        )
        rows.append(
            [
                label,
                fmt(times["vmap"] * 1e3),
                fmt(times["loop"] * 1e3),
                fmt(record["speedup"]),
                fmt(difference),
            ]
        )
    suite.tables.append(
        (
            f"Per-sample gradients, MLP cell {width}, batch {batch}: vmap(grad(loss)) against a "
            "loop of single-sample backward()",
            ["rule", "vmap (ms)", "loop (ms)", "speed-up", "max |difference|"],
            rows,
        )
    )


def _tall_jacobian(ctx: SuiteContext, cfg: dict[str, Any], suite: SuiteResult) -> None:
    width, inputs = cfg["tall"], 4
    deq = il.DEQ(
        _Cell(width, inputs), solver=il.Anderson(rtol=1e-8), backward=il.ImplicitDifferentiation()
    )
    x = torch.randn(inputs)

    z0 = torch.zeros(1, width)

    def solution(xi: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = deq(xi[None], z0=z0).z[0]
        return out

    forward = jacfwd(solution)(x)
    reverse = jacrev(solution)(x)
    difference = float((forward - reverse).detach().abs().max())
    times = _alternate(
        {"jacfwd": lambda: jacfwd(solution)(x), "jacrev": lambda: jacrev(solution)(x)},
        cfg["repeats"],
    )
    suite.add(
        kind="tall_jacobian",
        state=width,
        inputs=inputs,
        jacfwd_s=times["jacfwd"],
        jacrev_s=times["jacrev"],
        max_abs_difference=difference,
    )
    suite.tables.append(
        (
            f"Jacobian of the fixed point ({width} outputs, {inputs} inputs), exact rule",
            ["transform", "solves", "time (ms)", "max |jacfwd - jacrev|"],
            [
                ["jacfwd", str(inputs), fmt(times["jacfwd"] * 1e3), fmt(difference)],
                ["jacrev", str(width), fmt(times["jacrev"] * 1e3), "-"],
            ],
        )
    )


def _compiled(ctx: SuiteContext, cfg: dict[str, Any], suite: SuiteResult) -> None:
    iters = cfg["compile_iters"]
    x = torch.randn(cfg["batch"], cfg["width"])
    rows = []
    # --quick checks that the suite runs: one solver, compiled by dynamo alone.
    backend = "eager" if ctx.quick else "inductor"
    for name in SOLVER_NAMES[:1] if ctx.quick else SOLVER_NAMES:
        solver = make_solver(name, max_iter=iters, check_every=iters, rtol=1e-6)
        deq = il.DEQ(_Cell(cfg["width"], cfg["width"]), solver=solver, host_reads=False).eval()

        def eager(deq: il.DEQ = deq) -> torch.Tensor:
            with torch.no_grad():
                out: torch.Tensor = deq(x).z
            return out

        torch._dynamo.reset()
        compiled_deq = torch.compile(deq, backend=backend)

        def compiled(compiled_deq: Any = compiled_deq) -> torch.Tensor:
            with torch.no_grad():
                out: torch.Tensor = compiled_deq(x).z
            return out

        t0 = time.perf_counter()
        first = compiled()
        compile_s = time.perf_counter() - t0
        difference = float((first - eager()).abs().max())
        times = _alternate({"eager": eager, "compiled": compiled}, cfg["repeats"])
        suite.add(
            kind="compiled",
            solver=name,
            iterations=iters,
            compile_s=compile_s,
            eager_s=times["eager"],
            compiled_s=times["compiled"],
            max_abs_difference=difference,
        )
        rows.append(
            [
                name,
                fmt(compile_s),
                fmt(times["eager"] * 1e3),
                fmt(times["compiled"] * 1e3),
                fmt(times["eager"] / times["compiled"]),
                fmt(difference),
            ]
        )
    torch._dynamo.reset()
    suite.tables.append(
        (
            f"torch.compile of the whole DEQ, sync-free path in one chunk of {iters} iterations "
            f"(MLP cell {cfg['width']}, batch {cfg['batch']}, inference)",
            ["solver", "compile (s)", "eager (ms)", "compiled (ms)", "speed-up", "max |diff|"],
            rows,
        )
    )


def run(ctx: SuiteContext) -> SuiteResult:
    """Run the suite."""
    cfg = _config(ctx)
    suite = SuiteResult(name=NAME, title=TITLE, config=dict(cfg))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _per_sample(ctx, cfg, suite)
        _tall_jacobian(ctx, cfg, suite)
        _compiled(ctx, cfg, suite)
    suite.notes.append(
        "Each pair is timed in one process, alternating repeat by repeat (medians). Under a "
        "transform the exact rule's adjoint and tangent solves run their whole budget (no host "
        "read is possible on a batched tensor), which the per-sample and jacrev figures "
        "include."
    )
    return suite
