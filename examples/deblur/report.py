"""``results.json``, ``results.md`` and the PNG figures (matplotlib's Agg backend: no display
needed): reconstructions with their PSNR, loss and validation curves from ``log.jsonl``, and
PSNR against the test-time iteration budget."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch import Tensor

from implicitlayers import imaging

from .state import read_log

METHODS = {"measurement": "Measurement (blurred, noisy)"}
METHODS |= {"tikhonov_cg": "Tikhonov-CG (60 steps, lambda 0.01)", "degrad": "DE-GRAD"}
METRICS = ("psnr_standard", "psnr_paper", "ssim")


def scores(x_hat: Tensor, x: Tensor) -> dict[str, Tensor]:
    """Per-image PSNR and SSIM of images in :math:`[-1, 1]`: standard (as [0, 1] images, peak
    1), and PSNR in the paper's convention (peak 1 on [-1, 1]: 20 log10(2) = 6.02 dB lower)."""
    standard, paper = imaging.psnr_standard(x_hat, x), imaging.psnr_paper(x_hat, x)
    return {"psnr_standard": standard, "psnr_paper": paper, "ssim": imaging.ssim_standard(x_hat, x)}


def write(
    rows: dict[str, list[Any]], out: Path, saved: dict[str, Any], about: dict[str, Any]
) -> dict[str, Any]:
    """Summarise the flagship's per-image ``rows`` into ``results.json`` (with ``about``, and
    how long the checkpoint ``saved`` trained), ``results.md`` and the three figures in ``out``
    (the loss curves from the checkpoint's ``log.jsonl``)."""
    progress = saved["progress"]
    about |= {"trained_steps": progress["global_step"], "training_seconds": progress["seconds"]}
    mean = {k: statistics.fmean(v) for k, v in rows.items() if not k.startswith("image/")}
    table = {m: {k: mean[f"{m}/{k}"] for k in METRICS} for m in METHODS}
    budgets = {k.split("/")[1]: v for k, v in mean.items() if k.startswith("budget/")}
    its, images, cg = rows["iterations"], len(rows["loss"]), table["tikhonov_cg"]["psnr_standard"]
    iterations = {"mean": mean["iterations"], "median": statistics.median(its), "max": max(its)}
    results = about | {"images": images, "image_shape": list(rows["image/x"][0].shape)}
    results |= {"table": table, "gain_over_cg_db": table["degrad"]["psnr_standard"] - cg}
    results |= {"forward_iterations": iterations | {"converged_fraction": mean["converged"]}}
    results |= {"images_per_second": images / sum(rows["seconds"])}
    results["budget_psnr_standard"] = dict(sorted(budgets.items(), key=lambda kv: int(kv[0])))
    if rows.get("radius"):  # rho(J_T) at the first test images' fixed points
        radius = {"mean": mean["radius"], "max": max(rows["radius"])}
        results["spectral_radius"] = radius | {"settled": mean["radius_settled"]}
    if "tight/psnr_standard" in mean:  # the same images solved to --tight-rtol
        tight = {k.split("/")[1]: mean[k] for k in mean if k.startswith("tight/")}
        tight["rtol"] = about["settings"]["tight_rtol"]
        tight["psnr_change_db"] = tight["psnr_standard"] - table["degrad"]["psnr_standard"]
        results["tight"] = tight
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    columns = {name: rows[f"image/{key}"] for key, name in _names(results).items()}
    image_grid({"Ground truth": rows["image/x"], **columns}, out / "reconstructions.png")
    budget_curve(results["budget_psnr_standard"], cg, out / "psnr_vs_iterations.png")
    loss_curves(read_log(Path(about["checkpoint"]).parent / "log.jsonl"), out / "loss_curves.png")
    return results


def markdown(r: dict[str, Any]) -> str:
    """The flagship's ``results.md`` from its ``results.json`` dict."""
    s, it, budgets, bound = r["settings"], r["forward_iterations"], r["budget_psnr_standard"], ""
    rows = "\n".join(
        f"| {name} | {row['psnr_standard']:.2f} | {row['psnr_paper']:.2f} | {row['ssim']:.3f} |"
        for name, row in zip(_names(r).values(), r["table"].values(), strict=True)
    )
    if r.get("tight"):
        t = r["tight"]
        bound += (
            f"\n\nSolved to rtol {t['rtol']:g} (atol alike): {100 * t['converged']:.1f}% "
            f"converged in {t['iterations']:.1f} iterations on average, PSNR "
            f"{t['psnr_standard']:.2f} dB ({t['psnr_change_db']:+.2f} dB)."
        )
    if r.get("spectral_radius"):
        rho = r["spectral_radius"]
        bound += (
            f"\n\nSpectral radius of J_T at the fixed points of the first test images: mean "
            f"{rho['mean']:.3f}, max {rho['max']:.3f} ({100 * rho['settled']:.0f}% settled)."
        )
    if r.get("lipschitz_bound") is not None:
        bound += f"\n\nContractive cell: certified Lip(T) <= **{r['lipschitz_bound']:.4f}**."
    return f"""\
# DE-GRAD deblurring results

- Data: {r["data"]}
- Measurement: {s["kernel_size"]}x{s["kernel_size"]} Gaussian blur, std {s["blur_std"]:g}, \
zero padding; noise std {s["noise_std"]:g} on [-1, 1] pixels
- Checkpoint: `{r["checkpoint"]}` ({r["trained_steps"]} DEQ steps, {s["backward"]} backward, \
{s["cell"]} cell)
- Solver: {s["solver"]}, max_iter {s["eval_max_iter"]}, rtol {s["rtol"]:g}, atol {s["atol"]:g} \
(per-pixel RMS)
- Test images: {r["images"]}, whole, {r["image_shape"][1]}x{r["image_shape"][2]}

| Method | PSNR (dB, [0,1] peak 1) | PSNR (dB, paper: [-1,1] peak 1) | SSIM |
|---|---:|---:|---:|
{rows}

DE-GRAD minus Tikhonov-CG: **{r["gain_over_cg_db"]:+.2f} dB**.

Forward iterations per image: mean {it["mean"]:.1f}, median {it["median"]}, max {it["max"]}; \
converged to tolerance: {100 * it["converged_fraction"]:.1f}%. \
Throughput: {r["images_per_second"]:.1f} images/s.{bound}

## PSNR (standard convention) against the test-time iteration budget

| max_iter | {" | ".join(budgets)} |
|---|{"---:|" * len(budgets)}
| PSNR (dB) | {" | ".join(f"{v:.2f}" for v in budgets.values())} |

(max_iter 0 is the initial point, 10 Tikhonov-CG steps. The paper's Table 2, beside ours: \
`python benchmarks/deblur_table.py`.)
"""


def image_grid(columns: dict[str, list[Tensor]], path: Path) -> None:
    """Save a grid; the first column is the ground truth the others' PSNR is measured against."""
    names, truth = list(columns), next(iter(columns.values()))
    size = (2 * len(names), 2.1 * len(truth) + 0.3)
    fig, axes = plt.subplots(len(truth), len(names), squeeze=False, figsize=size, layout="tight")
    for r, reference in enumerate(truth):
        for c, name in enumerate(names):
            image, title = columns[name][r].clamp(-1, 1), name if r == 0 else ""
            if c > 0:
                value = imaging.psnr(image[None], reference[None], data_range=2.0).item()
                title = f"{title}\n{value:.2f} dB".strip()
            axes[r][c].imshow(((image + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[r][c].set_title(title, fontsize=8)
            axes[r][c].axis("off")
    _save(fig, path)


def loss_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Save loss, validation PSNR and solver work from the JSON-lines records."""
    train, val = ([r for r in records if r["event"] == event] for event in ("train", "val"))
    fig, (loss, quality, work) = plt.subplots(1, 3, figsize=(13, 3.6), layout="tight")
    per_epoch = max(sum(r["epoch"] == 0 for r in train), 1)
    val_epochs = [r["epoch"] for r in val]
    epochs = [r["step"] / per_epoch for r in train]
    loss.plot(epochs, [r["loss"] for r in train], lw=0.8, alpha=0.5, label="training (per step)")
    loss.plot(val_epochs, [r["loss"] for r in val], "s-", label="validation")
    loss.set(yscale="log", xlabel="epoch", ylabel="MSE loss", title="Loss")
    quality.plot(val_epochs, [r["degrad/psnr_standard"] for r in val], "s-", label="DE-GRAD")
    if val:
        quality.axhline(val[0]["tikhonov_cg/psnr_standard"], color="gray", ls="--", label="CG")
    quality.set(xlabel="epoch", ylabel="PSNR (dB, [0,1] peak 1)", title="Validation PSNR")
    for key in ("fwd_iters_mean", "fwd_iters_max"):
        work.plot([r["step"] for r in train], [r[key] for r in train], lw=0.8, label=key[10:])
    work.set(xlabel="training step", ylabel="forward iterations per image", title="Solver work")
    for ax in (loss, quality, work):
        ax.legend(fontsize=8)
    _save(fig, path)


def budget_curve(budgets: dict[str, float], cg_psnr: float, path: Path) -> None:
    """Save PSNR against the test-time iteration budget, with the Tikhonov-CG anchor."""
    ks = [max(int(k), 0.5) for k in budgets]  # 0 (the start) drawn at 0.5 on the log axis
    fig, ax = plt.subplots(figsize=(4.5, 3.4), layout="tight")
    ax.semilogx(ks, list(budgets.values()), "o-", label="DE-GRAD")
    ax.axhline(cg_psnr, color="gray", ls="--", label="Tikhonov-CG")
    ax.set_xticks(ks, list(budgets))
    ax.set(xlabel="test-time max_iter (0 = initial point)", ylabel="PSNR (dB, [0,1] peak 1)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _names(r: dict[str, Any]) -> dict[str, str]:
    return {**METHODS, "degrad": f"DE-GRAD ({r['settings']['backward']})"}


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)
