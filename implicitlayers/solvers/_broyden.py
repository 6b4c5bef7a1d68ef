"""Limited-memory Broyden's method on the residual g(z) = f(z) - z."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import check_int
from ._base import AbstractSolver, SolverState

__all__ = ["Broyden"]


@dataclass(frozen=True, kw_only=True, repr=False)
class Broyden(AbstractSolver):
    r"""Broyden's ("good") quasi-Newton method, limited memory, on :math:`g(z) = f(z) - z`.

    The inverse Jacobian of :math:`g` is approximated by a low-rank update of
    :math:`-I` (the Picard step), :math:`H_k = -I + \sum_{i} u_i v_i^\top`, and

    .. math::

        z_{k+1} = z_k - H_k\, g(z_k), \qquad
        H_{k+1} = H_k + \frac{(\Delta z - H_k \Delta g)\, \Delta z^\top H_k}
                             {\Delta z^\top H_k \Delta g},

    with :math:`\Delta z = z_{k+1} - z_k`, :math:`\Delta g = g(z_{k+1}) - g(z_k)`
    (Sherman-Morrison form). At most ``memory`` pairs :math:`(u_i, v_i)` are kept,
    so memory is two ``(B, memory, n)`` buffers whatever ``max_iter`` is; each step multiplies
    only by the slots filled so far, so a large ``memory`` costs time only as it fills (the
    driver loop passes the step count, so this needs no host synchronisation). When it is full
    the approximation restarts from :math:`-I` (overwriting the oldest update instead breaks
    the secant conditions of the newer ones and can diverge).
    A vanishing denominator restarts the sample's memory (reported as ``Status.BREAKDOWN`` if
    the sample then ends unconverged). Also takes the shared options of
    :class:`~implicitlayers.solvers.AbstractSolver`.

    Args:
        memory: Most rank-one updates stored per sample.

    Example:
        >>> import torch, implicitlayers as il
        >>> r = il.fixed_point(lambda z: torch.cos(z), torch.zeros(1, 1),
        ...                    solver=il.Broyden(rtol=1e-6))
        >>> round(r.z.item(), 4)  # the Dottie number
        0.7391
    """

    memory: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("memory", self.memory, minimum=1)

    def init(self, z: Tensor) -> SolverState:
        batch, n = z.shape
        return {
            "U": z.new_zeros(batch, self.memory, n),
            "V": z.new_zeros(batch, self.memory, n),
            "count": torch.zeros(batch, dtype=torch.long, device=z.device),
            "dz": torch.zeros_like(z),  # the previous step, z_k - z_{k-1} = -H_{k-1} g_{k-1}
            "g_prev": torch.zeros_like(z),
            "has_prev": torch.zeros(batch, dtype=torch.bool, device=z.device),
        }

    def step(self, state: SolverState, z: Tensor, fz: Tensor) -> tuple[Tensor, SolverState, Tensor]:
        return self._step(state, z, fz, self.memory)

    def step_at(
        self, iteration: int, state: SolverState, z: Tensor, fz: Tensor
    ) -> tuple[Tensor, SolverState, Tensor]:
        # At most one update is stored per step, so only the first `iteration` slots can be
        # filled: multiplying by those alone gives the same iterates at a fraction of the cost
        # while the memory fills (memory=100 would otherwise cost 100 slots from the start).
        return self._step(state, z, fz, min(iteration, self.memory))

    def _step(
        self, state: SolverState, z: Tensor, fz: Tensor, used: int
    ) -> tuple[Tensor, SolverState, Tensor]:
        """One step that multiplies only by the first ``used`` memory slots."""
        U, V, count = state["U"], state["V"], state["count"]
        has_prev, dz = state["has_prev"], state["dz"]
        batch, m = U.shape[0], self.memory
        rows = torch.arange(batch, device=z.device)
        g = fz - z
        dg = g - state["g_prev"]
        U_used, V_used = U[:, :used], V[:, :used]
        valid = torch.arange(used, device=z.device)[None, :] < count[:, None]
        # Two products with the memory per step instead of three: since the previous step was
        # dz = -H g_prev, H dg = H g + dz, so u = (dz - H dg) / (v . dg) = -H g / (v . dg).
        hg = _matvec(U_used, V_used, valid, g)
        v = _rmatvec(U_used, V_used, valid, dz)
        denom = (v * dg).sum(dim=1)
        u = -hg / denom[:, None]
        size = torch.linalg.vector_norm(v, dim=1) * torch.linalg.vector_norm(dg, dim=1)
        tiny = torch.finfo(z.dtype).eps * size
        ok = torch.isfinite(u).all(dim=1) & (denom.abs() > tiny)
        breakdown = has_prev & ~ok
        write = has_prev & ok
        # A full memory restarts from H = -I: overwriting the oldest update instead breaks the
        # secant conditions the newer updates rely on and can make the iteration diverge.
        reset = breakdown | (write & (count >= m))
        count = torch.where(reset, 0, count)
        slot = count.clamp(max=m - 1)
        U[rows, slot] = torch.where(write[:, None], u, U[rows, slot])
        V[rows, slot] = torch.where(write[:, None], v, V[rows, slot])
        count = torch.where(write, count + 1, count)
        # H_new g = H g + u (v . g), where H is -I after a restart.
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


def _matvec(U: Tensor, V: Tensor, valid: Tensor, x: Tensor) -> Tensor:
    """:math:`H x = -x + \\sum_i u_i (v_i^\\top x)` over the valid updates."""
    coeff = torch.bmm(V, x[:, :, None]).squeeze(2) * valid
    return -x + torch.bmm(coeff[:, None, :], U).squeeze(1)


def _rmatvec(U: Tensor, V: Tensor, valid: Tensor, x: Tensor) -> Tensor:
    """:math:`H^\\top x = -x + \\sum_i v_i (u_i^\\top x)` over the valid updates."""
    coeff = torch.bmm(U, x[:, :, None]).squeeze(2) * valid
    return -x + torch.bmm(coeff[:, None, :], V).squeeze(1)
