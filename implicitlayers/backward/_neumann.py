"""Truncated Neumann series for the implicit gradient."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .._result import SolverResult
from .._validate import check_int
from ._base import VJP, AbstractBackward

__all__ = ["Neumann"]


@dataclass(frozen=True, kw_only=True, repr=False)
class Neumann(AbstractBackward):
    r"""The implicit gradient with :math:`(I - J)^{-1}` replaced by a truncated Neumann series.

    .. math::

        u = \sum_{i=0}^{k} (J^\top)^i g,

    computed with :math:`k` vector-Jacobian products. ``terms=0`` is :class:`JFB`; as
    :math:`k \to \infty` it tends to the exact gradient when the spectral radius of :math:`J`
    is below one, with error :math:`O(\rho(J)^{k+1})`.

    Args:
        terms: :math:`k \ge 0`, the highest power of :math:`J^\top` kept.

    Example:
        >>> import implicitlayers as il
        >>> il.Neumann(terms=3)
        Neumann(terms=3)
    """

    terms: int = 5

    def __post_init__(self) -> None:
        check_int("terms", self.terms, minimum=0)

    def adjoint(self, vjp: VJP, grad: Tensor) -> tuple[Tensor, SolverResult | None]:
        u = grad
        v = grad
        for _ in range(self.terms):
            v = vjp(v)
            u = u + v
        return u, None
