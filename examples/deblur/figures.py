"""PNG figures with matplotlib's Agg backend (no display needed).

* :func:`reconstruction_grid`: like the paper's Table 1: ground truth, measurement,
  Tikhonov-CG and DE-GRAD side by side, PSNR under each reconstruction.
* :func:`loss_curves`: like the paper's Figure 1: training and validation loss per epoch,
  plus validation PSNR against the CG anchor and forward iterations per step.
* :func:`budget_curve`: PSNR against the test-time iteration budget.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch import Tensor

from implicitlayers.imaging import psnr_standard

from .data import to_unit_range

__all__ = ["budget_curve", "loss_curves", "reconstruction_grid"]


def _show(ax: Any, image: Tensor, title: str) -> None:
    ax.imshow(to_unit_range(image).permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def reconstruction_grid(samples: dict[str, list[Tensor]], path: Path, backward: str) -> None:
    """Save a grid: one row per test image, columns GT / measurement / CG / DE-GRAD.

    Args:
        samples: Lists ``x``, ``d``, ``cg``, ``x_hat`` of ``(3, H, W)`` images in [-1, 1].
        path: Output PNG.
        backward: The backward rule's name, for the column title.
    """
    rows = len(samples["x"])
    columns = (
        ("x", "Ground truth"),
        ("d", "Measurement"),
        ("cg", "Tikhonov-CG"),
        ("x_hat", f"DE-GRAD ({backward.upper()})"),
    )
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2.1 * rows + 0.3), squeeze=False)
    for r in range(rows):
        truth = samples["x"][r]
        for c, (key, name) in enumerate(columns):
            image = samples[key][r].clamp(-1, 1)
            title = name if r == 0 else ""
            if key != "x":
                value = psnr_standard(image[None], truth[None]).item()
                title = f"{title}\n{value:.2f} dB" if title else f"{value:.2f} dB"
            _show(axes[r][c], image, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Save training/validation curves from the JSON-lines log records."""
    train = [r for r in records if r.get("event") == "train"]
    val = [r for r in records if r.get("event") == "val"]
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in train:
        per_epoch[int(r["epoch"]) + 1].append(float(r["loss"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    if train:
        steps_per_epoch = max(len(v) for v in per_epoch.values())
        ax.plot(
            [r["step"] / steps_per_epoch for r in train],
            [r["loss"] for r in train],
            color="tab:blue",
            alpha=0.25,
            lw=0.8,
            label="training (per step)",
        )
        epochs = sorted(per_epoch)
        ax.plot(
            epochs,
            [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs],
            "o-",
            color="tab:blue",
            label="training (epoch mean)",
        )
    if val:
        ax.plot(
            [r["epoch"] for r in val],
            [r["loss"] for r in val],
            "s-",
            color="tab:orange",
            label="validation",
        )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE loss")
    ax.set_title("Loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    if val:
        ax.plot([r["epoch"] for r in val], [r["psnr_standard"] for r in val], "s-", label="DE-GRAD")
        ax.axhline(val[0]["cg_psnr_standard"], color="gray", ls="--", label="Tikhonov-CG")
    ax.set_xlabel("epoch")
    ax.set_ylabel("PSNR (dB, [0,1] peak 1)")
    ax.set_title("Validation PSNR")
    ax.legend(fontsize=8)
    ax = axes[2]
    if train:
        ax.plot(
            [r["step"] for r in train], [r["fwd_iters_mean"] for r in train], lw=0.8, label="mean"
        )
        ax.plot(
            [r["step"] for r in train],
            [r["fwd_iters_max"] for r in train],
            lw=0.8,
            alpha=0.6,
            label="max",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("forward iterations per sample")
    ax.set_title("Solver work")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def budget_curve(budgets: dict[str, float], cg_psnr: float, path: Path) -> None:
    """Save PSNR against the test-time iteration budget, with the CG anchor."""
    ks = [int(k) for k in budgets]
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.plot([max(k, 0.5) for k in ks], list(budgets.values()), "o-", label="DE-GRAD")
    ax.axhline(cg_psnr, color="gray", ls="--", label="Tikhonov-CG")
    ax.set_xscale("log")
    ax.set_xticks([max(k, 0.5) for k in ks], [str(k) for k in ks])
    ax.set_xlabel("test-time max_iter (0 = initial point)")
    ax.set_ylabel("PSNR (dB, [0,1] peak 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
