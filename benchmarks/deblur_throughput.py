r"""Throughput of the DE-GRAD flagship's three phases in float32, channels_last and bf16.

For each preset's network and sizes (``small``: DnCNN 8 x 48 on 64 x 64 images; ``cpu128``:
the same network, 64 x 64 training crops, 128 x 128 test images; ``paper``: DnCNN 17 x 64 with
batch and spectral norm), images per second of

- **pretraining**: one step of the denoiser alone (forward, backward, Adam), batch 8;
- **DEQ training**: one step of the flagship's (the fixed-point solve from 10 Tikhonov-CG
  steps, then JFB's backward and Adam), batch 8, training crop size;
- **evaluation**: the solve alone (no autograd) on whole test images, batch 8;

with the solve forced to ``--iterations`` Anderson steps (``rtol=1e-30``), so that every variant
does the same work (the flagship stops at its tolerance instead: in float32 after 4 to 12
steps). Variants: ``fp32`` (the reference), ``channels_last`` (weights and images), ``bf16``
(``torch.autocast`` around ``f``; the solver's bookkeeping stays float32), ``bf16_cl`` (both).
The variants are measured side by side in one process, alternating repeat by repeat; each
figure is a median. The networks are freshly initialised: speed does not depend on the
weights. Run::

    python benchmarks/deblur_throughput.py --out runs/throughput [--presets small cpu128]
        [--variants fp32 channels_last bf16 bf16_cl] [--repeats 5] [--device cpu|cuda]

and it writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

import implicitlayers as il
from implicitlayers import imaging

#: Preset -> (depth, width, batch and spectral norm, training size, test size): the flagship's.
PRESETS = {"small": (8, 48, False, 64, 64), "cpu128": (8, 48, False, 64, 128)}
PRESETS["paper"] = (17, 64, True, 64, 128)
VARIANTS = ("fp32", "channels_last", "bf16", "bf16_cl")
PHASES = ("pretraining", "DEQ training", "evaluation")


def build(depth: int, width: int, norms: bool, device: torch.device) -> il.DEQ:
    """The flagship's standard cell (anchor 0.1) in a DEQ, in eval mode as it trains."""
    torch.manual_seed(0)
    net = imaging.DnCNN(3, depth, width, residual=True, batch_norm=norms, spectral_norm=norms)
    A = imaging.GaussianBlur(5, 5.0)
    cell = imaging.DEGRADCell(A, net, step_size=1.0, residual_regularizer=True, anchor_weight=0.1)
    return il.DEQ(cell, backward=il.JFB(), independent_samples=True).to(device).eval()


def phases(model: il.DEQ, variant: str, sizes: tuple[int, int], iters: int) -> dict[str, Any]:
    """One callable per phase for ``variant``; each returns the images it processed."""
    device = next(model.parameters()).device
    cl, low = variant in ("channels_last", "bf16_cl"), variant in ("bf16", "bf16_cl")
    fmt = torch.channels_last if cl else torch.contiguous_format
    cell, solver = (
        cast(imaging.DEGRADCell, model.f),
        il.Anderson(max_iter=iters, rtol=1e-30, atol=0.0, divergence_ratio=None),
    )
    denoiser = cell.regularizer
    opt = torch.optim.Adam(model.parameters(), 1e-4)  # steps are real, the weights irrelevant
    g = torch.Generator().manual_seed(0)
    images = {n: (torch.rand(8, 3, n, n, generator=g) * 2 - 1).to(device) for n in set(sizes)}

    def amp() -> Any:
        return torch.autocast(device.type, torch.bfloat16) if low else contextlib.nullcontext()

    def prepared(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.to(memory_format=fmt)  # type: ignore[call-overload]  # torch's stubs lack it
        x = images[n].contiguous(memory_format=fmt)
        d = cell.operator(x) + 0.01 * torch.randn_like(x)
        return x, d, cell.initial_point(d, method="cg")

    def pretrain() -> int:
        x, _, _ = prepared(sizes[0])
        denoiser.train()
        with amp():
            loss = F.mse_loss(denoiser(x + 0.05 * torch.randn_like(x)).float(), x)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()
        denoiser.eval()
        return len(x)

    def train_step() -> int:
        x, d, x0 = prepared(sizes[0])
        with amp():
            z = model(d, x0, z0=x0, solver=solver)[0]
        loss = F.mse_loss(z.float(), x)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()
        return len(x)

    def evaluate() -> int:
        _, d, x0 = prepared(sizes[1])
        with torch.no_grad(), amp():
            model(d, x0, z0=x0, solver=solver)
        return len(d)

    return dict(zip(PHASES, (pretrain, train_step, evaluate), strict=True))


def timed(fn: Callable[[], int], device: torch.device) -> float:
    """Images per second of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    n = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - tic)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every preset's phases in every variant, alternated repeat by repeat."""
    device = torch.device(args.device)
    results: dict[str, Any] = {"device": device.type, "torch": torch.__version__}
    results |= {"threads": torch.get_num_threads(), "iterations": args.iterations}
    results["presets"] = {}
    for preset in args.presets:
        depth, width, norms, *sizes = PRESETS[preset]
        model = build(depth, width, norms, device)
        calls = {v: phases(model, v, (sizes[0], sizes[1]), args.iterations) for v in args.variants}
        rates: dict[str, dict[str, list[float]]] = {p: {v: [] for v in calls} for p in PHASES}
        for phase in PHASES:
            for v in calls:  # warm-up
                calls[v][phase]()
            for r in range(args.repeats):
                order = list(calls) if r % 2 == 0 else list(reversed(calls))
                for v in order:
                    rates[phase][v].append(timed(calls[v][phase], device))
        results["presets"][preset] = {
            p: {v: statistics.median(r) for v, r in per.items()} for p, per in rates.items()
        }
    return results


def markdown(r: dict[str, Any]) -> str:
    """``results.md``: images per second and the ratio to float32, per preset and phase."""
    variants = list(next(iter(next(iter(r["presets"].values())).values())))
    lines = [
        "# DE-GRAD flagship throughput (images / s; ratio to fp32)",
        "",
        f"{r['device']}, {r['threads']} thread(s), torch {r['torch']}; the solve forced to "
        f"{r['iterations']} Anderson iterations; medians of alternating repeats.",
        "",
        "| preset | phase | " + " | ".join(variants) + " |",
        "|---|---|" + "---:|" * len(variants),
    ]
    for preset, per in r["presets"].items():
        for phase, rates in per.items():
            base = rates.get("fp32") or next(iter(rates.values()))
            cells = [f"{v:.2f} ({v / base:.2f}x)" for v in rates.values()]
            lines.append(f"| {preset} | {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure, write ``results.json`` and ``results.md``, print the table (the solves run out
    of iterations on purpose: the library's warning that bf16 cannot reach ``rtol`` is muted)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/throughput", help="output folder")
    parser.add_argument("--presets", nargs="+", default=["small", "cpu128"], choices=PRESETS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant")
    parser.add_argument("--iterations", type=int, default=8, help="Anderson steps per solve")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
