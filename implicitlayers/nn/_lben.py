r"""Lipschitz-bounded equilibrium networks (LBEN, Revay, Wang & Manchester, 2020).

A monotone equilibrium cell whose input-output map has a prescribed Lipschitz bound.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._monotone import DenseMonotoneCell, check_margin, check_positive_int

__all__ = ["LBEN"]


class LBEN(DenseMonotoneCell):
    r"""A Lipschitz-bounded equilibrium network (LBEN, [Revay2020]_): a dense monotone cell
    and a linear output whose input-output map is :math:`\gamma`-Lipschitz.

    .. math::

        z^\star = \mathrm{ReLU}(W z^\star + U x + b), \qquad y = W_o z^\star + b_o,
        \qquad \|y(x) - y(x')\|_2 \le \gamma\, \|x - x'\|_2,

    for every pair of inputs and every value of the free parameters
    :math:`V, S \in \mathbb R^{n \times n}`, :math:`U`, :math:`W_o`, :math:`b`, :math:`b_o`,
    through the direct parametrisation

    .. math::

        I - W = m I + \tfrac12 V^\top V + \tfrac{1}{2\gamma}\big(W_o^\top W_o + U U^\top\big)
            - S + S^\top.

    *Why it holds* (Revay et al., Theorem 2, with the metric :math:`\Lambda = I`): the
    symmetric part gives
    :math:`H = 2I - W - W^\top = \gamma^{-1}(W_o^\top W_o + U U^\top) + P` with
    :math:`P = 2mI + V^\top V \succ 0`. For two equilibria, ReLU's slope in :math:`[0, 1]`
    gives :math:`\Delta z^\top(\Delta v - \Delta z) \ge 0` with
    :math:`\Delta v = W \Delta z + U \Delta x`, so
    :math:`\Delta z^\top H \Delta z \le 2 \Delta z^\top U \Delta x
    \le \gamma^{-1}\|U^\top \Delta z\|^2 + \gamma \|\Delta x\|^2`, hence
    :math:`\gamma^{-1}\|W_o \Delta z\|^2 \le \gamma \|\Delta x\|^2`. The same inequality makes
    :math:`I - W` strongly monotone with margin :math:`m`, so the equilibrium exists and is
    unique (it is a :class:`~implicitlayers.nn.MonotoneLinear` whose :math:`A^\top A` is
    :math:`\tfrac12 V^\top V + \tfrac1{2\gamma}(W_o^\top W_o + UU^\top)`), and the
    splitting solvers and their certificates apply unchanged.

    The paper's diagonal metric :math:`\Lambda` is fixed to :math:`I` here: for ReLU (positively
    homogeneous) rescaling the hidden units by :math:`\Lambda^{1/2}` maps a network with any
    :math:`\Lambda` to one with :math:`\Lambda = I` and the same input-output map, so no map
    is lost.

    We chose LBEN among the published certified equilibrium models because its guarantee is
    the one a safety case about inputs needs (a Lipschitz bound of :math:`x \mapsto y`, hence
    certified robustness radii), because it is a monotone cell (well-posedness and the
    splitting solvers' certified rates come with it), and because its parametrisation is
    direct: unconstrained training, no projection, no LMI solver.

    Args:
        in_features: Size :math:`d` of each input.
        features: Width :math:`n` of the equilibrium state.
        out_features: Size :math:`p` of the output :math:`y`.
        lipschitz: The certified bound :math:`\gamma > 0` of :math:`x \mapsto y` (Euclidean
            norms). Required: it is the guarantee you are buying.
        margin: :math:`m > 0`.

    Example:
        >>> import torch, implicitlayers as il
        >>> cell = il.nn.LBEN(4, 16, 3, lipschitz=2.0, margin=0.5)
        >>> deq = il.MonotoneDEQ(cell)
        >>> x, x2 = torch.randn(5, 4), torch.randn(5, 4)
        >>> y, y2 = cell.output(deq(x).z), cell.output(deq(x2).z)  # (5, 3) each
        >>> bound = 2.0 * (x2 - x).norm(dim=1)                     # gamma ||x2 - x||
        >>> bool(((y2 - y).norm(dim=1) <= bound).all())
        True
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        out_features: int,
        *,
        lipschitz: float,
        margin: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.features = check_positive_int("features", features)
        self.out_features = check_positive_int("out_features", out_features)
        if isinstance(lipschitz, bool) or not isinstance(lipschitz, (int, float)):
            raise TypeError(
                f"lipschitz must be a float > 0, got {lipschitz!r} ({type(lipschitz).__name__})"
            )
        if not (math.isfinite(lipschitz) and lipschitz > 0):
            raise ValueError(
                f"lipschitz must be a finite float > 0, got lipschitz={lipschitz!r}: it is the "
                "certified bound gamma of ||y(x) - y(x')|| <= gamma ||x - x'|| (e.g. 1.0)"
            )
        self.lipschitz = float(lipschitz)
        self.margin = check_margin(margin)

        def weight(rows: int, cols: int) -> nn.Parameter:
            return nn.Parameter(nn.Linear(cols, rows, bias=False).weight.detach())

        self.V = weight(features, features)
        self.S = weight(features, features)
        self.U = weight(features, in_features)
        self.bias = nn.Parameter(torch.zeros(features))
        self.output_layer = nn.Linear(features, out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, features={self.features}, "
            f"out_features={self.out_features}, lipschitz={self.lipschitz}, margin={self.margin}"
        )

    def state_shape(self, x: Tensor) -> tuple[int, ...]:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"x must have shape (B, {self.in_features}) (in_features), got {tuple(x.shape)}"
            )
        return (self.features,)

    def inject(self, x: Tensor) -> Tensor:
        self.state_shape(x)
        return x @ self.U.T + self.bias

    def output(self, z: Tensor) -> Tensor:
        r"""The certified output :math:`y = W_o z + b_o`, ``(B, out_features)``."""
        out: Tensor = self.output_layer(z)
        return out

    def _coupling(self) -> Tensor:
        r""":math:`W_o^\top W_o + U U^\top`, the part of :math:`I - W` that pays for the bound."""
        w_o = self.output_layer.weight
        return w_o.T @ w_o + self.U @ self.U.T

    def operator_matrix(self) -> Tensor:
        r""":math:`M = I - W`, differentiable, ``(n, n)``."""
        eye = torch.eye(self.features, dtype=self.V.dtype, device=self.V.device)
        return (
            self.margin * eye
            + 0.5 * self.V.T @ self.V
            + self._coupling() / (2 * self.lipschitz)
            - self.S
            + self.S.T
        )

    def _certificate_extras(self, blocks: Tensor) -> dict[str, float]:
        M = blocks[0]
        coupling = self._coupling().detach().to(torch.float64)
        slack = M + M.T - coupling / self.lipschitz
        return {
            "output_lipschitz": self.lipschitz,
            "lmi_margin": float(torch.linalg.eigvalsh(slack)[0]),
        }
