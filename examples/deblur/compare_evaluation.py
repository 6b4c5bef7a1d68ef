r"""Scoring every method of the comparison on the test split, and the split bookkeeping.

All methods see identical test measurements: the noise of test image ``i`` is seeded by
``noise_seed(TEST_SEED, "test", 0, i)`` exactly as in the flagship's own evaluation
(:func:`deblur.evaluation.evaluate_model`, which scores the learned models here), and
:func:`evaluate_all` checks that the two agree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from implicitlayers.imaging import GaussianBlur, psnr_paper, psnr_standard, ssim_standard

from .checkpoint import load_model
from .compare_baselines import BASELINES, Tuned, reconstruct
from .compare_report import PAPER_ROWS
from .compare_training import Rule
from .config import RunConfig
from .data import TEST_SEED, DataSplits
from .evaluation import PAPER_TABLE, evaluate_model
from .measure import measure, noise_seed

__all__ = ["CachedDataset", "evaluate_all", "split_info", "stack_images"]


def stack_images(dataset: Dataset[Tensor], indices: list[int], device: torch.device) -> Tensor:
    """The images ``indices`` of ``dataset`` as one ``(N, C, H, W)`` batch on ``device``."""
    return torch.stack([dataset[i] for i in indices]).to(device)


def _metrics(x_hat: Tensor, x: Tensor) -> dict[str, list[float]]:
    return {
        "psnr_paper": psnr_paper(x_hat, x).tolist(),
        "psnr_standard": psnr_standard(x_hat, x).tolist(),
        "ssim": ssim_standard(x_hat, x).tolist(),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class CachedDataset(Dataset[Tensor]):
    """Keep every image after its first read (the splits are read once per rule and epoch)."""

    def __init__(self, inner: Dataset[Tensor]) -> None:
        self.inner = inner
        self.store: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tensor:
        if index not in self.store:
            self.store[index] = self.inner[index]
        return self.store[index]


def split_info(data: DataSplits, tune: int) -> dict[str, Any]:
    """Split sizes, descriptions, and the validation files used for tuning.

    Args:
        data: The splits.
        tune: How many validation images (the first ones) the baselines are tuned on.

    Raises:
        RuntimeError: If the test files overlap the training or tuning files.
    """
    files = data.files
    counts = {k: len(getattr(data, k)) for k in ("train", "val", "test")}
    if files is None:
        return {
            "counts": counts,
            "test_description": f"{counts['test']} built-in test crops (held-out photographs)",
            "tuning_description": f"the first {tune} validation crops",
            "tuning_files": None,
        }
    tuning = files["val"][:tune]
    if set(tuning) & set(files["test"]) or set(files["train"]) & set(files["test"]):
        raise RuntimeError("the test split overlaps the tuning or training files")
    return {
        "counts": counts,
        "test_description": f"{counts['test']} files, {files['test'][0]} ... "
        f"(full list in split.json; disjoint from train and validation)",
        "tuning_description": f"the first {len(tuning)} validation files "
        f"({', '.join(tuning[:3])}, ...), never a test file",
        "tuning_files": tuning,
    }


def evaluate_all(
    config: RunConfig,
    data: DataSplits,
    operator: GaussianBlur,
    denoiser: torch.nn.Module,
    tuned: dict[str, Tuned],
    rules: list[Rule],
    folders: dict[str, Path],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, list[Tensor]]]:
    """Score every method on the test split (identical measurements for all)."""
    device = operator.kernel.device
    n = len(data.test)  # type: ignore[arg-type]
    keep = config.figure_samples
    scores: dict[str, dict[str, list[float]]] = {}
    images: dict[str, list[Tensor]] = {}

    def add(key: str, x_hat: Tensor, x: Tensor, first: int) -> None:
        row = scores.setdefault(key, {"psnr_paper": [], "psnr_standard": [], "ssim": []})
        for name, values in _metrics(x_hat, x).items():
            row[name] += values
        room = max(keep - first, 0)
        images.setdefault(key, []).extend(v.cpu() for v in x_hat[:room])

    for start in range(0, n, config.eval_batch_size):
        index = list(range(start, min(start + config.eval_batch_size, n)))
        x = stack_images(data.test, index, device)
        d = measure(
            operator, x, config.noise_std, [noise_seed(TEST_SEED, "test", 0, i) for i in index]
        )
        add("ground_truth", x, x, start)
        add("measurement", d.clamp(-1, 1), x, start)
        for key, choice in tuned.items():
            add(key, reconstruct(key, operator, d, denoiser, choice.params), x, start)
    rows: dict[str, dict[str, Any]] = {}
    names = {"measurement": "Measurement (blurred, noisy)", **BASELINES}
    for key in names:
        t = tuned.get(key)
        rows[key] = {
            "key": key,
            "method": names[key],
            "kind": "input" if key == "measurement" else "baseline",
            **{name: _mean(values) for name, values in scores[key].items()},
            "hyperparameters": None if t is None else t.params,
            "tuning_note": None if t is None else t.note,
            "val_psnr_standard": None if t is None else t.val_psnr_standard,
            "at_edge": False if t is None else t.at_edge,
        }
    learned: dict[str, dict[str, Any]] = {}
    for rule in rules:
        key = f"deq_{rule.key}"
        model, rule_config, saved = load_model(folders[rule.key] / "best.pt", device)
        eval_config = dataclasses.replace(rule_config, budgets=[1], figure_samples=keep)
        evaluation = evaluate_model(model, eval_config, data.test, device, progress_bars=False)
        measured = evaluation.metrics["measurement"]["psnr_standard"]
        if (
            max(
                abs(a - b)
                for a, b in zip(measured, scores["measurement"]["psnr_standard"], strict=True)
            )
            > 1e-4
        ):
            raise RuntimeError("the learned and classical methods saw different test measurements")
        summary = evaluation.summary()
        row = summary["table"]["degrad"]
        rows[key] = {
            "key": key,
            "method": rule.label,
            "kind": "learned",
            **row,
            "hyperparameters": None,
            "tuning_note": f"trained {config.epochs} epochs; best validation epoch "
            f"{saved['progress']['best_epoch']}",
            "val_psnr_standard": saved["progress"]["best_val_psnr"],
            "at_edge": False,
        }
        learned[key] = {
            "method": rule.label,
            "backward": rule.backward,
            "neumann_terms": rule.terms if rule.backward == "neumann" else None,
            "best_epoch": saved["progress"]["best_epoch"],
            "forward_iters_test": summary["forward_iterations"]["mean"],
            "converged_test": summary["forward_iterations"]["converged_fraction"],
            "step_size": model.step_size(),
        }
        images[key] = evaluation.samples["x_hat"][:keep]
    for key, name in PAPER_ROWS.items():
        if key in rows:
            value, ssim_value = PAPER_TABLE[name]
            rows[key]["paper"] = {"row": name, "psnr_paper": value, "ssim": ssim_value}
    return rows, learned, images
