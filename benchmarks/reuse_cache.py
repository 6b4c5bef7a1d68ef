r"""What ``il.FixedPointCache`` saves: forward iterations and wall time, at equal quality.

Three workloads, each measured with and without the cache in one process, the arms
interleaved (one epoch, or one sequence step, of each in turn, the order rotated), so that a
shared machine's load affects them alike::

    python -m benchmarks.reuse_cache digits     # training: the same samples every epoch
    python -m benchmarks.reuse_cache video      # a trained classifier on shifting digits
    python -m benchmarks.reuse_cache bratu      # a continuation in the Bratu parameter
    python -m benchmarks.reuse_cache all --out benchmarks/results/reuse_cache.json

- ``digits``: the gallery's MDEQ digits classifier (``benchmarks/_digits.py``), Anderson
  ``max_iter=30, rtol=1e-3``, JFB, Adam with the gallery's settings, keys = dataset indices.
  Arms: no cache; the cache (with its residual check); the cache without the check. Per
  epoch: test accuracy, forward iterations per sample, ``f`` evaluations per training step
  (the solve's and the check's), and the training time.
- ``video``: the classifier trained (without the cache) for the ``digits`` epochs, then
  applied in eval mode to sequences of test digits shifted by a fraction of a pixel per frame
  (a slowly changing input, as consecutive video frames); the cache is keyed by sequence, so
  each frame starts from the previous frame's fixed point (DEQ-Flow's warm start). The DEQ
  runs with ``independent_samples=True`` (valid in eval mode), so a batch costs the sum of
  its samples' iterations and the time shows what the cache saves.
- ``bratu``: the Bratu-Gelfand problem :math:`-\Delta u = \lambda (e^u + s)` on the unit
  square (zero boundary, :math:`31 \times 31` interior grid, a smooth source :math:`s` per
  path), as the fixed point :math:`u = \lambda (-\Delta_h)^{-1} (e^u + s)`, followed along
  :math:`\lambda` from 0.5 to 5.5 in 40 steps for 8 paths; the cache is keyed by path, so
  each step starts from the last step's solution (natural-parameter continuation).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import implicitlayers as il

from . import _digits
from ._env import environment

DIGITS_SOLVER = il.Anderson(max_iter=30, rtol=1e-3)
ARMS = ("no cache", "cache", "cache, no check")
#: The first seed's classifier, trained without the cache by ``digits``, for ``video``.
TRAINED = Path(tempfile.gettempdir()) / "reuse_digits_trained.pt"


def _cache(arm: str) -> il.FixedPointCache | None:
    if arm == "no cache":
        return None
    return il.FixedPointCache(check=arm == "cache")


# --- Digits training ------------------------------------------------------------------------


def digits(
    epochs: int,
    seeds: tuple[int, ...],
    target: float,
    train_size: int | None = None,
    trained: Path = TRAINED,
) -> dict[str, Any]:
    """Training with each arm; the first seed's classifier without the cache is saved to
    ``trained`` for :func:`video`."""
    data = _digits.load_digits(train_size=train_size)
    settings = _digits.DigitsSettings()
    runs: dict[str, list[list[dict[str, float]]]] = {arm: [] for arm in ARMS}
    model_0 = None
    for seed in seeds:
        models = {}
        for arm in ARMS:
            model, optimizer = _digits.make(
                replace(settings, seed=seed),
                solver=DIGITS_SOLVER,
                backward=il.JFB(),
                cache=_cache(arm),
            )
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
            models[arm] = (model, optimizer, schedule, _digits.loader(data, settings, seed))
            runs[arm].append([])
        for epoch in range(1, epochs + 1):
            order = ARMS[epoch % len(ARMS) :] + ARMS[: epoch % len(ARMS)]
            for arm in order:
                model, optimizer, schedule, batches = models[arm]
                stats = [
                    _digits.train_step(model, optimizer, images, labels, keys)
                    for images, labels, keys in batches
                ]
                schedule.step()
                record = {
                    "epoch": epoch,
                    "accuracy": _digits.accuracy(model, data),
                    "iterations": statistics.fmean(s.iterations for s in stats),
                    "converged": statistics.fmean(s.converged for s in stats),
                    "f_evals_per_step": statistics.fmean(s.f_evals for s in stats),
                    "check_evals_per_step": statistics.fmean(s.check_evals for s in stats),
                    "hit_fraction": sum(s.hits for s in stats) / len(data.train_labels),
                    "rejected_fraction": sum(s.worse for s in stats) / len(data.train_labels),
                    "seconds": sum(s.seconds for s in stats),
                }
                runs[arm][-1].append(record)
                print(f"seed {seed} epoch {epoch} {arm:16s}", _fmt(record), flush=True)
        if seed == seeds[0]:
            model_0 = models["no cache"][0]
    assert model_0 is not None
    torch.save(model_0.state_dict(), trained)
    return {"runs": runs, "summary": _digits_summary(runs, target), "target": target}


def _digits_summary(
    runs: dict[str, list[list[dict[str, float]]]], target: float
) -> list[dict[str, Any]]:
    rows = []
    for arm, seeds in runs.items():
        later = [r for run in seeds for r in run if r["epoch"] >= 2]
        reached = []
        for run in seeds:
            elapsed = 0.0
            for r in run:
                elapsed += r["seconds"]
                if r["accuracy"] >= target:
                    reached.append(elapsed)
                    break
        rows.append(
            {
                "arm": arm,
                "iterations_epoch1": statistics.fmean(run[0]["iterations"] for run in seeds),
                "iterations_later": statistics.fmean(r["iterations"] for r in later),
                "iterations_final_epoch": statistics.fmean(run[-1]["iterations"] for run in seeds),
                "converged_later": statistics.fmean(r["converged"] for r in later),
                "hit_fraction_later": statistics.fmean(r["hit_fraction"] for r in later),
                "f_evals_later": statistics.fmean(
                    r["f_evals_per_step"] + r["check_evals_per_step"] for r in later
                ),
                "seconds_per_epoch_later": statistics.median(r["seconds"] for r in later),
                "final_accuracy": statistics.fmean(run[-1]["accuracy"] for run in seeds),
                "final_accuracies": [run[-1]["accuracy"] for run in seeds],
                "time_to_target": statistics.median(reached) if reached else None,
                "runs_reaching_target": len(reached),
            }
        )
    return rows


# --- A trained classifier on a slowly changing input ---------------------------------------


def _shift(images: Tensor, pixels: float) -> Tensor:
    """``images`` moved right by ``pixels`` (bilinear, zeros shifted in)."""
    batch = images.shape[0]
    theta = torch.tensor([[1.0, 0.0, -2 * pixels / images.shape[-1]], [0.0, 1.0, 0.0]])
    grid = torch.nn.functional.affine_grid(
        theta.expand(batch, 2, 3), list(images.shape), align_corners=False
    )
    return torch.nn.functional.grid_sample(images, grid, align_corners=False)


def video(
    frames: int, step: float, rtol: float, sequences: int = 128, trained: Path = TRAINED
) -> dict[str, Any]:
    data = _digits.load_digits()
    settings = _digits.DigitsSettings()
    model, _ = _digits.make(settings, solver=DIGITS_SOLVER, backward=il.JFB())
    if not trained.exists():
        raise SystemExit(f"{trained} is missing: run the digits part first")
    model.load_state_dict(torch.load(trained, weights_only=True))
    model.eval()
    # In eval mode the cell treats samples independently (GroupNorm, no dropout): a sample
    # that has converged stops costing evaluations, so fewer iterations show in the time.
    model.deq.independent_samples = True
    solver = il.Anderson(max_iter=100, rtol=rtol)
    images = data.test_images[:sequences]
    keys = torch.arange(len(images))
    caches = {arm: _cache(arm) for arm in ARMS}
    totals = {arm: _totals() for arm in ARMS}
    worst = worst_converged = 0.0
    agree = 0
    with torch.no_grad():
        for t in range(frames):
            frame = _shift(images, t * step)
            x = model.stem(frame)
            order = ARMS[t % 3 :] + ARMS[: t % 3]
            outs = {}
            for arm in order:
                cache = caches[arm]
                model.deq.cache = cache
                checks = 0 if cache is None else cache.stats.check_evaluations
                start = time.perf_counter()
                out = model.deq(x, solver=solver, keys=None if cache is None else keys)
                totals[arm]["seconds"] += time.perf_counter() - start
                totals[arm]["iterations"] += float(out.result.n_steps.float().mean()) / frames
                totals[arm]["f_evals"] += out.result.n_f_evals
                totals[arm]["converged"] += float(out.result.converged.float().mean()) / frames
                if cache is not None:
                    totals[arm]["check_evals"] += cache.stats.check_evaluations - checks
                outs[arm] = out
            ref = outs["no cache"]
            labels = model.head(ref.z).argmax(1)
            for arm in ARMS[1:]:
                gap = (outs[arm].z - ref.z).flatten(1).norm(dim=1) / ref.z.flatten(1).norm(dim=1)
                both = outs[arm].result.converged & ref.result.converged
                worst = max(worst, float(gap.max()))
                if bool(both.any()):
                    worst_converged = max(worst_converged, float(gap[both].max()))
                agree += int((model.head(outs[arm].z).argmax(1) == labels).sum())
    model.deq.cache = None
    return {
        "frames": frames,
        "shift_per_frame": step,
        "rtol": rtol,
        "sequences": len(images),
        "totals": totals,
        "largest_relative_gap_to_no_cache": worst,
        "largest_relative_gap_where_both_converged": worst_converged,
        "prediction_agreement": agree / (2 * frames * len(images)),
    }


# --- Bratu continuation ----------------------------------------------------------------------


def _inverse_laplacian(n: int) -> Tensor:
    """:math:`(-\\Delta_h)^{-1}` on the ``n x n`` interior grid of the unit square (float64)."""
    h = 1.0 / (n + 1)
    one = torch.eye(n, dtype=torch.float64)
    off = torch.ones(n - 1, dtype=torch.float64)
    d2 = (2 * one - torch.diag(off, 1) - torch.diag(off, -1)) / h**2
    lap = torch.kron(d2, one) + torch.kron(one, d2)
    inverse: Tensor = torch.linalg.inv(lap)
    return inverse


def bratu(paths: int, steps: int, rtol: float) -> dict[str, Any]:
    n = 31
    inverse = _inverse_laplacian(n)
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 1, n + 2, dtype=torch.float64)[1:-1]
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    sources = torch.stack(
        [
            0.3
            * torch.sin(math.pi * float(torch.randint(1, 3, (1,), generator=gen)) * xx)
            * torch.sin(math.pi * float(torch.randint(1, 3, (1,), generator=gen)) * yy)
            for _ in range(paths)
        ]
    ).reshape(paths, n * n)

    def f(u: Tensor, lam: Tensor) -> Tensor:
        return lam[:, None] * ((torch.exp(u) + sources) @ inverse)

    solver = il.Anderson(max_iter=200, rtol=rtol, atol=0.0)
    caches = {arm: _cache(arm) for arm in ARMS}
    totals = {arm: _totals() for arm in ARMS}
    keys = list(range(paths))
    worst = 0.0
    converged = True
    for t, value in enumerate(torch.linspace(0.5, 5.5, steps).tolist()):
        lam = torch.full((paths,), value, dtype=torch.float64)
        z0 = torch.zeros(paths, n * n, dtype=torch.float64)
        results = {}
        for arm in ARMS[t % 3 :] + ARMS[: t % 3]:
            cache = caches[arm]
            checks = 0 if cache is None else cache.stats.check_evaluations
            start = time.perf_counter()
            result = il.fixed_point(
                f, z0, lam, solver=solver, cache=cache, keys=None if cache is None else keys
            )
            totals[arm]["seconds"] += time.perf_counter() - start
            totals[arm]["iterations"] += float(result.n_steps.float().mean()) / steps
            totals[arm]["converged"] += float(result.converged.float().mean()) / steps
            totals[arm]["f_evals"] += result.n_f_evals
            if cache is not None:
                totals[arm]["check_evals"] += cache.stats.check_evaluations - checks
            converged = converged and bool(result.converged.all())
            results[arm] = result
        ref = results["no cache"].z
        for arm in ARMS[1:]:
            gap = (results[arm].z - ref).norm(dim=1) / ref.norm(dim=1)
            worst = max(worst, float(gap.max()))
    return {
        "paths": paths,
        "steps": steps,
        "grid": n,
        "rtol": rtol,
        "totals": totals,
        "all_converged": converged,
        "largest_relative_gap_to_no_cache": worst,
    }


def _totals() -> dict[str, float]:
    """Per arm: mean iterations per sample and fraction converged (averaged over frames or
    steps), and the sums of ``f`` evaluations (solve, check) and seconds."""
    return {"iterations": 0.0, "converged": 0.0, "f_evals": 0, "check_evals": 0, "seconds": 0.0}


def _fmt(record: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("digits", "video", "bratu", "all"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reuse_cache.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.pop("machine", None)
    results["environment"] = environment(torch.device("cpu"))
    results.pop("command", None)
    commands = results.setdefault("commands", {})
    command = " ".join(["python -m benchmarks.reuse_cache", *sys.argv[1:]])
    if args.part in ("digits", "all"):
        commands["digits"] = command
        results["digits"] = digits(args.epochs, tuple(args.seeds), args.target)
        args.out.write_text(json.dumps(results, indent=1))
    if args.part in ("video", "all"):
        commands["video"] = command
        results["video"] = video(frames=16, step=0.15, rtol=1e-4)
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["video"], indent=1))
    if args.part in ("bratu", "all"):
        commands["bratu"] = command
        results["bratu"] = bratu(paths=8, steps=40, rtol=1e-8)
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["bratu"], indent=1))
    if "digits" in results:
        for row in results["digits"]["summary"]:
            print(row)


if __name__ == "__main__":
    main()
