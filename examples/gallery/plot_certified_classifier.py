"""
Certified equilibrium classifiers: monotone and Lipschitz-bounded cells
=======================================================================

Train four equilibrium classifiers on scikit-learn's digits on a CPU and watch what a
certificate buys: an unconstrained DEQ cell :math:`\\mathrm{ReLU}(Wz + Ux + b)`, the same cell
with a monotone parametrisation of :math:`W` (monDEQ, dense and convolutional), and a
Lipschitz-bounded equilibrium network (LBEN). Per epoch: test accuracy, solver iterations,
samples that failed to converge, seconds. :doc:`/tutorials/certified_results` has a longer run
and what it means; :doc:`/guide/certified` the guarantees.
"""

# %%
# Settings
# --------
#
# ``IMPLICITLAYERS_GALLERY_FULL=1``: a longer run; ``IMPLICITLAYERS_GALLERY_QUICK=1``: one epoch.

import os
import statistics
import time
from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import implicitlayers as il


@dataclass(frozen=True)
class Settings:
    epochs: int = 4
    train_size: int | None = None  # None: the whole training split
    width: int = 64  # n, the equilibrium state of the dense cells
    channels: int = 8  # C, the state of the convolutional cell: (C, 8, 8)
    margin: float = 0.5  # m of the monotone parametrisations
    lipschitz: float = 4.0  # gamma, the certified bound of the LBEN's x -> logits
    batch_size: int = 64
    lr: float = 2e-3
    max_iter: int = 50  # the same budget and tolerance for every solver
    rtol: float = 1e-4
    radius: float = 0.5  # the l2 radius of the certified robust accuracy
    seed: int = 0


settings = Settings()
if os.environ.get("IMPLICITLAYERS_GALLERY_FULL") == "1":
    settings = replace(settings, epochs=30)
if os.environ.get("IMPLICITLAYERS_GALLERY_QUICK") == "1":
    settings = replace(settings, epochs=1, train_size=128)
print(settings)

threads = torch.get_num_threads()
torch.set_num_threads(1)  # small layers: one thread is faster than two

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
index = torch.arange(len(labels))
train_set = torch.utils.data.TensorDataset(images[train_idx], labels[train_idx], index[train_idx])
test_images, test_labels = images[test_idx], labels[test_idx]
print(f"{len(train_set)} training and {len(test_labels)} test images")

# %%
# Models
# ------
#
# Every model maps an image to an equilibrium state and the state to ten logits. The
# unconstrained cell is solved by Anderson acceleration; the monotone cells by
# Peaceman-Rachford splitting (:class:`~implicitlayers.nn.PeacemanRachford`) inside
# :class:`~implicitlayers.MonotoneDEQ`, which also returns each forward's certificate. All
# four are trained with exact implicit gradients.


class Unconstrained(nn.Module):
    """f(z, x) = ReLU(W z + U x + b), W free."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.W = nn.Linear(features, features, bias=False)
        self.U = nn.Linear(64, features)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.W(z) + self.U(x))


solver_options = dict(max_iter=settings.max_iter, rtol=settings.rtol)


class Classifier(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        n, m = settings.width, settings.margin
        self.kind = kind
        self.head: nn.Module = nn.Linear(n, 10)
        if kind == "unconstrained":
            self.cell: nn.Module = Unconstrained(n)
            self.deq: nn.Module = il.DEQ(
                self.cell,
                solver=il.Anderson(**solver_options),
                backward=il.ImplicitDifferentiation(on_unconverged="ignore"),
            )
        else:
            if kind == "monotone":
                self.cell = il.nn.MonotoneLinear(64, n, margin=m)
            elif kind == "monotone conv":
                self.cell = il.nn.MonotoneConv2d(1, settings.channels, margin=m)
                self.head = nn.Linear(settings.channels * 16, 10)
            else:  # LBEN: its own certified linear output gives the logits
                self.cell = il.nn.LBEN(64, n, 10, lipschitz=settings.lipschitz, margin=m)
            # Exact gradients too: MonotoneDEQ's default, a Picard adjoint (certified).
            self.deq = il.MonotoneDEQ(
                self.cell, solver=il.nn.PeacemanRachford(**solver_options), certify=False
            )

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.kind == "monotone conv" else images.flatten(1)

    def solve(self, images: torch.Tensor) -> tuple[torch.Tensor, il.SolverResult]:
        x = self.inputs(images)
        z0 = torch.zeros(len(x), settings.width) if self.kind == "unconstrained" else None
        z, result = self.deq(x, z0=z0)
        return z, result

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "LBEN":
            return self.cell.output(z)
        if self.kind == "monotone conv":
            z = nn.functional.avg_pool2d(z, 2).flatten(1)
        return self.head(z)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, il.SolverResult]:
        z, result = self.solve(images)
        return self.readout(z), result


# %%
# Training and evaluation
# -----------------------
#
# Adam with a cosine schedule. Before training and after every epoch: test accuracy, solver
# iterations, and every sample whose solve did not end ``SUCCESS`` (forward, or the adjoint
# solve of its gradient in training). For every ``SUCCESS`` we
# re-evaluate the residual of the cell's own equilibrium map,
# :math:`\|\mathrm{ReLU}(Wz + Ux + b) - z\|`, rather than trusting the solver.


def natural_residual(model: Classifier, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    x = model.inputs(images)
    return (model.cell(z, x) - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1).clamp(1e-12)


@torch.no_grad()
def evaluate(model: Classifier, failed: set[int]) -> dict[str, float]:
    """Test accuracy and iterations; adds the test samples that did not converge to ``failed``."""
    model.eval()
    z, result = model.solve(test_images)
    ok = result.converged
    failed |= set(test_idx[~ok].tolist())
    record = {
        "accuracy": (model.readout(z).argmax(1) == test_labels).float().mean().item(),
        "iterations": result.n_steps.float().mean().item(),
        "unconverged": int((~ok).sum()),
        "relative residual": natural_residual(model, test_images, z)[ok].max().item(),
    }
    model.train()
    return record


class Run:
    """One model with its optimiser, its batches and what it has measured so far."""

    def __init__(self, kind: str) -> None:
        torch.manual_seed(settings.seed)
        self.model = Classifier(kind)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.lr)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, settings.epochs)
        shuffle = torch.Generator().manual_seed(settings.seed)  # the same batches for all
        self.loader = torch.utils.data.DataLoader(
            train_set, batch_size=settings.batch_size, shuffle=True, generator=shuffle
        )
        # Samples whose forward solve (in training or at a test evaluation), or whose
        # gradient's adjoint solve, ever failed.
        self.failed: dict[str, set[int]] = {"train": set(), "test": set(), "adjoint": set()}
        self.history = [self.record(float("nan"))]  # epoch 0: the initial weights

    def epoch(self) -> None:
        model, failed = self.model, self.failed
        start = time.perf_counter()
        for batch, target, idx in self.loader:
            logits, result = model(batch)
            failed["train"] |= set(idx[~result.converged].tolist())
            loss = nn.functional.cross_entropy(logits, target)
            self.optimizer.zero_grad()
            loss.backward()
            failed["adjoint"] |= set(idx[~model.deq.last_backward_result.converged].tolist())
            self.optimizer.step()
        self.schedule.step()
        self.history.append(self.record(time.perf_counter() - start))

    def record(self, seconds: float) -> dict[str, float]:
        record = {**evaluate(self.model, self.failed["test"]), "seconds": seconds}
        return record | {f"{key} failures": len(ids) for key, ids in self.failed.items()}


# The four models train side by side, one epoch each in turn, so that their seconds per epoch
# are measured under the same load.
runs = {kind: Run(kind) for kind in ("unconstrained", "monotone", "monotone conv", "LBEN")}
for epoch in range(1, settings.epochs + 1):
    for kind, run in runs.items():
        run.epoch()
        print(
            f"epoch {epoch:2d} {kind:13s}",
            ", ".join(f"{k} {v:.3g}" for k, v in run.history[-1].items()),
        )

# %%
# Certificates of the trained monotone cells
# ------------------------------------------
#
# :meth:`~implicitlayers.nn.MonotoneCell.certificate` gives, for the trained weights, the
# contraction factor of Peaceman-Rachford and the constant that turns a residual into an
# error bound; for the LBEN also the certified Lipschitz bound of ``x -> logits``, which gives
# each test image a radius within which no perturbation can change its predicted class.

for kind in ("monotone", "monotone conv", "LBEN"):
    model = runs[kind].model
    x = model.inputs(test_images)
    cert = model.cell.certificate(model.cell.state_shape(x), il.nn.PeacemanRachford())
    with torch.no_grad():
        z, result = model.solve(test_images)
        bound = cert.error_bound(result.residual)
    print(
        f"{kind}: rate {cert.rate:.3f} (from the margin: {cert.rate_from_margin:.3f}), "
        f"||W|| = {cert.weight_norm:.2f}, largest certified error {bound.max():.1e}"
    )

lben = runs["LBEN"].model
with torch.no_grad():
    logits = lben(test_images)[0]
top2 = logits.topk(2, dim=1).values
margin = top2[:, 0] - top2[:, 1]  # the logit difference is sqrt(2) gamma-Lipschitz
correct = logits.argmax(1) == test_labels
robust = correct & (margin > 2**0.5 * settings.lipschitz * settings.radius)
print(
    f"LBEN: certified Lipschitz bound {settings.lipschitz}, certified robust accuracy at "
    f"l2 radius {settings.radius}: {robust.float().mean():.3f}"
)

# %%
# Results
# -------

fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), layout="constrained")
for kind, run in runs.items():
    for ax, key in zip(axes, ("accuracy", "iterations", "unconverged"), strict=True):
        ax.plot([h[key] for h in run.history], marker=".", label=kind)
axes[0].set(xlabel="epoch", ylabel="test accuracy", ylim=(0.5, 1.0))
axes[1].set(xlabel="epoch", ylabel="forward iterations per sample")
axes[2].set(xlabel="epoch", ylabel="test images not converged")
axes[0].legend()
plt.show()

print(
    f"{'model':14s} params accuracy  iterations  unconverged    ever failed: train, test, "
    "adjoint  s/epoch (median)"
)
for kind, run in runs.items():
    params = sum(p.numel() for p in run.model.parameters())
    first, last = run.history[0], run.history[-1]
    seconds = statistics.median(h["seconds"] for h in run.history[1:])
    failed = ", ".join(f"{len(run.failed[key]):4d}" for key in ("train", "test", "adjoint"))
    print(
        f"{kind:14s} {params:6d} {last['accuracy']:8.3f} {first['iterations']:5.1f} -> "
        f"{last['iterations']:4.1f} {first['unconverged']:4d} -> {last['unconverged']:3d} "
        f"{failed:>27s} {seconds:8.2f}"
    )
torch.set_num_threads(threads)

# %%
# The unconstrained cell is free to lose its equilibrium: nothing keeps Anderson's solve
# within budget as :math:`W` grows. The monotone cells cannot: their equilibrium is unique for
# every weight, and Peaceman-Rachford's iterations are bounded by the certified rate
# (:doc:`/tutorials/certified_results`).
