r"""The JFB paper's Table 2 (Liu, Tong & Zhao, 2024) for the DE-GRAD flagship, reproduced.

Rows: the measurement, Tikhonov-CG, TV (Chambolle-Pock) and Plug-and-Play with the pretrained
denoiser, each tuned on *validation* images only; then DE-GRAD trained with each backward rule
(``--rules``: JFB, a Neumann series, the phantom gradient, exact implicit differentiation).
The learned rows share the data, the measurements, one pretrained denoiser (their common
initialisation), the optimiser and the epochs (or, with ``--time-budget S``, S seconds of
training each); the rules are trained interleaved, one epoch of each in turn, so that a change
in machine load falls on all of them alike. The test split is read once, at the end.

Per row: PSNR in both conventions, SSIM; per learned row also forward iterations per test
image, the converged fraction, PSNR and convergence when solved on to ``--tight-rtol`` (a true
equilibrium changes by nothing), the spectral radius of :math:`J_T` at the fixed points, the
adjoint's convergence (implicit), VJPs per step (from the rule and the log), seconds per
epoch and training wall time (the ``sec_per_step`` the flagship logs). Written to
``--out``: ``results.json``, ``results.md`` (the paper's numbers beside ours) and
``reconstructions.png``.

Every setting is the flagship's (``examples/deblur_celeba.py``: one ``Settings`` dataclass,
the same flags and presets); this script adds only :class:`TableOptions`. Run it as
``python benchmarks/deblur_table.py [--data-dir DIR --preset paper] --out DIR``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import deblur_celeba as flagship  # noqa: E402
import torch  # noqa: E402
from deblur import cli, ddp, report, state  # noqa: E402
from deblur.cli import Command, arg  # noqa: E402
from deblur.data import TEST_SEED, image_seeds, load, make_splits, shard  # noqa: E402

from implicitlayers.backward import BACKWARDS  # noqa: E402
from implicitlayers.imaging import pnp_deblur, tv_deblur  # noqa: E402

logger = logging.getLogger("deblur")

#: Liu, Tong & Zhao (2024), Table 2 (CelebA 128x128): PSNR in the paper's convention, SSIM.
PAPER_TABLE = {"TV": (26.79, 0.86), "PnP": (29.77, 0.88), "DEQ, JFB": (26.88, 0.91)}
PAPER_TABLE["DEQ, exact gradients"] = (32.43, 0.94)
#: Our row -> the paper's Table 2 row.
PAPER_ROWS = {"tv": "TV", "pnp": "PnP", "jfb": "DEQ, JFB", "implicit": "DEQ, exact gradients"}
LABELS = {"tv": "TV (Chambolle-Pock)", "pnp": "Plug-and-Play (pretrained DnCNN)"}
LABELS |= {"jfb": "DEQ, JFB", "neumann": "DEQ, Neumann series", "phantom": "DEQ, phantom gradient"}
LABELS |= {"implicit": "DEQ, exact implicit gradients"}
#: The baselines' search spaces (tuned on validation images).
TV_LAMBDAS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
PNP_GRID = list(itertools.product((0.05, 0.1, 0.2, 0.5, 1.0), (1.0, 1.9), (10, 30, 60)))


@dataclass(frozen=True)
class TableOptions:
    """What the table adds to the flagship's settings."""

    out: str = arg("runs/deblur-table", "output folder")
    preset: str | None = arg(None, "the flagship's preset", choices=tuple(flagship.PRESETS))
    rules: tuple[str, ...] = arg(("jfb", "neumann", "implicit"), "rules", choices=tuple(BACKWARDS))
    time_budget: float | None = arg(None, "seconds of training per rule (default: the epochs)")
    turn_steps: int | None = arg(None, "steps per rule in turn (default: an epoch)", low=1)
    resume: bool = arg(False, "continue the run in --out")
    tune_limit: int = arg(64, "validation images the baselines are tuned on")
    no_progress: bool = arg(False, "hide progress bars")
    quiet: bool = arg(False, "print only warnings and the table")


def baselines(A: Any, d: torch.Tensor, denoiser: Any, tuned: dict[str, Any]) -> dict[str, Any]:
    """TV and PnP reconstructions of measurements ``d`` with the tuned hyperparameters."""
    with torch.no_grad():
        tv = tv_deblur(A, d, lam=tuned["tv"]["lam"], max_iter=200)
        pnp = pnp_deblur(A, d, denoiser, **tuned["pnp"])
    return {"tv": tv.clamp(-1, 1), "pnp": pnp.clamp(-1, 1)}


def tune(A: Any, x: torch.Tensor, d: torch.Tensor, denoiser: Any) -> dict[str, Any]:
    """Choose TV's lambda and PnP's (strength, step, iterations) by validation PSNR."""

    def score(x_hat: torch.Tensor) -> float:
        return float(report.scores(x_hat.clamp(-1, 1), x)["psnr_standard"].mean())

    with torch.no_grad():
        tv = {lam: score(tv_deblur(A, d, lam=lam, max_iter=200)) for lam in TV_LAMBDAS}
        pnp = {
            (s, t, k): score(pnp_deblur(A, d, denoiser, strength=s, step_size=t, max_iter=k))
            for s, t, k in PNP_GRID
        }
    lam, (strength, step, max_iter) = max(tv, key=tv.__getitem__), max(pnp, key=pnp.__getitem__)
    return {
        "tv": {"lam": lam, "val_psnr_standard": tv[lam]},
        "pnp": {"strength": strength, "step_size": step, "max_iter": max_iter},
        "pnp_val_psnr_standard": pnp[strength, step, max_iter],
    }


def resumed(folder: Path, resume: bool) -> dict[str, Any] | None:
    """``folder/last.pt`` to continue from with ``resume``; without it, refuse to overwrite."""
    if not (folder / "last.pt").exists():
        return None
    if not resume:
        raise cli.SettingsError(
            f"--out {folder.parent} holds a table run ({folder}/last.pt); pass --resume to "
            "continue it, or choose another --out"
        )
    return state.load(folder / "last.pt")


def training_seconds(folder: Path) -> float:
    """Seconds of DEQ training logged in ``folder`` up to its checkpoint (0 when new)."""
    if not (folder / "last.pt").exists():
        return 0.0
    lines = state.load(folder / "last.pt")["progress"]["log_lines"]
    log = state.read_log(folder / "log.jsonl")[:lines]
    return float(sum(r["sec_per_step"] for r in log if r["event"] == "train"))


def finished(folder: Path, seconds: float, opts: TableOptions) -> bool:
    """Whether a rule is trained: its time budget spent, or (without one) its epochs done."""
    if opts.time_budget is not None and seconds >= opts.time_budget:
        return True
    path = folder / "last.pt"
    return path.exists() and state.load(path)["progress"]["phase"] == "done"


def run(opts: TableOptions, overrides: dict[str, Any]) -> dict[str, Any]:
    """Pretrain once, tune the baselines, train every rule, then score all on the test split."""
    t_start, out = time.perf_counter(), Path(opts.out)
    s = flagship.resolve(opts.preset, overrides)
    ctx = ddp.Context(0, 1, ddp.pick_device(s.device))
    splits = make_splits(s)
    run_opts = cli.Options(no_progress=opts.no_progress, quiet=opts.quiet)
    logger.info("data: %s", splits.description)
    out.mkdir(parents=True, exist_ok=True)
    (out / "split.json").write_text(json.dumps(splits.files(), indent=2))  # which files, each

    # One pretrained denoiser: every rule's starting point, and the PnP prior.
    pre_s = dataclasses.replace(s, epochs=0)
    pre_start = resumed(out / "pretrain", opts.resume)
    pretrained, progress = flagship.train(
        pre_s, splits, out / "pretrain", ctx, run_opts, start=pre_start
    )
    start = {"model": pretrained.state_dict(), "progress": {"phase": "deq"}}
    start["progress"]["pretrain_step"] = progress.pretrain_step
    A, denoiser = flagship.cell_of(pretrained).operator, flagship.cell_of(pretrained).regularizer
    # The baselines, tuned on validation images only (the test split is not read until the end).
    index = list(range(min(opts.tune_limit, len(splits.val))))
    x_val = torch.stack([splits.val[i] for i in index]).to(ctx.device)
    d_val = flagship.measure(A, x_val, image_seeds(s.seed, "val", 0, index), s.noise_std)
    cache = out / "tuned.json"  # a resumed table does not tune again
    if opts.resume and cache.exists():
        tuned = json.loads(cache.read_text())
    else:
        tuned = tune(A, x_val, d_val, denoiser)
        cache.write_text(json.dumps(tuned, indent=2))
    logger.info("tuned on %d validation images: %s", len(index), tuned)

    # The learned rows: the same start, data and schedule, trained in turns of --turn-steps
    # steps (default: an epoch), so that a change in machine load falls on all of them alike.
    per_epoch = len(shard(splits.train, s.batch_size, ctx, s.seed))
    spent = {rule: training_seconds(out / rule) for rule in opts.rules}
    pending = [rule for rule in opts.rules if not finished(out / rule, spent[rule], opts)]
    while pending:
        for rule in list(pending):
            folder, rule_s, stop = (
                out / rule,
                dataclasses.replace(s, backward=rule),
                state.StopFlag(),
            )
            begin = resumed(folder, True) or start
            done_steps, steps = (
                begin["progress"].get("global_step", 0),
                opts.turn_steps or per_epoch,
            )
            if opts.time_budget is not None:  # one step to time, then what the budget allows
                per_step = spent[rule] / max(done_steps, 1) or float("inf")
                left = (opts.time_budget - spent[rule]) / per_step
                steps = max(1, min(steps, round(left))) if done_steps else 1
            turn = dataclasses.replace(run_opts, max_steps=done_steps + steps)

            with state.stop_on_signals(stop):  # Ctrl-C or SIGTERM: checkpoint, then stop
                flagship.train(rule_s, splits, folder, ctx, turn, start=begin, stop=stop)
            if stop.reason in ("SIGINT", "SIGTERM"):
                raise cli.SettingsError(f"stopped by {stop.reason}; continue with --resume")
            spent[rule] = training_seconds(folder)
            if finished(folder, spent[rule], opts):
                pending.remove(rule)

    # The test split, once: identical measurements for every row.
    rows: dict[str, dict[str, list[float]]] = {}
    images: dict[str, list[torch.Tensor]] = {}
    for rule in opts.rules:
        weights = "last.pt" if opts.time_budget else "best.pt"  # equal time: the final weights
        _, rule_s, model = flagship.load_model(out / rule / weights, {})
        flagship.fit_norms(model, (s.image_size,) * 2, training=False)
        result = flagship.evaluate(
            model, rule_s, splits.test, ctx, keep=s.figure_samples, radius=s.radius_images
        )
        for name in ("measurement", "tikhonov_cg"):
            rows[name] = {k.split("/")[1]: v for k, v in result.items() if k.startswith(name + "/")}
            images[name] = result[f"image/{name}"]
        rows[rule] = {k.split("/")[1]: v for k, v in result.items() if k.startswith("degrad/")}
        for key in ("iterations", "converged", "radius", "radius_settled"):
            rows[rule][key] = result[key]
        tight = {k: v for k, v in result.items() if k.startswith("tight/")}
        rows[rule] |= {k.replace("/", "_"): v for k, v in tight.items()}
        images[rule], images["x"] = result["image/degrad"], result["image/x"]
    for name in ("tv", "pnp"):
        rows[name] = {"psnr_standard": [], "psnr_paper": [], "ssim": []}
    for index, x in load(splits.test, shard(splits.test, s.eval_batch_size, ctx)):
        x = x.to(ctx.device)
        d = flagship.measure(A, x, image_seeds(TEST_SEED, "test", 0, index), s.noise_std)
        for name, x_hat in baselines(A, d, denoiser, tuned).items():
            for metric, values in report.scores(x_hat, x).items():
                rows[name][metric] += values.tolist()
            room = max(s.figure_samples - len(images.setdefault(name, [])), 0)
            images[name] += list(x_hat[:room].cpu())

    results = summarize(s, opts, rows, out, tuned, per_epoch)
    results |= {"data": splits.description, "seconds_total": time.perf_counter() - t_start}
    threads = torch.get_num_threads()
    results["device"] = f"{ctx.device.type}, {threads} threads, torch {torch.__version__}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    columns = {"Ground truth": images["x"], "Measurement": images["measurement"]}
    columns |= {"Tikhonov-CG": images["tikhonov_cg"], "TV": images["tv"], "PnP": images["pnp"]}
    report.image_grid(
        columns | {LABELS[r]: images[r] for r in opts.rules}, out / "reconstructions.png"
    )
    if not opts.quiet:
        print((out / "results.md").read_text())
    return results


def summarize(
    s: Any,
    opts: TableOptions,
    rows: dict[str, Any],
    out: Path,
    tuned: dict[str, Any],
    per_epoch: int,
) -> dict[str, Any]:
    """Means per row, and each learned rule's training cost from its log."""
    table, metrics = {}, ("psnr_standard", "psnr_paper", "ssim")
    for name in ("measurement", "tikhonov_cg", "tv", "pnp", *opts.rules):
        values = rows[name]
        row: dict[str, Any] = {k: statistics.fmean(values[k]) for k in metrics}
        if name in opts.rules:
            log = state.read_log(out / name / "log.jsonl")
            steps = [r for r in log if r["event"] == "train"]
            seconds = [r["sec_per_step"] for r in steps]
            adjoint = [
                r["backward_converged"] for r in steps if r["backward_converged"] is not None
            ]
            adjoint_iters = [r["backward_iters"] or 0 for r in steps]
            row |= {
                "forward_iterations": statistics.fmean(values["iterations"]),
                "radius_mean": statistics.fmean(values["radius"]),
                "radius_max": max(values["radius"]),
                "radius_settled": statistics.fmean(values["radius_settled"]),
                "converged_fraction": statistics.fmean(values["converged"]),
                "adjoint_converged": statistics.fmean(adjoint) if adjoint else None,
                "vjps_per_step": vjps(s, name, statistics.fmean(adjoint_iters)),
                "tight_psnr_standard": statistics.fmean(values["tight_psnr_standard"]),
                "tight_converged": statistics.fmean(values["tight_converged"]),
                "seconds_per_epoch": statistics.fmean(seconds) * per_epoch,
                "training_seconds": sum(seconds),
                "steps": len(steps),
                "epochs": len(steps) / per_epoch,
            }
        if name in PAPER_ROWS:
            row["paper"] = PAPER_TABLE[PAPER_ROWS[name]]
        table[name] = row
    results: dict[str, Any] = {"settings": dataclasses.asdict(s), "rules": list(opts.rules)}
    results |= {"tuned": tuned}
    results |= {"radius_images": s.radius_images, "time_budget": opts.time_budget}
    return results | {"table": table}


def vjps(s: Any, rule: str, adjoint_iterations: float) -> float:
    """VJPs through the cell per training step: one to attach the fixed point, plus the rule's
    (a Neumann series' terms, the phantom gradient's steps less one, GMRES's iterations)."""
    extra = {"neumann": s.neumann_terms, "phantom": s.neumann_terms - 1}
    return 1.0 + (adjoint_iterations if rule == "implicit" else extra.get(rule, 0))


def markdown(r: dict[str, Any]) -> str:
    """``results.md``: Table 2's layout with the paper's numbers beside ours, then the costs."""
    names = {"measurement": "Measurement", "tikhonov_cg": "Tikhonov-CG (60 steps, lambda 0.01)"}
    names |= LABELS
    lines = [
        "# Table 2 for the DE-GRAD flagship",
        "",
        f"- Data: {r['data']}",
        f"- Device: {r['device']}; total {r['seconds_total']:.0f} s",
        f"- Learned rows: {r['settings']['epochs']} epochs each"
        + (
            f", or {r['time_budget']:g} s of training each (final weights)"
            if r["time_budget"]
            else " (best validation epoch)"
        ),
        f"- Baselines tuned on validation images only: TV lambda {r['tuned']['tv']['lam']:g}, "
        f"PnP {r['tuned']['pnp']}",
        "",
        "| Method | PSNR (dB, [0,1] peak 1) | PSNR (dB, paper: [-1,1] peak 1) | SSIM | paper |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, row in r["table"].items():
        paper = "{:.2f} / {:.2f}".format(*row["paper"]) if "paper" in row else ""
        cells = [names[key], f"{row['psnr_standard']:.2f}", f"{row['psnr_paper']:.2f}"]
        lines.append("| " + " | ".join([*cells, f"{row['ssim']:.3f}", paper]) + " |")
    lines += ["", "(paper: the paper's PSNR in its convention / SSIM, CelebA 128x128.)", ""]
    lines.append(
        "| Rule | forward iters / image | converged | PSNR at rtol (tight) | converged (tight) "
        "| rho(J_T) mean (max) | adjoint converged | VJPs / step | s / epoch | training s "
        "| epochs |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in r["rules"]:
        row = r["table"][key]
        adjoint = row["adjoint_converged"]
        cells = [names[key], f"{row['forward_iterations']:.1f}", f"{row['converged_fraction']:.0%}"]
        cells.append(f"{row['psnr_standard']:.2f} ({row['tight_psnr_standard']:.2f})")
        cells.append(f"{row['tight_converged']:.0%}")
        cells.append(f"{row['radius_mean']:.3f} ({row['radius_max']:.3f})")
        cells += ["-" if adjoint is None else f"{adjoint:.0%}", f"{row['vjps_per_step']:.1f}"]
        cells += [f"{row['seconds_per_epoch']:.1f}", f"{row['training_seconds']:.0f}"]
        cells.append(f"{row['epochs']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    settled = statistics.fmean(r["table"][k]["radius_settled"] for k in r["rules"])
    tight = f"rtol {r['settings']['rtol']:g} ({r['settings']['tight_rtol']:g})"
    lines += [
        "",
        f"PSNR at {tight}: standard convention. rho(J_T): the spectral radius of the cell's",
    ]
    lines += [f"Jacobian at the fixed points of {r['radius_images']} whole test images (Arnoldi,"]
    lines += [f"at most 50 VJPs; {settled:.0%} of the estimates settled, an unsettled one is low)."]
    return "\n".join(lines) + "\n"


def table(opts: TableOptions, overrides: dict[str, Any]) -> int:
    """The one command: :func:`run`, then exit code 0."""
    run(opts, overrides)
    return 0


OPTIONS = tuple(f.name for f in dataclasses.fields(TableOptions))
COMMANDS = {"table": Command(table, "the Table 2 reproduction", OPTIONS)}


def main(argv: list[str] | None = None) -> int:
    """Run the table; returns 2 for an invalid setting."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.main(argv, COMMANDS, TableOptions, flagship.Settings, flagship.PRESETS, __doc__)


if __name__ == "__main__":
    sys.exit(main())
