"""
Picard, Anderson and Broyden on a tanh layer
============================================

Compare the residual traces of the three solvers on fixed-point problems
:math:`z = \\tanh(Wz + x)` whose weights contract by :math:`\\gamma = 0.95`: slow enough
that acceleration matters, and a second case where it cannot help.
"""

# %%
# The Jacobian of :math:`f` is :math:`D W`, :math:`D` diagonal in :math:`(0, 1]` and close to
# :math:`I` for small inputs, so the eigenvalues of :math:`W` govern each solver. The first
# problem takes a symmetric :math:`W` with eigenvalues spread over :math:`[-0.95, 0.95]`.

import time

import matplotlib.pyplot as plt
import torch

import implicitlayers as il

torch.manual_seed(0)
n, batch = 128, 32
Q, _ = torch.linalg.qr(torch.randn(n, n))
W_real = Q @ torch.diag(torch.linspace(-0.95, 0.95, n)) @ Q.T
x = 0.2 * torch.randn(batch, n)
z0 = torch.zeros(batch, n)

shared = dict(max_iter=300, atol=0.0, rtol=1e-6, trace=True)
solvers = {
    "Picard": il.Picard(**shared),
    "Picard, mixing 0.5": il.Picard(mixing=0.5, **shared),
    "Anderson, m = 5": il.Anderson(history_size=5, **shared),
    "Broyden, history_size 20": il.Broyden(history_size=20, **shared),
}


def compare(W: torch.Tensor) -> dict[str, il.SolverResult]:
    """Solve z = tanh(W z + x) with every solver; print steps and time."""

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x)

    results = {}
    for name, solver in solvers.items():
        start = time.perf_counter()
        results[name] = result = il.fixed_point(f, z0, x, solver=solver)
        ms = 1e3 * (time.perf_counter() - start)
        done, steps = int(result.converged.sum()), int(result.n_steps.median())
        print(f"{name:20s} converged {done:2d}/{batch}, median steps {steps:3d}, {ms:5.1f} ms")
    return results


real_spectrum = compare(W_real)

# %%
# The second problem takes :math:`W = 0.95\,Q` with :math:`Q` orthogonal: every singular
# value is 0.95 and the eigenvalues lie on the circle of radius 0.95 in the complex plane.

circle_spectrum = compare(0.95 * Q)

# %%
# Plot the median residual :math:`\|f(z_k) - z_k\|` against the evaluations of :math:`f` (one
# per iteration for every solver); each curve stops at the median number of steps.

fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True, layout="constrained")
titles = ("eigenvalues of W in [-0.95, 0.95]", "eigenvalues of W on |λ| = 0.95")
for ax, results, title in zip(axes, (real_spectrum, circle_spectrum), titles, strict=True):
    for name, result in results.items():
        steps = int(result.n_steps.median())
        ax.semilogy(result.trace[:steps].median(dim=1).values, label=name)
    ax.set(xlabel="evaluations of f", title=title)
axes[0].set(ylabel="residual (median over batch)")
axes[0].legend()
plt.show()

# %%
# On the real spectrum Anderson and Broyden need well under half of Picard's evaluations; on
# the circle no polynomial in the Jacobian beats :math:`J^k`, and all take about as many.
# Mixing 0.5 slows Picard on both: it stabilises, it does not accelerate (:doc:`/guide/solvers`).
