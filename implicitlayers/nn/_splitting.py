r"""Operator-splitting solvers for monotone equilibrium cells.

A splitting method needs the parts of the operator (:math:`I - W`, its resolvent, the
proximal nonlinearity), which only the cell has; the library's driver loop hands a solver
nothing but the iterate :math:`v_k` and the map's value :math:`T(v_k)`. So the splitting
*operator* :math:`T` is built by :class:`~implicitlayers.MonotoneDEQ` from the cell and the
solver's step :math:`\alpha`, and the splitting solver iterates it in the shared loop,
:math:`v_{k+1} = T(v_k)`, which gives it per-sample stopping, statuses, best iterates,
traces and every policy of the other solvers. One evaluation of the map is one splitting
iteration, so ``n_steps`` counts splitting iterations.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..solvers import AbstractSolver, SolverState
from ._certificate import Splitting

__all__ = ["ForwardBackward", "PeacemanRachford"]

# Set while MonotoneDEQ solves with a splitting map: a splitting solver run on any other map
# would silently be Picard iteration on it.
_SPLITTING_MAP: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "implicitlayers_splitting_map", default=False
)


def _check_alpha(alpha: object) -> None:
    if alpha is None:
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(
            f"alpha must be a float > 0 or None (the certified step), got {alpha!r} "
            f"({type(alpha).__name__})"
        )
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"alpha must be a finite float > 0 or None (the certified step), got alpha={alpha!r}"
        )


def _outside_error(solver: AbstractSolver) -> TypeError:
    name = type(solver).__name__
    return TypeError(
        f"{name} iterates the splitting operator that il.MonotoneDEQ builds from a "
        f"monotone cell; it cannot solve another map. Pass it to "
        f"il.MonotoneDEQ(cell, solver=il.nn.{name}()); for a general f use il.Picard "
        "or il.Anderson"
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class _SplittingSolver(AbstractSolver):
    """What both splitting solvers share: the step :math:`\alpha`, the refusal of any map but
    :class:`~implicitlayers.MonotoneDEQ`'s, and the step :math:`v_{k+1} = T(v_k)`."""

    splitting: ClassVar[Splitting]
    alpha: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_alpha(self.alpha)

    def init(self, z: Tensor) -> SolverState:
        if not _SPLITTING_MAP.get():
            raise _outside_error(self)
        return {}

    def step(
        self, state: SolverState, z: Tensor, fz: Tensor, iteration: int
    ) -> tuple[Tensor, SolverState, Tensor | None]:
        return fz, state, None  # the map is the splitting operator itself


@dataclass(frozen=True, kw_only=True, repr=False)
class ForwardBackward(_SplittingSolver):
    r"""Forward-backward splitting for a monotone cell, run by
    :class:`~implicitlayers.MonotoneDEQ`.

    .. math::

        z_{k+1} = \sigma\big(z_k - \alpha\,((I - W) z_k - U x - b)\big)
                = \sigma\big((1 - \alpha) z_k + \alpha (W z_k + U x + b)\big),

    a forward (gradient) step on the linear part followed by the backward (proximal) step
    :math:`\sigma` = ReLU. Its fixed points are exactly those of
    :math:`f(z) = \sigma(Wz + Ux + b)`, for any :math:`\alpha > 0`. With :math:`\mu` the strong
    monotonicity of :math:`I - W` and :math:`L = \|I - W\|_2` it contracts with factor

    .. math::

        \|I - \alpha (I - W)\|_2 \le \sqrt{1 - 2\alpha\mu + \alpha^2 L^2} < 1
        \quad\text{for } 0 < \alpha < 2\mu / L^2,

    smallest at :math:`\alpha = \mu / L^2`, where the bound is :math:`\sqrt{1 - \mu^2/L^2}`:
    cheap steps (one product with :math:`W`), many of them. Residuals are
    :math:`\|z_{k+1} - z_k\|`. Also takes the shared options of
    :class:`~implicitlayers.solvers.AbstractSolver`.

    Args:
        alpha: The step :math:`\alpha`; ``None`` (default) uses :math:`\mu / L^2` computed
            exactly from the weights at each forward. A larger step may converge faster
            without a certificate (``MonotoneCertificate.rate >= 1``; a warning says so).
        max_iter: Most iterations per sample (default 500: the certified rate
            :math:`\sqrt{1 - \mu^2/L^2}` is close to 1).

    Example:
        >>> import torch, implicitlayers as il
        >>> cell = il.nn.MonotoneLinear(4, 8, margin=1.0)
        >>> deq = il.MonotoneDEQ(cell, solver=il.nn.ForwardBackward())
        >>> z, result = deq(torch.randn(3, 4))
        >>> bool(result.converged.all()), bool((z >= 0).all())
        (True, True)
    """

    splitting: ClassVar[Splitting] = "forward-backward"
    max_iter: int = 500


@dataclass(frozen=True, kw_only=True, repr=False)
class PeacemanRachford(_SplittingSolver):
    r"""Peaceman-Rachford splitting for a monotone cell, run by
    :class:`~implicitlayers.MonotoneDEQ`.

    Iterates an auxiliary variable :math:`u` with the reflected resolvents
    :math:`C = 2R - I` of :math:`F(z) = (I - W) z - Ux - b` and of the nonlinearity,

    .. math::

        u_{k+1} = C_F\big(C_G(u_k)\big):\quad
        z_k = \sigma(u_k),\;
        v = 2 z_k - u_k,\;
        w = (I + \alpha (I - W))^{-1} (v + \alpha (U x + b)),\;
        u_{k+1} = 2 w - v,

    and returns :math:`z = \sigma(u^\star)`, the equilibrium, for any :math:`\alpha > 0`.
    :math:`C_G` is non-expansive and :math:`C_F` contracts with factor

    .. math::

        \|(I - \alpha M)(I + \alpha M)^{-1}\|_2
        \le \sqrt{1 - \frac{4\alpha\mu}{1 + 2\alpha\mu + \alpha^2 L^2}} < 1
        \quad (M = I - W),

    smallest at :math:`\alpha = 1/L`, where the bound is :math:`\sqrt{(L - \mu)/(L + \mu)}`
    (Giselsson, 2017): far fewer iterations than forward-backward, each a product with the
    resolvent (a dense inverse computed once per forward, or one :math:`C \times C` inverse
    per frequency for a convolution). ``result.z`` and ``residual`` are those of :math:`u`;
    :math:`\|z - z^\star\| \le \|u - u^\star\|`. Also takes the shared options of
    :class:`~implicitlayers.solvers.AbstractSolver`.

    Args:
        alpha: The step :math:`\alpha`; ``None`` (default) uses :math:`1 / L`, computed
            exactly from the weights at each forward. Every :math:`\alpha > 0` is certified.
        max_iter: Most iterations per sample (default 100).

    Example:
        >>> import torch, implicitlayers as il
        >>> cell = il.nn.MonotoneLinear(4, 8, margin=0.5)
        >>> deq = il.MonotoneDEQ(cell, solver=il.nn.PeacemanRachford(rtol=1e-6))
        >>> out = deq(torch.randn(3, 4))
        >>> bool(out.result.converged.all()), out.certificate.certified
        (True, True)
    """

    splitting: ClassVar[Splitting] = "peaceman-rachford"
    max_iter: int = 100


@contextlib.contextmanager
def splitting_active() -> Iterator[None]:
    token = _SPLITTING_MAP.set(True)
    try:
        yield
    finally:
        _SPLITTING_MAP.reset(token)
