"""Truncated Neumann series for the implicit gradient."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .._result import SolverResult
from .._validate import check_int
from ._base import JVP, VJP, AbstractBackward

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
        return _series(vjp, grad, self.terms), None

    def tangent(self, jvp: JVP, fz_tangent: Tensor) -> tuple[Tensor, SolverResult | None]:
        r"""The same series on the tangent: :math:`\dot z = \sum_{i=0}^{k} J^i \dot f`."""
        return _series(jvp, fz_tangent, self.terms), None


def _series(product: VJP, v: Tensor, terms: int) -> Tensor:
    r""":math:`\sum_{i=0}^{k} A^i v` for the product ``product`` (:math:`A`), ``k`` products."""
    total = v
    for _ in range(terms):
        v = product(v)
        total = total + v
    return total
