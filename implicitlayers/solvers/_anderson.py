"""Anderson acceleration (type II) with scale-aware regularisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import check_float, check_int
from ._base import AbstractSolver, SolverState

__all__ = ["Anderson"]


@dataclass(frozen=True, kw_only=True, repr=False)
class Anderson(AbstractSolver):
    r"""Anderson acceleration (type II, Walker & Ni 2011).

    Keeps the last :math:`m` iterates :math:`z_i` and values :math:`f(z_i)`, with residuals
    :math:`g_i = f(z_i) - z_i` stacked as the rows of :math:`G`, and mixes them:

    .. math::

        \alpha = \arg\min_{\mathbf{1}^\top \alpha = 1}
            \|G^\top \alpha\|^2 + \lambda s \|\alpha\|^2, \qquad
        z_{k+1} = \beta \sum_i \alpha_i f(z_i) + (1 - \beta) \sum_i \alpha_i z_i,

    solved per sample through the bordered system
    :math:`\begin{bmatrix} 0 & \mathbf{1}^\top \\ \mathbf{1} & GG^\top + \lambda s I
    \end{bmatrix} \begin{bmatrix} \nu \\ \alpha \end{bmatrix} = e_1`.

    The ridge :math:`\lambda s` scales with the problem: :math:`s` is the largest diagonal
    entry of :math:`GG^\top`, so the regularisation stays relative as residuals shrink (a fixed
    ridge, as in torchdeq, swamps the system once residuals are small and degrades Anderson to
    averaging). A singular or non-finite system never raises: the sample takes a damped Picard
    step, its history restarts, and a sample that ends unconverged after such a restart is
    reported as ``Status.BREAKDOWN``. Memory: two ``(B, m, n)`` buffers (values and
    residuals); each step reads the history twice (one new row of the Gram matrix, one mix).
    Also takes the shared options of :class:`~implicitlayers.solvers.AbstractSolver`.

    Args:
        history_size: :math:`m \ge 1`, the number of past iterates mixed (``1`` is damped
            Picard).
        mixing: :math:`\beta \in (0, 1]`, the weight of :math:`f(z_i)` against :math:`z_i`.
        regularization: :math:`\lambda \ge 0`, the ridge relative to :math:`s`.

    Example:
        >>> import torch, implicitlayers as il
        >>> W = 0.9 * torch.eye(3)
        >>> r = il.fixed_point(lambda z: z @ W.T + 1, torch.zeros(2, 3),
        ...                    solver=il.Anderson(history_size=3, rtol=1e-6))
        >>> r.z[0], int(r.n_steps[0]) < 10
        (tensor([10.0000, 10.0000, 10.0000]), True)
    """

    history_size: int = 5
    mixing: float = 1.0
    regularization: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("history_size", self.history_size, minimum=1)
        check_float("mixing", self.mixing, low=0.0, high=1.0, low_open=True)
        check_float("regularization", self.regularization, low=0.0)

    def init(self, z: Tensor) -> SolverState:
        batch, n = z.shape
        m = self.history_size
        return {
            "F": z.new_zeros(batch, m, n),  # f(z_i)
            "G": z.new_zeros(batch, m, n),  # g_i = f(z_i) - z_i
            "gram": z.new_zeros(batch, m, m),  # G G^T, updated one row and column per step
            "count": torch.zeros(batch, dtype=torch.long, device=z.device),
        }

    def step(self, state: SolverState, z: Tensor, fz: Tensor) -> tuple[Tensor, SolverState, Tensor]:
        F, G, gram, count = state["F"], state["G"], state["gram"], state["count"]
        batch, m = F.shape[0], self.history_size
        rows = torch.arange(batch, device=z.device)
        slot = count % m
        g = fz - z
        F[rows, slot] = fz
        G[rows, slot] = g
        # One pass over the history per step: the new residual against every stored one (as
        # a row vector times G^T, several times faster on CPU than G times a column vector).
        products = torch.bmm(g[:, None, :], G.transpose(1, 2)).squeeze(1)
        del g  # one state fewer alive while the mix below allocates the next iterate
        gram[rows, slot, :] = products
        gram[rows, :, slot] = products
        count = count + 1
        valid = torch.arange(m, device=z.device)[None, :] < count.clamp(max=m)[:, None]
        pair = valid[:, :, None] & valid[:, None, :]
        scale = (gram.diagonal(dim1=1, dim2=2) * valid).amax(dim=1)
        ridge = self.regularization * scale[:, None] * valid + (~valid)
        system = z.new_zeros(batch, m + 1, m + 1)
        system[:, 0, 1:] = valid
        system[:, 1:, 0] = valid
        system[:, 1:, 1:] = torch.where(pair, gram, 0.0) + torch.diag_embed(ridge)
        rhs = z.new_zeros(batch, m + 1)
        rhs[:, 0] = 1
        solution, info = torch.linalg.solve_ex(system, rhs)
        alpha = solution[:, 1:]
        ok = (info == 0) & torch.isfinite(alpha).all(dim=1)
        # A broken-down sample puts weight 1 on its newest pair, which mixes to the damped
        # Picard step beta f(z) + (1 - beta) z: no separate full-state pass for the fallback.
        newest = torch.nn.functional.one_hot(slot, m).to(alpha.dtype)
        alpha = torch.where(ok[:, None], torch.where(valid, alpha, 0.0), newest)[:, None, :]
        # sum_i alpha_i (beta f(z_i) + (1 - beta) z_i) = sum_i alpha_i (f(z_i) - (1 - beta) g_i)
        z_next = torch.bmm(alpha, F).squeeze(1)
        if self.mixing != 1.0:
            z_next = z_next - (1.0 - self.mixing) * torch.bmm(alpha, G).squeeze(1)
        count = torch.where(ok, count, 0)
        return z_next, {"F": F, "G": G, "gram": gram, "count": count}, ~ok
