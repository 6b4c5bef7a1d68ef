"""Anderson acceleration (type II) with scale-aware regularisation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import KeywordHint, check_float, check_int, from_damping
from ._base import AbstractSolver, SolverState, combine, dots

__all__ = ["Anderson"]


@dataclass(frozen=True, kw_only=True, repr=False)
class Anderson(AbstractSolver):
    r"""Anderson acceleration (type II, Walker & Ni 2011), safeguarded.

    Keeps the last :math:`m` iterates :math:`z_i` and values :math:`f(z_i)`, with residuals
    :math:`g_i = f(z_i) - z_i` stacked as the rows of :math:`G`, and mixes them:

    .. math::

        \alpha = \arg\min_{\mathbf{1}^\top \alpha = 1}
            \|G^\top \alpha\|^2 + \lambda \sum_i \|g_i\|^2 \alpha_i^2, \qquad
        z_{k+1} = \beta \sum_i \alpha_i f(z_i) + (1 - \beta) \sum_i \alpha_i z_i,

    solved per sample through the bordered system
    :math:`\begin{bmatrix} 0 & \mathbf{1}^\top \\ \mathbf{1} & GG^\top + \lambda
    \operatorname{diag}(GG^\top) \end{bmatrix} \begin{bmatrix} \nu \\ \alpha \end{bmatrix}
    = e_1` (which stays regular when :math:`GG^\top` is rank-deficient, e.g. more pairs than
    dimensions), kept up to date one row and column per step.

    The ridge scales with each stored residual (a Levenberg-Marquardt scaling of the Gram
    system), so it stays relative however fast residuals shrink: a fixed ridge (torchdeq's
    ``1e-4``) swamps the system once residuals are small, and one relative to the largest
    residual does the same once the newest is a thousand times smaller than the oldest,
    which on maps that Picard solves in a few steps pulls the mix back towards old iterates.

    **Safeguard.** An extrapolated iterate is kept only if its residual is below that of the
    iterate it was extrapolated from (the base). Otherwise the sample takes the plain step
    from the base, :math:`\beta f(z_\text{base}) + (1 - \beta) z_\text{base}`, which Picard
    would have taken: the rejected evaluation is the whole cost, and Anderson never wanders
    off on the strength of a bad extrapolation (the residual-decrease test of safeguarded
    Anderson variants, e.g. Zhang, O'Donoghue and Boyd 2020, type-I AA). The rejected pair
    stays in the history: it is a true secant of ``f``.

    A singular or non-finite system never raises: the sample takes the Picard step with this
    ``mixing``, its
    history restarts, and a sample that ends unconverged after such a restart is reported as
    ``Status.BREAKDOWN``. Memory: two ``(B, m, n)`` buffers (mixed values
    :math:`\beta f(z_i) + (1 - \beta) z_i` and residuals); each step reads the history twice
    (one new row of the Gram matrix, one mix). Also takes the shared options of
    :class:`~implicitlayers.solvers.AbstractSolver`.

    Args:
        history_size: :math:`m \ge 1`, the number of past iterates mixed (``1`` is
            ``Picard(mixing=mixing)``).
        mixing: :math:`\beta \in (0, 1]`, the weight of :math:`f(z_i)` against :math:`z_i`
            (as :class:`~implicitlayers.Picard`'s ``mixing``).
        regularization: :math:`\lambda \ge 0`, the ridge relative to each residual's squared
            norm.
        safeguard: Reject extrapolations that raise the residual (above). ``False`` gives
            plain type-II Anderson.

    Example:
        >>> import torch, implicitlayers as il
        >>> W = 0.9 * torch.eye(3)
        >>> r = il.fixed_point(lambda z: z @ W.T + 1, torch.zeros(2, 3),
        ...                    solver=il.Anderson(history_size=3, rtol=1e-6))
        >>> torch.allclose(r.z, torch.full((2, 3), 10.0)), int(r.n_steps[0]) < 10
        (True, True)
    """

    history_size: int = 5
    mixing: float = 1.0
    regularization: float = 1e-6
    safeguard: bool = True

    _renamed: ClassVar[Mapping[str, KeywordHint]] = {
        **AbstractSolver._renamed,
        "damping": (
            "is not a keyword (Anderson's weight is mixing, the weight of f(z))",
            lambda damping: from_damping(damping, as_in="Picard and PhantomGradient"),
        ),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("history_size", self.history_size, minimum=1)
        check_float("mixing", self.mixing, low=0.0, high=1.0, low_open=True)
        check_float("regularization", self.regularization, low=0.0)
        if not isinstance(self.safeguard, bool):
            raise TypeError(f"safeguard must be a bool, got {self.safeguard!r}")

    def init(self, z: Tensor) -> SolverState:
        batch, n = z.shape
        m = self.history_size
        return {
            "X": z.new_zeros(batch, m, n),  # beta f(z_i) + (1 - beta) z_i
            "G": z.new_zeros(batch, m, n),  # g_i = f(z_i) - z_i
            # The bordered system, slot i at row and column i + 1; a slot without a pair has
            # a zero border and a unit diagonal (its weight is 0).
            "system": _constants(z, m)["empty"].clone(),
            "valid": z.new_zeros(batch, m),  # 1 where a slot holds a pair since the restart
            "count": torch.zeros(batch, dtype=torch.long, device=z.device),  # pairs since restart
            # ||g||^2 of the base of an extrapolated iterate; inf for a plain one (never
            # rejected).
            "bar": torch.full((batch,), float("inf"), dtype=z.dtype, device=z.device),
            # Constants, as batch-sized views of one matrix (no memory): building them on
            # every step would cost a handful of operations per iteration.
            **_constants(z, m),
        }

    def step(
        self, state: SolverState, z: Tensor, fz: Tensor, iteration: int
    ) -> tuple[Tensor, SolverState, Tensor]:
        """One step; every sample writes its new pair at slot ``iteration % m``: a slice, not
        a per-sample scatter (the mix does not depend on which slot holds which pair, and a
        restarted sample's stale slots are masked by ``valid``).

        Every operation here runs once per iteration, so they are counted: on a small ``f``
        they are the solve's cost (``benchmarks/RESULTS.md``, solver overhead).
        """
        X, G, system, valid = state["X"], state["G"], state["system"], state["valid"]
        count, bar, eye, empty = state["count"], state["bar"], state["eye"], state["empty"]
        m = self.history_size
        slot = iteration % m
        g = fz - z
        x = fz if self.mixing == 1.0 else torch.add(z, g, alpha=self.mixing)
        # Where the new pair goes, and the one-hot weights of the plain step from it and from
        # the pair before it.
        at = (slice(None), slot)
        newest, base = eye[:, slot], eye[:, (slot - 1) % m]
        X[at] = x
        G[at] = g
        valid[at] = 1
        # One pass over the history per step: the new residual against every stored one,
        # zero against slots from before a restart.
        products = dots(G, g)
        del g  # one state fewer alive while the mix below allocates the next iterate
        res = products[at]  # ||g||^2
        row = products * valid
        if self.regularization:
            row[at] *= 1.0 + self.regularization
        # The new row and column of the bordered system: a border 1, then the products.
        row = F.pad(row, (1, 0), value=1.0)
        system[:, slot + 1, :] = row
        system[:, :, slot + 1] = row
        solution, _ = torch.linalg.solve_ex(system, state["e1"])
        alpha = solution[:, 1:]
        # A singular system (a zero pivot) leaves a non-finite solution, and one non-finite
        # entry makes the sum non-finite: one test covers both.
        bad = ~torch.isfinite(solution.sum(dim=1))
        # A rejected iterate goes back to the plain step from its base (an extrapolated
        # iterate follows an accepted step, so its base is the pair written one step ago); a
        # broken-down system takes the plain step from the newest pair. Both are one-hot
        # weights, so the mix below makes every step: no separate full-state pass.
        if self.safeguard and m > 1:
            reject = res > bar
            fallback = torch.where(reject[:, None], base, newest)
            plain = reject | bad
        else:
            fallback, plain = newest, bad
        weights = torch.where(plain[:, None], fallback, alpha)
        z_next = combine(weights, X)
        count = count + 1
        # The next iterate is extrapolated (so tested) unless it is a plain step.
        bar = torch.where(plain | (count < 2), float("inf"), res)
        # A broken-down sample restarts its history.
        count = torch.where(bad, 0, count)
        valid = valid.masked_fill(bad[:, None], 0.0)
        system = torch.where(bad.view(-1, 1, 1), empty, system)
        new_state = {
            **state,
            "system": system,
            "valid": valid,
            "count": count,
            "bar": bar,
        }
        return z_next, new_state, bad


def _constants(z: Tensor, m: int) -> dict[str, Tensor]:
    """The identity of the mixing weights, the bordered system of an empty history
    (``diag(0, 1, ..., 1)``) and its right-hand side :math:`e_1`, as ``(B, ...)`` views."""
    batch = z.shape[0]
    identity = torch.eye(m + 1, dtype=z.dtype, device=z.device)
    empty = torch.diag(1.0 - identity[0])
    return {
        "eye": identity[1:, 1:].expand(batch, m, m),
        "empty": empty.expand(batch, m + 1, m + 1),
        "e1": identity[0].expand(batch, m + 1),
    }
