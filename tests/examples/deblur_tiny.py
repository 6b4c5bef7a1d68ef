"""Shared settings of the deblurring example's tests."""

from __future__ import annotations

from pathlib import Path

#: Where the shared CelebA images live relative to the repository (absent in a fresh clone).
CELEBA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "celeba"

#: A training run small enough for a test: 16x16 crops, DnCNN 3x8, two steps per epoch.
TINY = [
    "--image-size", "16", "--depth", "3", "--width", "8", "--batch-size", "4",
    "--builtin-crops", "8", "4", "4",
    "--pretrain-steps", "2", "--epochs", "1", "--max-iter", "8", "--eval-max-iter", "8",
    "--budgets", "1", "2", "--figure-samples", "2", "--eval-batch-size", "4",
    "--device", "cpu", "--no-progress", "--quiet",
]  # fmt: skip
