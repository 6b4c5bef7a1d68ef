r"""A solver's estimate of :math:`(I - J)^{-1}` at the end of a solve, for the backward pass.

A quasi-Newton solver builds, from the secant pairs of its iterates, an estimate of the inverse
Jacobian of the residual :math:`g(z) = f(z) - z`; at the fixed point that is
:math:`-(I - J)^{-1}`, the matrix the implicit gradient needs. :class:`InverseEstimate` holds it
per sample in low-rank form, so the backward pass can use it (:class:`~implicitlayers.SHINE`)
instead of solving :math:`(I - J^\top) u = g` from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._base import combine, dots

__all__ = ["InverseEstimate"]


@dataclass(frozen=True)
class InverseEstimate:
    r"""A low-rank estimate of :math:`(I - J)^{-1}` per sample, :math:`J = \partial f /
    \partial z` at the fixed point:

    .. math::

        M = I + \sum_{i=1}^{k} a_i b_i^\top \approx (I - J)^{-1},

    with the vectors :math:`a_i` the rows of ``left`` and :math:`b_i` those of ``right``
    (unused rows are zero). Applying :math:`M` or :math:`M^\top` to a ``(B, n)`` batch costs two
    passes over the ``k`` pairs and no evaluation of ``f``. Memory: two ``(B, k, n)`` tensors,
    ``k`` the solver's history size, whatever the number of iterations.

    Built by a solver's :meth:`~implicitlayers.solvers.AbstractSolver.inverse_estimate` from
    its memory (Broyden's rank-one updates, Anderson's secant pairs).

    Attributes:
        left: ``(B, k, n)`` the vectors :math:`a_i`.
        right: ``(B, k, n)`` the vectors :math:`b_i`.
    """

    left: Tensor
    right: Tensor

    def apply(self, v: Tensor) -> Tensor:
        r""":math:`M v \approx (I - J)^{-1} v` for ``(B, n)`` rows ``v`` (forward mode)."""
        return v + combine(dots(self.right, v), self.left)

    def apply_transposed(self, v: Tensor) -> Tensor:
        r""":math:`M^\top v \approx (I - J^\top)^{-1} v` for ``(B, n)`` rows ``v`` (the
        adjoint)."""
        return v + combine(dots(self.left, v), self.right)

    @property
    def rank(self) -> int:
        """The number of stored pairs :math:`k` (the largest rank of :math:`M - I`)."""
        return int(self.left.shape[1])


def low_rank(left: Tensor, right: Tensor, valid: Tensor) -> InverseEstimate:
    """An :class:`InverseEstimate` from pairs, with the pairs that are not ``valid`` (``(B, k)``
    bool) or not finite (a failed sample's memory) zeroed."""
    finite = torch.isfinite(left).all(dim=2) & torch.isfinite(right).all(dim=2)
    keep = (valid & finite)[:, :, None]
    return InverseEstimate(left=torch.where(keep, left, 0.0), right=torch.where(keep, right, 0.0))
