"""Limited-memory Broyden's method on the residual g(z) = f(z) - z."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._validate import check_int
from ._base import AbstractSolver, SolverState, combine, dots, history_buffer
from ._estimate import InverseEstimate, low_rank

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
    (Sherman-Morrison form). At most ``history_size`` pairs :math:`(u_i, v_i)` are kept,
    so memory is two ``(B, history_size + 1, n)`` buffers (one scratch slot) whatever
    ``max_iter`` is; each step multiplies only by the slots filled so far, so a large
    ``history_size`` costs time only as it fills (the driver loop passes the step count, so
    this needs no host synchronisation). An update that finds the memory full drops every
    stored pair: the approximation restarts from :math:`-I` with that newest update alone
    (overwriting the oldest update instead breaks the secant conditions of the newer ones and
    can diverge).
    A vanishing denominator restarts the sample's memory (reported as ``Status.BREAKDOWN`` if
    the sample then ends unconverged). Also takes the shared options of
    :class:`~implicitlayers.solvers.AbstractSolver`.

    Args:
        history_size: Most rank-one updates stored per sample (as
            :class:`~implicitlayers.Anderson`'s ``history_size`` counts its stored residuals).

    Example:
        >>> import torch, implicitlayers as il
        >>> r = il.fixed_point(lambda z: torch.cos(z), torch.zeros(1, 1),
        ...                    solver=il.Broyden(rtol=1e-6))
        >>> round(r.z.item(), 4)  # the Dottie number
        0.7391
    """

    history_size: int = 10

    estimate_keys: ClassVar[tuple[str, ...]] = ("U", "V", "count")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("history_size", self.history_size, minimum=1)

    def inverse_estimate(self, state: SolverState) -> InverseEstimate:
        r"""Broyden's inverse estimate :math:`H = -I + \sum_i u_i v_i^\top \approx (J - I)^{-1}`
        as :math:`(I - J)^{-1} \approx -H = I - \sum_i u_i v_i^\top`: the stored updates
        (a restarted memory holds fewer, an empty one gives :math:`I`, which is JFB)."""
        m = self.history_size
        U, V, count = state["U"][:, :m], state["V"][:, :m], state["count"]
        valid = torch.arange(m, device=count.device)[None, :] < count[:, None]
        return low_rank(-U, V, valid)

    def init(self, z: Tensor) -> SolverState:
        batch = z.shape[0]
        return {
            # One slot more than `history_size`: rows that store no update this step write to the
            # last, scratch slot (never multiplied), so a store is a single scatter.
            "U": history_buffer(z, self.history_size + 1),
            "V": history_buffer(z, self.history_size + 1),
            "count": torch.zeros(batch, dtype=torch.long, device=z.device),
            "hg": torch.zeros_like(z),  # the previous H g, so the previous step was dz = -hg
            "g_prev": torch.zeros_like(z),
            # Slot indices, a batch-sized view (no memory): slot i holds an update iff i < count.
            "slots": torch.arange(self.history_size, device=z.device).expand(batch, -1),
        }

    def step(
        self, state: SolverState, z: Tensor, fz: Tensor, iteration: int
    ) -> tuple[Tensor, SolverState, Tensor]:
        """One step that multiplies only by the memory slots that can be filled.

        At most one update is stored per step, so only the first ``iteration`` slots can hold
        one: multiplying by those alone gives the same iterates at a fraction of the cost
        while the memory fills (``history_size=100`` would otherwise cost 100 slots from the
        start).
        After the first step every sample has a previous one.
        """
        used = min(iteration, self.history_size)
        U, V, count, hg_prev = state["U"], state["V"], state["count"], state["hg"]
        batch, m = U.shape[0], self.history_size
        g = fz - z
        if iteration == 0:
            # The first step is the Picard step z + g, with nothing to store.
            new_state = {**state, "hg": -g, "g_prev": g}
            return fz, new_state, torch.zeros_like(count, dtype=torch.bool)
        dg = g - state["g_prev"]
        # Two products with the memory per step instead of three: since the previous step was
        # dz = -H g_prev, H dg = H g + dz, so u = (dz - H dg) / (v . dg) = -H g / (v . dg).
        # H g = -g + sum_i u_i (v_i . g) and v = H^T dz = hg_prev - sum_i v_i (u_i . hg_prev).
        U_used, V_used = U[:, :used], V[:, :used]
        valid = state["slots"][:, :used] < count[:, None]
        hg = _accumulate(_coefficients(V_used, g, valid), U_used) - g
        v = hg_prev - _accumulate(_coefficients(U_used, hg_prev, valid), V_used)
        denom = _dot(v, dg)
        u = hg / denom.neg()[:, None]
        # A vanishing denominator, relative to |v| |dg|, or a non-finite update breaks down:
        # 0 times the sum of u is NaN for a non-finite u (and for a finite one whose sum
        # overflows, entries near the dtype's maximum: a restart too), and a comparison with
        # NaN fails.
        size = torch.linalg.vector_norm(v, dim=1).mul_(torch.finfo(z.dtype).eps)
        size.mul_(torch.linalg.vector_norm(dg, dim=1))
        ok = denom.abs().add_(u.sum(dim=1).mul_(0.0)) > size
        breakdown, write = ~ok, ok
        # Zero where nothing is stored (rows whose u is not finite included).
        u = torch.where(write[:, None], u, 0.0)
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
        new_state = {**state, "count": count, "hg": hg, "g_prev": g}
        return z - hg, new_state, breakdown


def _coefficients(W: Tensor, x: Tensor, valid: Tensor) -> Tensor:
    r"""``(B, k)`` products :math:`w_i^\top x` of the ``k`` slots of ``W``, zero where not
    ``valid`` (a bool mask)."""
    return dots(W, x) * valid


def _accumulate(coeff: Tensor, W: Tensor) -> Tensor:
    r""":math:`\sum_i c_i w_i` per sample."""
    return combine(coeff, W)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample dot products of ``(B, n)`` tensors, without an elementwise temporary."""
    out: Tensor = torch.linalg.vecdot(a, b)
    return out
