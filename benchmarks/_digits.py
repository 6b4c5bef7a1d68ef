"""The gallery's MDEQ-style digits classifier (``examples/gallery/plot_digits_classifier.py``),
rebuilt for the reuse benchmarks: the same data split and standardisation, the same cell
(GroupNorm, spectral-normed 3x3 convolutions, variational dropout), head and optimiser, with
the DEQ's solver, backward rule and cache as arguments and the dataset index of every
training image, for the cache's keys."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

import implicitlayers as il


@dataclass(frozen=True)
class DigitsSettings:
    channels: int = 16
    groups: int = 4
    dropout: float = 0.1
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


@dataclass
class Digits:
    """The split: training images with their indices, and the test images."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    @property
    def train_set(self) -> torch.utils.data.TensorDataset:
        """``(image, label, index)`` triples."""
        n = len(self.train_labels)
        return torch.utils.data.TensorDataset(self.train_images, self.train_labels, torch.arange(n))


def load_digits(seed: int = 0, train_size: int | None = None) -> Digits:
    """scikit-learn's 8x8 digits, a stratified quarter for testing, standardised with the
    training statistics (as the gallery); ``train_size``: only the first so many training
    images (a smoke test's size)."""
    from sklearn.datasets import load_digits as sk_load  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    digits = sk_load()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)), test_size=0.25, stratify=labels, random_state=seed
    )
    images = (images - images[train_idx].mean()) / images[train_idx].std()
    train_idx = train_idx[:train_size]
    return Digits(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


class Cell(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.conv2 = spectral_norm(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.norm1, self.norm2, self.norm3 = (nn.GroupNorm(groups, channels) for _ in range(3))
        self.drop = il.nn.VariationalDropout2d(dropout)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        y = self.drop(torch.relu(self.norm1(self.conv1(z))))
        out: Tensor = self.norm3(torch.relu(z + self.norm2(self.conv2(y) + x)))
        return out


class Classifier(nn.Module):
    """Stem, the cell's fixed point, head."""

    def __init__(self, settings: DigitsSettings, **deq: Any) -> None:
        super().__init__()
        c = settings.channels
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(settings.groups, c))
        self.cell = Cell(c, settings.groups, settings.dropout)
        self.deq = il.DEQ(self.cell, **deq)
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * c, 10))

    def forward(self, images: Tensor, keys: Tensor | None = None) -> tuple[Tensor, il.DEQOutput]:
        """Logits and the DEQ's output; ``keys`` (dataset indices) reach the DEQ only when it
        has a cache."""
        x = self.stem(images)
        out = self.deq(x, keys=None if self.deq.cache is None else keys)
        return self.head(out.z), out


def make(settings: DigitsSettings, **deq: Any) -> tuple[Classifier, torch.optim.Optimizer]:
    """The model (initial weights from ``settings.seed``) and its Adam optimiser."""
    torch.manual_seed(settings.seed)
    model = Classifier(settings, **deq)
    return model, torch.optim.Adam(model.parameters(), lr=settings.lr)


def loader(
    data: Digits, settings: DigitsSettings, seed: int
) -> torch.utils.data.DataLoader[tuple[Tensor, ...]]:
    """Shuffled batches of ``(image, label, index)``, the order fixed by ``seed``."""
    return torch.utils.data.DataLoader(
        data.train_set,
        batch_size=settings.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


@dataclass
class StepStats:
    """One training step: wall time, mean forward iterations per sample, the fraction of
    samples converged, ``f`` evaluations of the solve (on the whole batch) and of the cache's
    check, samples started from the cache, and cached entries the check turned down."""

    seconds: float
    iterations: float
    converged: float
    f_evals: int
    check_evals: int
    hits: int
    worse: int


def train_step(
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    keys: Tensor | None,
) -> StepStats:
    cache = model.deq.cache
    checks = 0 if cache is None else cache.stats.check_evaluations
    worse = 0 if cache is None else cache.stats.worse
    start = time.perf_counter()
    logits, out = model(images, keys=keys)
    loss = nn.functional.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    if cache is not None:
        cache.step()
    seconds = time.perf_counter() - start
    hits = 0 if out.from_cache is None else int(out.from_cache.sum())
    checks = 0 if cache is None else cache.stats.check_evaluations - checks
    worse = 0 if cache is None else cache.stats.worse - worse
    result = out.result
    return StepStats(
        seconds=seconds,
        iterations=float(result.n_steps.float().mean()),
        converged=float(result.converged.float().mean()),
        f_evals=result.n_f_evals,
        check_evals=checks,
        hits=hits,
        worse=worse,
    )


@torch.no_grad()
def accuracy(model: Classifier, data: Digits) -> float:
    """Test accuracy (eval mode: no dropout, no cache)."""
    model.eval()
    logits, _ = model(data.test_images)
    model.train()
    return float((logits.argmax(1) == data.test_labels).float().mean())
