r"""What ``il.SHINE`` saves in the backward pass, and what its gradient is worth.

For each problem and forward solver (Broyden, Anderson: both hand their inverse estimate to
the backward pass), one forward solve, then the parameter gradient of a loss by each rule:
JFB, Neumann (5 terms), ``ImplicitDifferentiation`` (GMRES, the library's default adjoint
solver), ``SHINE()`` (the estimate as the adjoint, checked, falling back to GMRES) and
``SHINE(refine=True)`` (the estimate as GMRES's preconditioner), and ``SHINE`` with the check
switched off (``max_residual=1e9``: the estimate's own gradient). Recorded per rule: the
backward's wall time (median of ``--repeats``, the rules interleaved), the adjoint's VJPs,
the cosine of the parameter gradient to the exact one, and per sample the adjoint's relative
error. The exact gradient: the same problem in float64, the forward solved to ``rtol=1e-10``
and the adjoint by GMRES to ``rtol=1e-11``::

    python -m benchmarks.reuse_shine                  # gradients, then training
    python -m benchmarks.reuse_shine gradients --repeats 5
    python -m benchmarks.reuse_shine training --seconds 40

Problems: ``tanh-conv`` (the standard conv DEQ layer of ``benchmarks/_problems.py``,
8 channels of 16x16, batch 8, random target), ``DE-GRAD`` (the deblurring cell with a small
DnCNN, depth 4, width 16, 32x32 images, batch 2, the loss its reconstruction error) and
``digits`` (the gallery's classifier after two epochs of JFB training, eval mode, 64 test
images, cross-entropy). ``training``: the digits classifier trained for the same wall time by
JFB, SHINE and implicit differentiation (epochs interleaved), then its test accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import implicitlayers as il
from implicitlayers.backward import SHINEResult

from . import _digits, _problems
from ._env import environment

CPU = torch.device("cpu")
RULES: dict[str, il.backward.AbstractBackward] = {
    "JFB": il.JFB(),
    "Neumann(5)": il.Neumann(terms=5),
    "GMRES": il.ImplicitDifferentiation(),
    "SHINE": il.SHINE(),
    "SHINE refine": il.SHINE(refine=True),
    # The estimate as the adjoint whatever its residual: what it is worth without the check.
    "SHINE unchecked": il.SHINE(max_residual=1e9),
}
SOLVERS = {
    "Broyden": il.Broyden(max_iter=100, rtol=1e-4),
    "Anderson": il.Anderson(max_iter=100, rtol=1e-4),
}
EXACT_SOLVER = il.Anderson(max_iter=3000, rtol=1e-10, atol=0.0, history_size=10)
EXACT_RULE = il.ImplicitDifferentiation(
    solver=il.GMRES(max_iter=3000, rtol=1e-11, atol=0.0, restart=60), on_unconverged="ignore"
)


@dataclass
class Case:
    r"""A DEQ problem with a loss on the fixed point :math:`z^\star` of ``cell(z, *inputs)``:
    :math:`\tfrac12 \|z^\star - t\|^2` (no ``head``), or the cross-entropy of
    ``head(z*)`` and ``labels``."""

    name: str
    cell: nn.Module
    inputs: tuple[Tensor, ...]
    z0: Tensor
    target: Tensor | None = None
    head: nn.Module | None = None
    labels: Tensor | None = None

    def loss(self, z: Tensor) -> Tensor:
        if self.head is None:
            assert self.target is not None
            return 0.5 * ((z - self.target) ** 2).sum()
        assert self.labels is not None
        return nn.functional.cross_entropy(self.head(z), self.labels, reduction="sum")

    def double(self) -> Case:
        """The case in float64 (copies)."""
        return Case(
            self.name,
            copy.deepcopy(self.cell).double(),
            tuple(x.double() for x in self.inputs),
            self.z0.double(),
            None if self.target is None else self.target.double(),
            None if self.head is None else copy.deepcopy(self.head).double(),
            self.labels,
        )


def conv_case() -> Case:
    problem = _problems.tanh_conv_problem(batch=8, channels=8, size=16, device=CPU)
    target = torch.randn(problem.z0.shape, generator=torch.Generator().manual_seed(7))
    return Case("tanh-conv 8x16x16", problem.cell, problem.inputs, problem.z0, target)


def degrad_case() -> Case:
    problem = _problems.degrad_problem(batch=2, size=32, device=CPU, depth=4, width=16)
    # The clean images degrad_problem blurred: its first draw from the generator seeded 1.
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(problem.z0.shape, generator=gen) * 2 - 1
    return Case("DE-GRAD 32x32", problem.cell, problem.inputs, problem.z0, clean)


def digits_case() -> Case:
    """The classifier after two epochs of JFB training, in eval mode; its head and the labels
    make the loss."""
    data = _digits.load_digits()
    settings = _digits.DigitsSettings()
    model, optimizer = _digits.make(settings, solver=il.Anderson(max_iter=30, rtol=1e-3))
    for _ in range(2):
        for images, labels, _keys in _digits.loader(data, settings, seed=0):
            _digits.train_step(model, optimizer, images, labels, None)
    model.eval()
    images, labels = data.test_images[:64], data.test_labels[:64]
    with torch.no_grad():
        x = model.stem(images)
    return Case(
        "digits classifier", model.cell, (x,), torch.zeros_like(x), head=model.head, labels=labels
    )


def _gradient(
    case: Case, solver: il.solvers.AbstractSolver, rule: il.backward.AbstractBackward
) -> tuple[Tensor, float, il.SolverResult, il.SolverResult | None]:
    """The flat parameter gradient, the backward's seconds, the forward's and the adjoint's
    results."""
    deq = il.DEQ(case.cell, solver=solver, backward=rule)
    params = [p for p in case.cell.parameters() if p.requires_grad]
    z, result = deq(*case.inputs, z0=case.z0)
    loss = case.loss(z)
    start = time.perf_counter()
    grads = torch.autograd.grad(loss, params)
    seconds = time.perf_counter() - start
    flat = torch.cat([g.flatten() for g in grads]).double()
    return flat, seconds, result, deq.last_backward_result


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(nn.functional.cosine_similarity(a, b, dim=0))


def _relative_error(u: Tensor, exact: Tensor) -> list[float]:
    u, exact = u.double().flatten(1), exact.flatten(1)
    errors: list[float] = ((u - exact).norm(dim=1) / exact.norm(dim=1)).tolist()
    return errors


def gradients(repeats: int, builds: tuple[Any, ...] | None = None) -> list[dict[str, Any]]:
    """The rows of every problem (``builds``: the case builders, default all three), forward
    solver and rule."""
    rows = []
    for build in builds or (conv_case, degrad_case, digits_case):
        case = build()
        exact, _, exact_fwd, exact_adj = _gradient(case.double(), EXACT_SOLVER, EXACT_RULE)
        assert exact_adj is not None
        print(
            f"{case.name}: exact forward converged {bool(exact_fwd.converged.all())} "
            f"({int(exact_fwd.n_steps.max())} steps), adjoint converged "
            f"{bool(exact_adj.converged.all())} ({exact_adj.n_f_evals} VJPs)",
            flush=True,
        )
        for solver_name, solver in SOLVERS.items():
            times: dict[str, list[float]] = {name: [] for name in RULES}
            last: dict[str, Any] = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", il.ConvergenceWarning)
                for repeat in range(repeats + 1):  # the first round warms up, not timed
                    for name, rule in RULES.items():
                        last[name] = _gradient(case, solver, rule)
                        if repeat:
                            times[name].append(last[name][1])
            for name in RULES:
                grad, _, forward, adjoint = last[name]
                row: dict[str, Any] = {
                    "problem": case.name,
                    "forward_solver": solver_name,
                    "rule": name,
                    "forward_steps": int(forward.n_steps.max()),
                    "forward_converged": float(forward.converged.float().mean()),
                    "backward_ms": 1e3 * statistics.median(times[name]),
                    "backward_ms_all": [1e3 * t for t in times[name]],
                    "vjps": _vjps(RULES[name], adjoint),
                    "cosine": _cosine(grad, exact),
                }
                if adjoint is not None:
                    row["adjoint_converged"] = float(adjoint.converged.float().mean())
                    row["adjoint_relative_error"] = _relative_error(adjoint.z, exact_adj.z)
                if isinstance(adjoint, SHINEResult):
                    assert adjoint.used_estimate is not None and adjoint.fell_back is not None
                    assert adjoint.estimate_residual is not None
                    row["used_estimate"] = adjoint.used_estimate.tolist()
                    row["fell_back"] = adjoint.fell_back.tolist()
                    row["estimate_residual"] = adjoint.estimate_residual.tolist()
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _vjps(rule: il.backward.AbstractBackward, adjoint: il.SolverResult | None) -> int:
    """VJPs of the adjoint (the one VJP that takes the adjoint to the parameters is not
    counted: every rule makes it)."""
    if adjoint is not None:
        return int(adjoint.n_f_evals)
    return rule.terms if isinstance(rule, il.Neumann) else 0


def _line(row: dict[str, Any]) -> str:
    text = (
        f"  {row['forward_solver']:8s} {row['rule']:15s} forward {row['forward_steps']:3d} "
        f"steps ({row['forward_converged']:.2f} conv), backward {row['backward_ms']:8.1f} ms, "
        f"{row['vjps']:3d} VJPs, cosine {row['cosine']:.5f}"
    )
    if "used_estimate" in row:
        rho = statistics.median(row["estimate_residual"])
        used = statistics.fmean(row["used_estimate"])
        text += f", estimate used {used:.2f}, median residual {rho:.3g}"
    return text


# --- Training at equal wall time ---------------------------------------------------------------


@dataclass
class _Arm:
    """One rule's run in :func:`training`."""

    model: _digits.Classifier
    optimizer: torch.optim.Optimizer
    elapsed: float = 0.0
    epochs: list[dict[str, float]] = field(default_factory=list)


def training(seconds: float, seed: int) -> dict[str, Any]:
    """The digits classifier trained by each rule for ``seconds`` of training time (epochs
    interleaved, each rule stops at the end of the epoch that reaches the budget)."""
    data = _digits.load_digits()
    settings = _digits.DigitsSettings(seed=seed)
    rules = {"JFB": il.JFB(), "SHINE": il.SHINE(), "GMRES": il.ImplicitDifferentiation()}
    arms = {}
    for name, rule in rules.items():
        model, optimizer = _digits.make(
            settings, solver=il.Broyden(max_iter=30, rtol=1e-3), backward=rule
        )
        arms[name] = _Arm(model, optimizer)
    epoch = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        while any(arm.elapsed < seconds for arm in arms.values()):
            epoch += 1
            for name, arm in arms.items():
                if arm.elapsed >= seconds:
                    continue
                used = fell = 0
                for images, labels, _keys in _digits.loader(data, settings, seed + epoch):
                    stats = _digits.train_step(arm.model, arm.optimizer, images, labels, None)
                    arm.elapsed += stats.seconds
                    report = arm.model.deq.last_backward_result
                    if isinstance(report, SHINEResult):
                        assert report.used_estimate is not None and report.fell_back is not None
                        used += int(report.used_estimate.sum())
                        fell += int(report.fell_back.sum())
                record = {
                    "epoch": epoch,
                    "seconds": arm.elapsed,
                    "accuracy": _digits.accuracy(arm.model, data),
                }
                if name == "SHINE":
                    record["estimate_used_fraction"] = used / (used + fell) if used + fell else 0.0
                arm.epochs.append(record)
                print(f"  {name:6s}", record, flush=True)
    return {
        "seconds": seconds,
        "seed": seed,
        "forward_solver": "Broyden(max_iter=30, rtol=1e-3)",
        "arms": {name: arm.epochs for name, arm in arms.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", nargs="?", default="all", choices=("gradients", "training", "all"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reuse_shine.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["environment"] = environment(CPU)
    results.setdefault("commands", {})
    command = " ".join(["python -m benchmarks.reuse_shine", *sys.argv[1:]])
    if args.part in ("gradients", "all"):
        results["gradients"] = gradients(args.repeats)
        results["commands"]["gradients"] = command
        args.out.write_text(json.dumps(results, indent=1))
    if args.part in ("training", "all"):
        results["training"] = training(args.seconds, args.seed)
        results["commands"]["training"] = command
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
