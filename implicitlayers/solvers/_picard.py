"""Picard (fixed-point) iteration with optional damping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import check_float
from ._base import AbstractSolver, SolverState

__all__ = ["Picard"]


@dataclass(frozen=True, kw_only=True, repr=False)
class Picard(AbstractSolver):
    r"""Picard iteration, optionally damped.

    .. math::

        z_{k+1} = \beta\, z_k + (1 - \beta)\, f(z_k),

    with :math:`\beta` = ``damping``. It converges linearly at the contraction rate of ``f``
    and needs no memory beyond the iterate; damping trades speed for stability when ``f`` is
    only just contractive or oscillates. Also takes the shared options of
    :class:`~implicitlayers.solvers.AbstractSolver` (``max_iter``, ``atol``, ``rtol``,
    policies, ``trace``).

    Args:
        damping: :math:`\beta \in [0, 1)`; ``0`` is plain Picard iteration.

    Example:
        >>> import torch, implicitlayers as il
        >>> r = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(1, 1),
        ...                    solver=il.Picard(max_iter=100, rtol=1e-6))
        >>> round(r.z.item(), 4), bool(r.converged.item())
        (2.0, True)
    """

    damping: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("damping", self.damping, low=0.0, high=1.0, high_open=True)

    def init(self, z: Tensor) -> SolverState:
        return {}

    def step(
        self, state: SolverState, z: Tensor, fz: Tensor
    ) -> tuple[Tensor, SolverState, Tensor | None]:
        # No internal system can break down: no breakdown flags, so no tensor op to make them.
        z_next = fz if self.damping == 0 else torch.lerp(fz, z, self.damping)
        return z_next, state, None
