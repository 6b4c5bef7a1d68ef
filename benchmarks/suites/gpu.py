"""Suite 7: GPU throughput of DE-GRAD at 128 x 128 (CUDA only; skipped with a reason elsewhere).

For batch sizes 16..128 and three precisions (float32 with TF32 off, TF32 convolutions and
matmuls, bfloat16 autocast), the forward solve and a JFB training step of the DE-GRAD cell
with a paper-sized contractive DnCNN (depth 17, width 64):

* images per second and achieved TFLOP/s, timed with CUDA events after warm-up, median of
  repeats;
* FLOPs counted analytically from the operator shapes by ``torch.utils.flop_counter``
  (convolutions and matmuls: the DnCNN, the blur and its adjoint), per actual run;
* the card's measured peak per precision (a large matmul), to give a fraction of peak;
* peak memory from ``torch.cuda.max_memory_allocated``.

The solve runs a fixed number of Anderson iterations (``atol=1e-30, rtol=0``) so precisions
and batch sizes do the same work; the relative residual reached is recorded alongside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import implicitlayers as il

from .._memory import cuda_peak_bytes
from .._plots import figure, save
from .._problems import Problem, Unavailable, degrad_problem
from .._report import fmt, mib
from .._timing import measure
from .._types import SuiteContext, SuiteResult, skipped
from ._shared import relative_residual

NAME = "gpu"
TITLE = "GPU throughput (DE-GRAD 128x128)"
PRECISIONS = ("float32", "tf32", "bf16-autocast")


def _config(ctx: SuiteContext) -> dict[str, Any]:
    if ctx.quick:
        return {
            "size": 32,
            "batches": [2, 4],
            "depth": 5,
            "width": 16,
            "iterations": 5,
            "repeats": 1,
            "peak_n": 1024,
        }
    return {
        "size": 128,
        "batches": [16, 32, 64, 128],
        "depth": 17,
        "width": 64,
        "iterations": 20,
        "repeats": 5,
        "peak_n": 8192,
    }


@contextlib.contextmanager
def precision(name: str, device: torch.device) -> Iterator[None]:
    """Set TF32 flags and autocast for one precision, restoring the flags afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        if name == "bf16-autocast":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def peak_tflops(name: str, device: torch.device, n: int, repeats: int) -> float:
    """The card's measured matmul throughput in TFLOP/s for one precision."""
    dtype = torch.bfloat16 if name == "bf16-autocast" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with precision("tf32" if name == "tf32" else "float32", device):
        timing = measure(lambda _: a @ b, device=device, repeats=repeats, warmup=3)
    return 2 * n**3 / timing.median / 1e12


def _flops(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _solver(iterations: int) -> il.AbstractSolver:
    return il.Anderson(max_iter=iterations, atol=1e-30, rtol=0.0)


def measure_config(
    ctx: SuiteContext, problem: Problem, prec: str, cfg: dict[str, Any]
) -> list[dict[str, Any]]:
    """Forward solve and JFB training step of one problem at one precision."""
    batch = problem.z0.shape[0]
    deq = il.DEQ(problem.cell, solver=_solver(cfg["iterations"]), backward=il.JFB())
    weight = torch.ones_like(problem.z0)

    def solve(_: Any = None) -> Any:
        with torch.no_grad(), precision(prec, ctx.device):
            return deq(*problem.inputs, z0=problem.z0)

    def step(_: Any = None) -> None:
        problem.cell.zero_grad(set_to_none=True)
        with precision(prec, ctx.device):
            z, _ = deq(*problem.inputs, z0=problem.z0)
            loss = (z.float() * weight).mean()
        loss.backward()

    out = []
    for kind, fn in (("forward_solve", solve), ("training_step", step)):
        timing = measure(fn, device=ctx.device, repeats=cfg["repeats"], warmup=2)
        flops = _flops(fn)
        memory = cuda_peak_bytes(fn, ctx.device) if ctx.is_cuda else None
        record: dict[str, Any] = {
            "kind": kind,
            "precision": prec,
            "batch": batch,
            "size": problem.info["size"],
            **timing.as_dict(),
            "images_per_s": batch / timing.median,
            "flops": flops,
            "tflops_per_s": flops / timing.median / 1e12,
            "peak_bytes": memory,
        }
        if kind == "forward_solve":
            z, result = solve()
            record["relative_residual"] = relative_residual(problem, z.float())
            record["n_f_evals"] = result.n_f_evals
        out.append(record)
    return out


def run(ctx: SuiteContext) -> SuiteResult:
    """Run the suite (CUDA only)."""
    cfg = _config(ctx)
    if not ctx.is_cuda:
        return skipped(
            NAME,
            TITLE,
            f"needs a CUDA device; this run is on {ctx.device} "
            f"(torch.cuda.is_available() = {torch.cuda.is_available()})",
            **cfg,
        )
    return run_on(ctx, cfg)


def run_on(ctx: SuiteContext, cfg: dict[str, Any]) -> SuiteResult:
    """The measurements themselves, on ``ctx.device`` (any device, for testing the code)."""
    suite = SuiteResult(name=NAME, title=TITLE, config=dict(cfg))
    peaks = {p: peak_tflops(p, ctx.device, cfg["peak_n"], cfg["repeats"]) for p in PRECISIONS}
    suite.add(kind="peak", **{f"peak_tflops_{p}": v for p, v in peaks.items()})
    for batch in ctx.bar(cfg["batches"], "gpu"):
        try:
            problem = degrad_problem(
                batch=batch,
                size=cfg["size"],
                device=ctx.device,
                depth=cfg["depth"],
                width=cfg["width"],
            )
        except Unavailable as err:
            return skipped(NAME, TITLE, str(err), **cfg)
        for prec in PRECISIONS:
            try:
                for record in measure_config(ctx, problem, prec, cfg):
                    record["fraction_of_peak"] = record["tflops_per_s"] / peaks[prec]
                    suite.add(**record)
            except torch.cuda.OutOfMemoryError as err:
                suite.add(kind="oom", batch=batch, precision=prec, error=str(err).splitlines()[0])
            if ctx.is_cuda:
                torch.cuda.empty_cache()
        del problem
    _summarise(ctx, suite, peaks)
    return suite


def _summarise(ctx: SuiteContext, suite: SuiteResult, peaks: dict[str, float]) -> None:
    suite.tables.append(
        (
            "Measured matmul peak (TFLOP/s)",
            list(peaks),
            [[fmt(v) for v in peaks.values()]],
        )
    )
    rows = [
        [
            r["kind"],
            r["precision"],
            str(r["batch"]),
            fmt(r["time_s"] * 1e3),
            fmt(r["images_per_s"]),
            fmt(r["tflops_per_s"]),
            fmt(r["fraction_of_peak"]),
            mib(r["peak_bytes"]),
            fmt(r.get("relative_residual")),
        ]
        for r in suite.records
        if r["kind"] in ("forward_solve", "training_step")
    ]
    suite.tables.append(
        (
            f"DE-GRAD {suite.config['size']}x{suite.config['size']}, DnCNN depth "
            f"{suite.config['depth']} width {suite.config['width']}, {suite.config['iterations']} "
            "Anderson iterations",
            [
                "work",
                "precision",
                "batch",
                "ms",
                "images/s",
                "TFLOP/s",
                "of peak",
                "peak MiB",
                "rel. residual",
            ],
            rows,
        )
    )
    ooms = [r for r in suite.records if r["kind"] == "oom"]
    if ooms:
        suite.notes.append(
            "Out of memory: " + ", ".join(f"batch {r['batch']} {r['precision']}" for r in ooms)
        )
    suite.notes.append((__doc__ or "").split("\n\n", 1)[1].strip())
    fig, axes = figure(2, width=5.0)
    for ax, kind in zip(axes, ("forward_solve", "training_step"), strict=True):
        for prec in PRECISIONS:
            recs = [r for r in suite.records if r["kind"] == kind and r["precision"] == prec]
            if recs:
                ax.plot(
                    [r["batch"] for r in recs], [r["images_per_s"] for r in recs], "o-", label=prec
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("images / s")
        ax.set_title(kind.replace("_", " "), fontsize=9)
        ax.legend(fontsize=8)
    suite.plots.append(save(fig, ctx.out, "gpu_throughput.png"))
