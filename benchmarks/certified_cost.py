r"""What a certificate costs: one forward (and backward) of a certified cell against an
unconstrained one, and the certificate itself, at a few widths.

Each configuration is timed in one process with the variants interleaved (one call of each in
turn, the order rotated at every repeat), and the medians reported, so that a shared
machine's load, and the memory a previous call released, affect all variants alike::

    python benchmarks/certified_cost.py                 # prints a Markdown table
    python benchmarks/certified_cost.py --widths 64 256 --batch 64 --repeats 30

Variants, on a dense cell of width ``n`` with ``d = 64`` inputs and a batch of ``B``:

- ``unconstrained``: ``il.DEQ(ReLU(W z + U x + b))``, Anderson, ``W`` scaled to
  :math:`\|W\|_2 = 0.9` (so that it converges);
- ``PR``: ``il.MonotoneDEQ(MonotoneLinear)`` with Peaceman-Rachford, ``certify=False``, its
  default backward rule (exact, Picard adjoint);
- ``PR, GMRES adjoint``: the same with ``ImplicitDifferentiation()``'s default GMRES adjoint,
  as the unconstrained cell;
- ``PR + certificate``: ``PR`` with the certificate computed at each forward;
- ``FB``: forward-backward at the certified step, ``certify=False``;
- ``certificate``: ``cell.certificate(...)`` alone.

All forward solves use ``rtol=1e-4``; all gradients are exact (adjoint ``rtol=1e-6``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import implicitlayers as il

MARGIN = 0.5


class Unconstrained(torch.nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.W = torch.nn.Linear(n, n, bias=False)
        self.U = torch.nn.Linear(d, n)
        with torch.no_grad():
            self.W.weight.mul_(0.9 / torch.linalg.matrix_norm(self.W.weight, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.W(z) + self.U(x))


Call = Callable[[torch.Tensor, bool], float]


def variants(d: int, n: int) -> dict[str, Call]:
    """Name -> one timed call ``call(x, backward)``: a forward (under ``no_grad`` unless
    ``backward``), then the backward of the summed output; returns the mean iterations per
    sample (0 for the certificate)."""
    torch.manual_seed(0)
    implicit = il.ImplicitDifferentiation()
    free = il.DEQ(
        Unconstrained(d, n), solver=il.Anderson(max_iter=100, rtol=1e-4), backward=implicit
    )
    cell = il.nn.MonotoneLinear(d, n, margin=MARGIN)
    pr = il.nn.PeacemanRachford(rtol=1e-4)
    fb = il.nn.ForwardBackward(rtol=1e-4, max_iter=2000)
    models: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, il.SolverResult]]] = {
        "unconstrained": lambda x: free(x, z0=x.new_zeros(len(x), n)),
        "PR": il.MonotoneDEQ(cell, solver=pr, certify=False),
        "PR, GMRES adjoint": il.MonotoneDEQ(cell, solver=pr, backward=implicit, certify=False),
        "PR + certificate": il.MonotoneDEQ(cell, solver=pr),
        "FB": il.MonotoneDEQ(cell, solver=fb, certify=False),
    }

    def timed(model: Callable[[torch.Tensor], tuple[torch.Tensor, il.SolverResult]]) -> Call:
        def call(x: torch.Tensor, backward: bool) -> float:
            with torch.set_grad_enabled(backward):
                z, result = model(x)
            if backward:
                z.sum().backward()
            return result.n_steps.float().mean().item()

        return call

    def certificate(x: torch.Tensor, backward: bool) -> float:
        cell.certificate((n,), pr)
        return 0.0

    return {**{name: timed(model) for name, model in models.items()}, "certificate": certificate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
        f"d = {args.inputs}, margin {MARGIN}, medians of {args.repeats} interleaved repeats\n"
    )
    print("| width n | variant | forward, ms | forward + backward, ms | iterations per sample |")
    print("|---:|---|---:|---:|---:|")
    for n in args.widths:
        calls = variants(args.inputs, n)
        x = torch.randn(args.batch, args.inputs)
        times = {(name, mode): [] for name in calls for mode in (False, True)}
        steps: dict[str, float] = {}
        order = list(times)
        for repeat in range(args.repeats + 2):
            # Rotate the order every repeat: a call right after a large backward pays for the
            # memory that backward released (page faults), whichever variant it is.
            shift = repeat % len(order)
            for name, backward in order[shift:] + order[:shift]:
                samples = times[name, backward]
                start = time.perf_counter()
                steps[name] = calls[name](x, backward)
                if repeat >= 2:  # two warm-up rounds
                    samples.append(time.perf_counter() - start)
        for name in calls:
            forward = 1000 * statistics.median(times[name, False])
            both = 1000 * statistics.median(times[name, True])
            if name == "certificate":
                print(f"| {n} | {name} | {forward:.2f} | | |")
            else:
                print(f"| {n} | {name} | {forward:.2f} | {both:.2f} | {steps[name]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
