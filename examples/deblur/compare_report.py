r"""Tables, checks and figures of the comparison (``results.md``, ``table1.png``, ...).

* :func:`summarize_rule`: a rule's training cost and validation curve from its logs;
* :func:`run_checks`: the claims under test, each reported as passed or failed with numbers;
* :func:`results_markdown`: the paper's Table 2 layout (both PSNR conventions, SSIM) with the
  paper's own numbers beside ours, the cost table of the learned methods, and the checks;
* :func:`table1_figure`: like the paper's Table 1, one row per method, one column per image;
* :func:`curve_figure`: validation PSNR against training wall-clock time, one curve per rule.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch import Tensor

from implicitlayers.imaging import psnr_standard

from .data import to_unit_range
from .evaluation import PAPER_TABLE

__all__ = [
    "PAPER_OFFSET_DB",
    "PAPER_ROWS",
    "curve_figure",
    "results_markdown",
    "run_checks",
    "summarize_rule",
    "table1_figure",
]

#: The paper's PSNR convention ([-1, 1] images, peak 1) is this many dB below [0, 1] peak 1.
PAPER_OFFSET_DB = 20 * math.log10(2.0)

#: Our row key -> the paper's Table 2 row (Liu, Tong & Zhao, 2024).
PAPER_ROWS = {
    "tv": "TV",
    "pnp": "PnP",
    "deq_implicit": "DEQ, exact gradients",
    "deq_jfb": "DEQ, JFB",
}

#: Rows of the Table 1 figure, in order, when present.
FIGURE_ROWS = (
    "ground_truth",
    "measurement",
    "direct_inverse",
    "gradient_descent",
    "tv",
    "pnp",
    "deq_implicit",
    "deq_jfb",
)


def summarize_rule(
    log: list[dict[str, Any]], costs: list[dict[str, Any]], steps_per_epoch: int
) -> dict[str, Any]:
    """A rule's training cost and validation curve.

    Args:
        log: The rule's ``log.jsonl`` records (``train`` and ``val`` events).
        costs: Its ``costs.jsonl`` records (one per step).
        steps_per_epoch: Optimiser steps per epoch.

    Returns:
        ``seconds_per_epoch`` (summed step times), ``seconds_per_epoch_median`` (median step
        time times steps, robust to load spikes on a shared machine), forward iterations,
        VJPs, memory, and ``curve``: validation PSNR against cumulative training seconds
        (step time only: validation and data loading excluded).
    """
    train = [r for r in log if r.get("event") == "train"]
    val = [r for r in log if r.get("event") == "val"]
    step_seconds = [float(c["sec_per_step"]) for c in costs]
    epochs = len({int(r["epoch"]) for r in train})
    per_epoch: dict[int, float] = {}
    for r in train:
        per_epoch[int(r["epoch"])] = per_epoch.get(int(r["epoch"]), 0.0) + r["sec_per_step"]
    curve = []
    for r in sorted(val, key=lambda r: int(r["epoch"])):
        seconds = sum(v for e, v in per_epoch.items() if e < int(r["epoch"]))
        curve.append(
            {
                "epoch": int(r["epoch"]),
                "train_seconds": seconds,
                "val_psnr_standard": r["psnr_standard"],
                "val_psnr_paper": r["psnr_paper"],
                "val_fwd_iters": r["fwd_iters_mean"],
            }
        )
    adjoint = [c["adjoint_n_f_evals"] for c in costs if c["adjoint_n_f_evals"] is not None]
    converged = [c["adjoint_converged"] for c in costs if c.get("adjoint_converged") is not None]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "epochs": epochs,
        "steps": len(costs),
        "seconds_per_epoch": sum(step_seconds) / epochs if epochs else None,
        "seconds_per_epoch_median": statistics.median(step_seconds) * steps_per_epoch
        if step_seconds
        else None,
        "seconds_per_step_median": statistics.median(step_seconds) if step_seconds else None,
        "forward_iters_train": mean([float(c["fwd_iters_mean"]) for c in costs]),
        "vjps_per_step": mean([float(c["vjps"]) for c in costs]),
        "vjps_per_step_max": max((int(c["vjps"]) for c in costs), default=None),
        "adjoint_n_f_evals": mean([float(a) for a in adjoint]),
        "adjoint_converged": mean([float(a) for a in converged]),
        "saved_tensor_mib": max((c["saved_tensor_bytes"] for c in costs), default=0) / 2**20,
        "process_peak_mib": max((float(c["peak_mib"]) for c in costs), default=None),
        "step_memory_mib_max": max((float(c["step_mib"]) for c in costs), default=None),
        "step_memory_mib_median": statistics.median([float(c["step_mib"]) for c in costs])
        if costs
        else None,
        "curve": curve,
    }


def _check(name: str, passed: bool | None, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": passed, "detail": detail}


def run_checks(
    rows: dict[str, dict[str, Any]], learned: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Evaluate the comparison's claims on the measured (test) numbers.

    Args:
        rows: Table rows by key, each with ``psnr_standard``.
        learned: Cost summaries by row key (``deq_*``), from :func:`summarize_rule`.

    Returns:
        One record per check: ``name``, ``passed`` (``None`` when a needed row is missing)
        and ``detail``.
    """
    checks = []

    def psnr(key: str) -> float | None:
        row = rows.get(key)
        return None if row is None else row["psnr_standard"]

    tv = psnr("tv")
    for key in learned:
        value = psnr(key)
        ok = None if tv is None or value is None else value > tv
        checks.append(
            _check(
                f"{rows[key]['method']} above TV",
                ok,
                f"{_db(value)} vs TV {_db(tv)} (standard PSNR; difference {_diff(value, tv)})",
            )
        )
    pnp = psnr("pnp")
    for key in ("gradient_descent", "gradient_descent_tikhonov"):
        value = psnr(key)
        ok = None if pnp is None or value is None else pnp > value
        name = rows[key]["method"] if key in rows else key
        checks.append(
            _check(
                f"PnP above {name}",
                ok,
                f"PnP {_db(pnp)} vs {_db(value)} (difference {_diff(pnp, value)})",
            )
        )
    jfb, implicit = psnr("deq_jfb"), psnr("deq_implicit")
    ok = None if jfb is None or implicit is None else jfb >= implicit - 0.5
    checks.append(
        _check(
            "JFB within 0.5 dB of implicit differentiation (test PSNR)",
            ok,
            f"JFB {_db(jfb)} vs implicit {_db(implicit)} "
            f"(JFB minus implicit {_diff(jfb, implicit)})",
        )
    )
    t_jfb = learned.get("deq_jfb", {}).get("seconds_per_epoch_median")
    t_imp = learned.get("deq_implicit", {}).get("seconds_per_epoch_median")
    s_jfb = learned.get("deq_jfb", {}).get("seconds_per_epoch")
    s_imp = learned.get("deq_implicit", {}).get("seconds_per_epoch")
    ratio = None if not t_jfb or not t_imp else t_jfb / t_imp
    summed = None if not s_jfb or not s_imp else s_jfb / s_imp
    checks.append(
        _check(
            "JFB training time per epoch below 0.6 x implicit's",
            None if ratio is None else ratio < 0.6,
            f"ratio {_num(ratio, 3)} from median step time x steps "
            f"({_num(t_jfb, 1)} s vs {_num(t_imp, 1)} s); from summed step times "
            f"{_num(summed, 3)}",
        )
    )
    return checks


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} dB"


def _diff(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a - b:+.2f} dB"


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def results_markdown(report: dict[str, Any]) -> str:
    """The comparison as a Markdown document (the ``results.json`` content, laid out)."""
    lines = [
        "# DE-GRAD deblurring: baselines and backward rules side by side",
        "",
        f"- Command: `{report['command']}`",
        f"- Data: {report['data']}",
        f"- Test split: {report['splits']['test_description']}",
        f"- Tuning: {report['splits']['tuning_description']}",
        f"- Measurement: {report['measurement_model']}",
        f"- Network and training: {report['training']}",
        f"- Wall time: {report['seconds']['total']:.0f} s (pretraining "
        f"{report['seconds']['pretrain']:.0f}, baseline tuning {report['seconds']['tuning']:.0f}"
        f", DEQ training {report['seconds']['training']:.0f}, test evaluation "
        f"{report['seconds']['evaluation']:.0f}) on {report['device']}",
        "",
        "## Test results (the paper's Table 2 layout)",
        "",
        "PSNR in the paper's convention ([-1, 1] images, peak 1) and the standard one ([0, 1],"
        " peak 1; 6.02 dB higher); SSIM on [0, 1] images. The paper's numbers are theirs "
        "(CelebA 128x128, DnCNN 17x64), not ours.",
        "",
        "| Method | PSNR (paper conv.) | PSNR (standard) | SSIM | Theirs: PSNR (paper conv.) "
        "/ SSIM | Hyperparameters (tuned on validation) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in report["table"]:
        theirs = row.get("paper")
        paper = f"{theirs['psnr_paper']:.2f} / {theirs['ssim']:.2f}" if theirs else ""
        tuned = _params(row["hyperparameters"]) if row.get("hyperparameters") else ""
        if row.get("tuning_note"):
            tuned = f"{tuned} ({row['tuning_note']})" if tuned else row["tuning_note"]
        if row.get("at_edge"):
            tuned += " **at the edge of its grid**"
        lines.append(
            f"| {row['method']} | {row['psnr_paper']:.2f} | {row['psnr_standard']:.2f} "
            f"| {row['ssim']:.3f} | {paper} | {tuned} |"
        )
    lines += [
        "",
        "## Learned methods: what training cost",
        "",
        f"Step memory: {report['memory_method']}, minus the memory in use when the step "
        "began (the process-wide peak, which accumulates over the run because the rules "
        "share one process, is in results.json). Saved tensors: bytes of the distinct "
        "storages autograd kept for the backward pass of one step. VJPs/step: counted "
        "(the rule's adjoint VJPs plus the one into the parameters); adjoint converged: "
        "share of samples whose adjoint solve met its tolerance. Time: optimiser steps only "
        "(validation and data loading excluded); the median column is the median step time "
        "times the steps per epoch, robust to load from other processes on a shared machine.",
        "",
        "| Method | s/epoch | s/epoch (median) | step memory, median / max (MiB) "
        "| saved tensors (MiB) | fwd iters/sample (train / test) | VJPs/step "
        "| adjoint converged | best epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cost in report["learned"].values():
        lines.append(
            f"| {cost['method']} | {_num(cost['seconds_per_epoch'], 1)} "
            f"| {_num(cost['seconds_per_epoch_median'], 1)} "
            f"| {_num(cost['step_memory_mib_median'], 1)} / {_num(cost['step_memory_mib_max'], 1)} "
            f"| {_num(cost['saved_tensor_mib'], 1)} "
            f"| {_num(cost['forward_iters_train'], 1)} / {_num(cost['forward_iters_test'], 1)} "
            f"| {_num(cost['vjps_per_step'], 1)} | {_pct(cost.get('adjoint_converged'))} "
            f"| {cost['best_epoch']} |"
        )
    lines += ["", "## Checks", ""]
    for check in report["checks"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[check["passed"]]
        lines.append(f"- **{mark}** {check['name']}: {check['detail']}")
    lines += [
        "",
        "## The paper's Table 2 (theirs, for reference)",
        "",
        "| Method | PSNR ([-1,1] peak 1) | PSNR (+6.02: standard) | SSIM |",
        "|---|---:|---:|---:|",
    ]
    for name, (value, ssim_value) in PAPER_TABLE.items():
        lines.append(f"| {name} | {value:.2f} | {value + PAPER_OFFSET_DB:.2f} | {ssim_value:.2f} |")
    lines += [
        "",
        "Figures: `table1.png` (reconstructions of test images), `val_psnr_vs_time.png` "
        "(validation PSNR against training time, one curve per backward rule).",
    ]
    return "\n".join(lines) + "\n"


def table1_figure(
    images: dict[str, list[Tensor]],
    labels: dict[str, str],
    path: Path,
    *,
    rows: tuple[str, ...] = (),
) -> None:
    """Save a grid like the paper's Table 1: one row per method, one column per test image.

    Args:
        images: ``(3, H, W)`` images in :math:`[-1, 1]` by row key; must hold
            ``ground_truth``.
        labels: Row names by key.
        path: Output PNG.
        rows: Row keys in order (default :data:`FIGURE_ROWS`, those present).
    """
    keys = [k for k in (rows or FIGURE_ROWS) if k in images]
    truth = images["ground_truth"]
    n = len(truth)
    fig, axes = plt.subplots(len(keys), n, figsize=(1.6 * n + 1.6, 1.55 * len(keys)), squeeze=False)
    for r, key in enumerate(keys):
        for c in range(n):
            ax = axes[r][c]
            image = images[key][c].clamp(-1, 1)
            ax.imshow(to_unit_range(image).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if key != "ground_truth":
                value = psnr_standard(image[None], truth[c][None]).item()
                ax.set_title(f"{value:.2f} dB", fontsize=7, pad=2)
            if c == 0:
                ax.set_ylabel(labels.get(key, key), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_figure(
    curves: dict[str, list[dict[str, Any]]],
    labels: dict[str, str],
    anchors: dict[str, float],
    path: Path,
) -> None:
    """Save validation PSNR against cumulative training seconds, one curve per rule.

    Args:
        curves: ``summarize_rule(...)["curve"]`` by row key.
        labels: Curve names by row key.
        anchors: Horizontal reference lines (e.g. tuned baselines' validation PSNR) by name.
        path: Output PNG.
    """
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for key, curve in curves.items():
        ax.plot(
            [p["train_seconds"] for p in curve],
            [p["val_psnr_standard"] for p in curve],
            "o-",
            label=labels.get(key, key),
        )
    styles = iter(("--", ":", "-."))
    for name, value in anchors.items():
        ax.axhline(value, color="gray", ls=next(styles, "--"), lw=1, label=name)
    ax.set_xlabel("training time (s, optimiser steps only)")
    ax.set_ylabel("validation PSNR (dB, [0,1] peak 1)")
    ax.set_title("Validation PSNR against training time", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
