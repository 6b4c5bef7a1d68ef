"""Picard (fixed-point) iteration, optionally relaxed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import check_float
from ._base import AbstractSolver, SolverState

__all__ = ["Picard"]


@dataclass(frozen=True, kw_only=True, repr=False)
class Picard(AbstractSolver):
    r"""Picard iteration, optionally relaxed (Krasnosel'skii-Mann iteration).

    .. math::

        z_{k+1} = (1 - \beta)\, z_k + \beta\, f(z_k),

    with :math:`\beta` = ``mixing``, the weight of :math:`f(z_k)`, as in
    :class:`~implicitlayers.Anderson` and :class:`~implicitlayers.PhantomGradient`. It
    converges linearly at the contraction rate of ``f`` and needs no memory beyond the
    iterate; a mixing below 1 trades speed for stability when ``f`` is only just contractive
    or oscillates (for a nonexpansive ``f`` with a fixed point, any :math:`\beta < 1`
    converges where plain iteration can cycle).
    Also takes the shared options of :class:`~implicitlayers.solvers.AbstractSolver`
    (``max_iter``, ``atol``, ``rtol``, ``norm``, policies, ``trace``).

    Args:
        mixing: :math:`\beta \in (0, 1]`; ``1`` (default) is plain Picard iteration,
            :math:`z_{k+1} = f(z_k)`.

    Example:
        >>> import torch, implicitlayers as il
        >>> r = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(1, 1),
        ...                    solver=il.Picard(max_iter=100, rtol=1e-6))
        >>> round(r.z.item(), 4), bool(r.converged.item())
        (2.0, True)
        >>> il.Picard(mixing=0.5)  # z_next = (z + f(z)) / 2
        Picard(mixing=0.5)
    """

    mixing: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("mixing", self.mixing, low=0.0, high=1.0, low_open=True)

    def init(self, z: Tensor) -> SolverState:
        return {}

    def step(
        self, state: SolverState, z: Tensor, fz: Tensor, iteration: int
    ) -> tuple[Tensor, SolverState, Tensor | None]:
        # No internal system can break down: no breakdown flags, so no tensor op to make them.
        z_next = fz if self.mixing == 1.0 else torch.lerp(z, fz, self.mixing)
        return z_next, state, None
