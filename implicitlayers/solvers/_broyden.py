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
    so memory is two ``(B, memory + 1, n)`` buffers (one scratch slot) whatever ``max_iter``
    is; each step multiplies only by the slots filled so far, so a large ``memory`` costs time
    only as it fills (the driver loop passes the step count, so this needs no host
    synchronisation). When it is full
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
            # One slot more than `memory`: rows that store no update this step write to the
            # last, scratch slot (never multiplied), so a store is a single scatter.
            "U": z.new_zeros(batch, self.memory + 1, n),
            "V": z.new_zeros(batch, self.memory + 1, n),
            "count": torch.zeros(batch, dtype=torch.long, device=z.device),
            "hg": torch.zeros_like(z),  # the previous H g, so the previous step was dz = -hg
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
        has_prev, hg_prev = state["has_prev"], state["hg"]
        batch, m = U.shape[0], self.memory
        g = fz - z
        dg = g - state["g_prev"]
        U_used, V_used = U[:, :used], V[:, :used]
        valid = (torch.arange(used, device=z.device)[None, :] < count[:, None]).to(z.dtype)
        # Two products with the memory per step instead of three: since the previous step was
        # dz = -H g_prev, H dg = H g + dz, so u = (dz - H dg) / (v . dg) = -H g / (v . dg).
        # H g = -g + sum_i u_i (v_i . g) and v = H^T dz = hg_prev - sum_i v_i (u_i . hg_prev),
        # each one fused multiply-add over the slots.
        hg = _accumulate(g, _coefficients(V_used, g, valid), U_used, beta=-1.0)
        v = _accumulate(hg_prev, _coefficients(U_used, hg_prev, valid), V_used, alpha=-1.0)
        denom = _dot(v, dg)
        size = torch.linalg.vector_norm(v, dim=1) * torch.linalg.vector_norm(dg, dim=1)
        tiny = torch.finfo(z.dtype).eps * size
        # u = -hg / denom is finite exactly when its norm is (no full-state isfinite pass).
        ok = torch.isfinite(torch.linalg.vector_norm(hg, dim=1) / denom) & (denom.abs() > tiny)
        breakdown = has_prev & ~ok
        write = has_prev & ok
        # Zero where nothing is stored (rows whose u is not finite included).
        u = torch.where(write[:, None], hg / -denom[:, None], 0.0)
        # A full memory restarts from H = -I: overwriting the oldest update instead breaks the
        # secant conditions the newer updates rely on and can make the iteration diverge.
        reset = breakdown | (write & (count >= m))
        count = torch.where(reset, 0, count)
        slot = torch.where(write, count, m)  # m: the scratch slot
        rows = torch.arange(batch, device=z.device)
        U[rows, slot] = u
        V[rows, slot] = v
        count = count + write
        # H_new g = H g + u (v . g), where H is -I after a restart.
        hg = torch.where(reset[:, None], -g, hg).addcmul_(u, _dot(v, g)[:, None])
        new_state = {
            "U": U,
            "V": V,
            "count": count,
            "hg": hg,
            "g_prev": g,
            "has_prev": torch.ones_like(has_prev),
        }
        return z - hg, new_state, breakdown


def _coefficients(W: Tensor, x: Tensor, valid: Tensor) -> Tensor:
    """``(B, 1, k)`` products :math:`w_i^\\top x` of the ``k`` slots of ``W``, zero where not
    ``valid``."""
    # As a row vector times W^T: several times faster on CPU than W times a column vector.
    return torch.bmm(x[:, None, :], W.transpose(1, 2)) * valid[:, None, :]


def _accumulate(
    x: Tensor, coeff: Tensor, W: Tensor, *, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """:math:`\\beta x + \\alpha \\sum_i c_i w_i` per sample, in one ``baddbmm``."""
    return torch.baddbmm(x[:, None, :], coeff, W, beta=beta, alpha=alpha).squeeze(1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample dot products of ``(B, n)`` tensors, without an elementwise temporary."""
    out: Tensor = torch.linalg.vecdot(a, b)
    return out
