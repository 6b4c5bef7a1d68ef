"""Prototypes of proposed core changes, measured by the ``diagnostics`` suite only.

The library is not changed from here: these subclasses exist so a proposed fix can be
timed against the shipped code on the same problem in the same run, and checked to give the
same iterates. Each one names the cause it addresses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import implicitlayers as il
from implicitlayers.solvers import SolverState


@dataclass(frozen=True, kw_only=True, repr=False)
class SlicedBroyden(il.Broyden):
    r"""Broyden that only multiplies by the filled part of its memory.

    The shipped :class:`~implicitlayers.Broyden` multiplies by all ``memory`` slots every
    step and masks the empty ones, so ``memory=100`` costs 100 slots from the first step.
    This prototype runs the same update (two memory products per step, restart from
    :math:`H = -I` when the memory is full) on the first :math:`\min(k, m)` slots only. It
    reads the largest count on the host once per step; on CUDA the driver loop should pass
    its step index instead. It is self-contained (its own state), so it keeps measuring the
    same thing when the shipped solver's internals change. Same iterates up to rounding.
    """

    def init(self, z: Tensor) -> SolverState:
        batch, n = z.shape
        return {
            "U": z.new_zeros(batch, self.memory, n),
            "V": z.new_zeros(batch, self.memory, n),
            "count": torch.zeros(batch, dtype=torch.long, device=z.device),
            "dz": torch.zeros_like(z),
            "g_prev": torch.zeros_like(z),
            "has_prev": torch.zeros(batch, dtype=torch.bool, device=z.device),
        }

    def step(self, state: SolverState, z: Tensor, fz: Tensor) -> tuple[Tensor, SolverState, Tensor]:
        U, V, count = state["U"], state["V"], state["count"]
        has_prev, dz = state["has_prev"], state["dz"]
        batch, m = U.shape[0], self.memory
        rows = torch.arange(batch, device=z.device)
        used = min(int(count.max()), m)
        Uu, Vu = U[:, :used], V[:, :used]
        valid = torch.arange(used, device=z.device)[None, :] < count.clamp(max=m)[:, None]
        g = fz - z
        dg = g - state["g_prev"]
        coeff = torch.bmm(Vu, g[:, :, None]).squeeze(2) * valid
        hg = -g + torch.bmm(coeff[:, None], Uu).squeeze(1)  # H g
        coeff = torch.bmm(Uu, dz[:, :, None]).squeeze(2) * valid
        v = -dz + torch.bmm(coeff[:, None], Vu).squeeze(1)  # H^T dz
        denom = (v * dg).sum(dim=1)
        u = -hg / denom[:, None]  # (dz - H dg) / (v . dg) with H dg = H g + dz
        size = torch.linalg.vector_norm(v, dim=1) * torch.linalg.vector_norm(dg, dim=1)
        ok = torch.isfinite(u).all(dim=1) & (denom.abs() > torch.finfo(z.dtype).eps * size)
        breakdown = has_prev & ~ok
        write = has_prev & ok
        reset = breakdown | (write & (count >= m))
        count = torch.where(reset, 0, count)
        slot = count.clamp(max=m - 1)
        U[rows, slot] = torch.where(write[:, None], u, U[rows, slot])
        V[rows, slot] = torch.where(write[:, None], v, V[rows, slot])
        count = torch.where(write, count + 1, count)
        hg = torch.where(reset[:, None], -g, hg)
        hg = hg + torch.where(write[:, None], u * (v * g).sum(dim=1, keepdim=True), 0.0)
        new_state = {
            "U": U,
            "V": V,
            "count": count,
            "dz": -hg,
            "g_prev": g,
            "has_prev": torch.ones_like(has_prev),
        }
        return z - hg, new_state, breakdown
