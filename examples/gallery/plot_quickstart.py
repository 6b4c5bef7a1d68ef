"""
Quick start: a DEQ layer in ten lines
=====================================

Wrap an ``nn.Module`` in :class:`~implicitlayers.DEQ`, read the
:class:`~implicitlayers.SolverResult` of its forward solve, and train it for a few steps.
"""

# %%
# A DEQ layer's output is the fixed point :math:`z^\star = f(z^\star, x)` of a cell: any
# ``nn.Module`` with ``forward(z, x)``, here a contraction in :math:`z` (:doc:`/getting_started`).

import matplotlib.pyplot as plt
import torch

import implicitlayers as il

torch.manual_seed(0)


class Cell(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.inject = torch.nn.Linear(width, width)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.5 * self.lin(z) + self.inject(x))


deq = il.DEQ(Cell(16), solver=il.Anderson(max_iter=50, rtol=1e-4), backward=il.JFB())
print(deq)

# %%
# Calling the layer returns a :class:`~implicitlayers.DEQOutput`: the fixed point and the
# solve's result, one entry per sample.

x = torch.randn(256, 16)
z, result = deq(x)
print(z.shape)
print(result.summary())
print("steps per sample (first 8):", result.n_steps[:8].tolist())
print("largest residual:", f"{result.residual.max():.2e}")

# %%
# Train it like any other layer; ``result.n_steps`` shows how hard the solver works.

target = torch.sin(x[:, :4].sum(dim=1, keepdim=True))
head = torch.nn.Linear(16, 1)
optimizer = torch.optim.Adam([*deq.parameters(), *head.parameters()], lr=1e-2)
losses, steps = [], []
for _ in range(150):
    z, result = deq(x)
    loss = torch.nn.functional.mse_loss(head(z), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    steps.append(result.n_steps.float().mean().item())
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; converged: {bool(result.converged.all())}")

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(8, 3), layout="constrained")
ax0.semilogy(losses)
ax0.set(xlabel="training step", ylabel="MSE", title="Training loss")
ax1.plot(steps)
ax1.set(xlabel="training step", ylabel="mean solver steps", title="Forward solve cost")
plt.show()

# %%
# At test time, pass a larger budget or a tighter tolerance for one call:

with torch.no_grad():
    z, result = deq(x, solver=il.Anderson(max_iter=100, rtol=1e-6))
print(result.summary())
