"""
An MDEQ-style classifier of handwritten digits
==============================================

Train a one-resolution MDEQ (Bai et al., 2020) on scikit-learn's 8 × 8 digits on a CPU, four
ways: :class:`~implicitlayers.JFB`, JFB with the Jacobian penalty of Bai, Koltun & Kolter
(2021), :class:`~implicitlayers.PhantomGradient` (Geng et al., 2021), and an explicit network
of the same layers; per epoch, record test accuracy, solver iterations and the spectral radius
of the cell's Jacobian. :doc:`/tutorials/digits_results` has a longer run and what it means.
"""

# %%
# Settings
# --------
#
# ``IMPLICITLAYERS_GALLERY_FULL=1``: a longer run; ``IMPLICITLAYERS_GALLERY_QUICK=1``: one epoch.

import os
import time
from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import implicitlayers as il


@dataclass(frozen=True)
class Settings:
    epochs: int = 6
    train_size: int | None = None  # None: the whole training split
    channels: int = 16
    groups: int = 4  # of GroupNorm
    dropout: float = 0.1  # variational (weight-tied) channel dropout inside the cell
    batch_size: int = 64
    lr: float = 3e-3
    jacobian_weight: float = 2.0  # gamma: loss += gamma * ||J_f||_F^2 / n, as Bai et al.
    explicit_depth: int = 4  # applications of the cell in the explicit network
    radius_batch: int = 32  # test images on which the spectral radius is estimated
    seed: int = 0


settings = Settings()
if os.environ.get("IMPLICITLAYERS_GALLERY_FULL") == "1":
    settings = replace(settings, epochs=30, radius_batch=64)
if os.environ.get("IMPLICITLAYERS_GALLERY_QUICK") == "1":
    settings = replace(settings, epochs=1, train_size=128, radius_batch=8)
print(settings)

solver = il.Anderson(max_iter=30, rtol=1e-3)
# The layers are small: one thread is faster than two here.
threads = torch.get_num_threads()
torch.set_num_threads(1)

# %%
# Data
# ----
#
# A stratified split, a quarter for testing, standardised with the training statistics.

digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
labels = torch.tensor(digits.target)
train_idx, test_idx = train_test_split(
    torch.arange(len(labels)), test_size=0.25, stratify=labels, random_state=settings.seed
)
train_idx = train_idx[: settings.train_size]
images = (images - images[train_idx].mean()) / images[train_idx].std()
train_set = torch.utils.data.TensorDataset(images[train_idx], labels[train_idx])
test_images, test_labels = images[test_idx], labels[test_idx]
print(f"{len(train_set)} training and {len(test_labels)} test images")

# %%
# Model
# -----
#
# The cell is MDEQ's residual block at one resolution, on ``(B, C, 8, 8)`` maps :math:`z`
# and injected features :math:`x`:
#
# .. math::
#
#     f(z, x) = \mathrm{GN}\Big(\mathrm{ReLU}\big(z + \mathrm{GN}(W_2 * y + x)\big)\Big),
#     \qquad y = \mathrm{drop}\big(\mathrm{ReLU}(\mathrm{GN}(W_1 * z))\big),
#
# with GroupNorm GN, spectral-normed 3 × 3 convolutions and variational dropout, whose weights
# and mask stay fixed during a solve (:doc:`/guide/one_map`). The explicit network applies the
# cell ``explicit_depth`` times from :math:`z = 0` with :func:`~implicitlayers.unroll`.


class Cell(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.conv2 = spectral_norm(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.norm1, self.norm2, self.norm3 = (nn.GroupNorm(groups, channels) for _ in range(3))
        self.drop = il.nn.VariationalDropout2d(dropout)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(torch.relu(self.norm1(self.conv1(z))))
        return self.norm3(torch.relu(z + self.norm2(self.conv2(y) + x)))


class Classifier(nn.Module):
    """Stem, then the cell's fixed point (``backward`` given) or ``depth`` applications."""

    def __init__(self, backward: il.AbstractBackward | None, depth: int = 0) -> None:
        super().__init__()
        c = settings.channels
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(settings.groups, c))
        self.cell = Cell(c, settings.groups, settings.dropout)
        self.deq = None if backward is None else il.DEQ(self.cell, solver=solver, backward=backward)
        self.depth = depth
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * c, 10))

    def forward(
        self, images: torch.Tensor, jacobian_penalty: int = 0, spectral_radius: bool = False
    ) -> tuple[torch.Tensor, il.DEQOutput | None]:
        x = self.stem(images)
        if self.deq is None:
            return self.head(il.unroll(self.cell, torch.zeros_like(x), x, steps=self.depth)), None
        out = self.deq(x, jacobian_penalty=jacobian_penalty, spectral_radius=spectral_radius)
        return self.head(out.z), out


# %%
# The variants
# ------------
#
# Bai et al. add :math:`\gamma\, \|J_f(z^\star)\|_F^2 / n` to the loss (:math:`n`: the size
# of one state); ``deq(x, jacobian_penalty=1)`` returns a one-probe Hutchinson estimate.

variants = {
    "JFB": dict(backward=il.JFB()),
    "JFB + Jacobian penalty": dict(backward=il.JFB(), penalty=settings.jacobian_weight),
    "phantom gradient": dict(backward=il.PhantomGradient(steps=5, mixing=0.5)),
    "explicit": dict(backward=None, depth=settings.explicit_depth),
}

# %%
# Training and evaluation
# -----------------------
#
# Adam with a cosine schedule; before training and after every epoch, the test accuracy,
# iterations, converged fraction and :math:`\rho(J_f(z^\star))` (``spectral_radius=True``).


def mean(values: torch.Tensor) -> float:
    return values.float().mean().item()


@torch.no_grad()
def evaluate(model: Classifier) -> dict[str, float]:
    model.eval()
    logits, out = model(test_images)
    record = {"accuracy": mean(logits.argmax(1) == test_labels), "iterations": model.depth}
    record |= dict.fromkeys(("converged", "radius", "radius_settled"), float("nan"))
    if out is not None:
        _, probe = model(test_images[: settings.radius_batch], spectral_radius=True)
        record |= {"iterations": mean(out.result.n_steps), "converged": mean(out.result.converged)}
        record["radius"] = mean(probe.spectral_radius.radius)
        record["radius_settled"] = mean(probe.spectral_radius.converged)
    model.train()
    return record


def train(backward: il.AbstractBackward | None, depth: int = 0, penalty: float = 0.0):
    torch.manual_seed(settings.seed)  # the same initial weights for all variants
    model = Classifier(backward, depth)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    shuffle = torch.Generator().manual_seed(settings.seed)  # and the same batches
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=settings.batch_size, shuffle=True, generator=shuffle
    )
    history = []
    for epoch in range(settings.epochs + 1):  # epoch 0: the initial weights
        start = time.perf_counter()
        if epoch:
            for batch, target in loader:
                logits, out = model(batch, jacobian_penalty=1 if penalty else 0)
                loss = nn.functional.cross_entropy(logits, target)
                if penalty:
                    loss = loss + penalty * out.jacobian_penalty.mean() / out.z[0].numel()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            schedule.step()
        seconds = time.perf_counter() - start if epoch else float("nan")
        history.append({**evaluate(model), "seconds": seconds})
        print(f"  epoch {epoch:2d}:", ", ".join(f"{k} {v:.3g}" for k, v in history[-1].items()))
    return sum(p.numel() for p in model.parameters()), history


runs = {}
for name, spec in variants.items():
    print(name)
    runs[name] = train(**spec)

# %%
# Results
# -------

fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), layout="constrained")
for name, (_, history) in runs.items():
    for ax, key in zip(axes, ("accuracy", "iterations", "radius"), strict=True):
        ax.plot([h[key] for h in history], marker=".", label=name)
axes[0].set(xlabel="epoch", ylabel="test accuracy", ylim=(0.8, 1.0))
axes[1].set(xlabel="epoch", ylabel="forward iterations per sample")
axes[2].set(xlabel="epoch", ylabel=r"mean spectral radius $\rho(J_f(z^\star))$")
axes[0].legend()
plt.show()

print(f"{'variant':24s} params accuracy   iterations    converged       radius s/epoch")
for name, (params, history) in runs.items():
    first, last = history[1], history[-1]  # after the first epoch, and at the end
    decimals = {"iterations": 1, "converged": 2, "radius": 3}
    change = [f"{first[k]:5.{p}f} -> {last[k]:4.{p}f}" for k, p in decimals.items()]
    seconds = sum(h["seconds"] for h in history[1:]) / settings.epochs
    print(f"{name:24s} {params:6d} {last['accuracy']:8.3f}", *change, f"{seconds:7.2f}")
torch.set_num_threads(threads)

# %%
# Trained with JFB alone the cell drifts towards the edge of contraction (:math:`\rho \to 1`,
# more iterations, fewer converged samples); the Jacobian penalty pulls :math:`\rho` down and
# shortens the solves (:doc:`/tutorials/digits_results`).
