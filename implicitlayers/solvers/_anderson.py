"""Anderson acceleration (type II) with scale-aware regularisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_float, check_int
from ._base import AbstractSolver, SolverState, combine, dots, history_buffer
from ._estimate import InverseEstimate, low_rank

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
    ``mixing``, its history restarts, and a sample that ends unconverged after such a restart
    is reported as ``Status.BREAKDOWN``. Memory: two ``(B, m, n)`` buffers (mixed values
    :math:`\beta f(z_i) + (1 - \beta) z_i` and residuals, neither zeroed); each step reads the
    slots filled so far twice (one new row of the Gram matrix, one mix). Also takes the shared
    options of :class:`~implicitlayers.solvers.AbstractSolver`.

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

    estimate_keys: ClassVar[tuple[str, ...]] = ("X", "G", "system")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("history_size", self.history_size, minimum=1)
        check_float("mixing", self.mixing, low=0.0, high=1.0, low_open=True)
        check_float("regularization", self.regularization, low=0.0)
        if not isinstance(self.safeguard, bool):
            raise TypeError(f"safeguard must be a bool, got {self.safeguard!r}")

    def inverse_estimate(self, state: SolverState) -> InverseEstimate:
        r"""The multisecant estimate of Anderson's history (Anderson mixing is a multisecant
        quasi-Newton method, Fang & Saad 2009): with :math:`\Delta F` and :math:`\Delta G`
        the differences of the stored :math:`f(z_i)` and :math:`g_i` from one stored pair,

        .. math::

            (I - J)^{-1} \approx I - \Delta F\, (\Delta G^\top \Delta G + \lambda D)^{-1}
                \Delta G^\top,

        the smallest change of the Picard step's :math:`I` that maps every secant
        :math:`\Delta G` as :math:`(I - J)^{-1}` does on an affine map
        (:math:`D = \operatorname{diag}(\Delta G^\top \Delta G)`, :math:`\lambda` a hundred
        times the dtype's epsilon: the step's ``regularization`` steadies the mix, but here it
        would bias the estimate by as much). Exact on the span of the secants, the identity
        across it: with ``history_size`` above the state's size, exact on an affine map once
        the history spans it."""
        X, G, system = state["X"], state["G"], state["system"]
        batch, m, n = G.shape
        valid = system[:, 0, 1:] == 1.0  # a pair since the last restart (its border)
        F = X if self.mixing == 1.0 else X + (1.0 - self.mixing) * G  # f_i = z_i + g_i
        # The differences from the first valid pair (any one gives the same estimate).
        ref = valid.to(torch.uint8).argmax(dim=1)
        pick = ref[:, None, None].expand(batch, 1, n)
        dF = F - torch.gather(F, 1, pick)
        dG = G - torch.gather(G, 1, pick)
        use = valid & (torch.arange(m, device=G.device)[None, :] != ref[:, None])
        dF = torch.where(use[:, :, None], dF, 0.0)
        dG = torch.where(use[:, :, None], dG, 0.0)
        gram = dG @ dG.transpose(1, 2)
        diag = gram.diagonal(dim1=1, dim2=2)
        use = use & (diag > 0)  # a repeated pair is no secant
        ridge = 100 * torch.finfo(G.dtype).eps
        # Unused slots: a unit diagonal (and zero secants), so their coefficients are 0.
        gram = gram + torch.diag_embed(torch.where(use, ridge * diag, 1.0))
        right = torch.linalg.solve_ex(gram, dG)[0]
        return low_rank(-dF, right, use)

    def init(self, z: Tensor) -> SolverState:
        batch = z.shape[0]
        m = self.history_size
        constants = _constants(z, m, self.regularization)
        history = history_buffer(z, m)
        return {
            # beta f(z_i) + (1 - beta) z_i and g_i = f(z_i) - z_i; only the slots filled so
            # far are read. Built from z (not new_empty), so that under torch.func.vmap the
            # buffers are batched like the values written into them.
            "X": history,
            "G": history.clone(),
            # The bordered system, slot i at row and column i + 1. A slot holding a pair since
            # the last restart has a border 1; one without a pair a zero border and a unit
            # diagonal (its weight is 0), so the border is also the mask of valid slots.
            "system": _batched_copy(z, constants["empty"]),
            # No pair before this step's (the first step, or the one after a restart): its
            # step is the plain one, so the next iterate is not tested.
            "fresh": torch.ones(batch, dtype=torch.bool, device=z.device),
            # ||g||^2 of the base of an extrapolated iterate; inf for a plain one (never
            # rejected).
            "bar": torch.full((batch,), float("inf"), dtype=z.dtype, device=z.device),
            # ||g||^2 at the round-off floor: (a few epsilons of ||f(z_0)||)^2, set by the
            # first step.
            "floor": torch.zeros(batch, dtype=z.dtype, device=z.device),
            # Constants, as batch-sized views of one matrix (no memory): building them on
            # every step would cost a handful of operations per iteration.
            **constants,
        }

    def step(
        self, state: SolverState, z: Tensor, fz: Tensor, iteration: int
    ) -> tuple[Tensor, SolverState, Tensor]:
        """One step; every sample writes its new pair at slot ``iteration % m``: a slice, not
        a per-sample scatter (the mix does not depend on which slot holds which pair, and a
        restarted sample's stale slots are masked by their zero border). ``iteration``
        counts from 0 for a state from ``init``: slots ``0 .. min(iteration, m - 1)``
        are the ones written.

        Every operation here runs once per iteration, so they are counted: on a small ``f``
        they are the solve's cost (``benchmarks/RESULTS.md``, solver overhead).
        """
        X, G, system, eye = state["X"], state["G"], state["system"], state["eye"]
        m = self.history_size
        slot = iteration % m
        used = min(iteration + 1, m)  # slots filled so far (every sample fills one per step)
        # The new pair, at its slot.
        g = fz - z
        X[:, slot] = fz if self.mixing == 1.0 else torch.add(z, g, alpha=self.mixing)
        G[:, slot] = g
        G, X = G[:, :used], X[:, :used]
        # One pass over the history per step: the new residual against every stored one,
        # zero against slots from before a restart (zero border), the ridge on its own.
        products = dots(G, g)
        del g  # one state fewer alive while the mix below allocates the next iterate
        res = products[:, slot]  # ||g||^2
        # The new row and column of the bordered system: a border 1, then the products,
        # masked by the border (1 for the slots in use; the new slot's may still be 0), and
        # the new pair's own product scaled by 1 + lambda (the ridge): one maximum does both.
        # Slots not filled yet keep the empty system's zero border and unit diagonal.
        scale = torch.maximum(system[:, 0, 1 : used + 1], state["ridge"][:, slot, :used])
        row = F.pad(products * scale, (1, 0), value=1.0)
        system[:, slot + 1, : used + 1] = row
        system[:, : used + 1, slot + 1] = row
        # A column right-hand side: the batched solve takes a third less time than with a
        # vector one on the CPU (same factorisation, same result).
        solution = torch.linalg.solve_ex(system, state["e1"])[0]
        alpha = solution[:, 1 : used + 1, 0]
        # A singular system (a zero pivot) leaves a non-finite solution, and one non-finite
        # entry makes the sum non-finite, and then 0 times it NaN: one test covers both.
        bad = solution.sum(dim=(1, 2)).mul_(0.0).isnan()
        # A rejected iterate goes back to the plain step from its base (an extrapolated
        # iterate follows an accepted step, so its base is the pair written one step ago); a
        # broken-down system takes the plain step from the newest pair. Both are one-hot
        # weights, so the mix below makes every step: no separate full-state pass.
        newest = eye[:, slot, :used]
        # At the round-off floor (a residual within a few epsilons of f(z)), the secants are
        # rounding noise and an extrapolation only adds more: the plain step, as Picard's.
        # The scale is f's at the start, measured once per solve.
        floor = state["floor"]
        if iteration == 0:
            floor = torch.linalg.vecdot(fz, fz).mul_((_FLOOR * torch.finfo(fz.dtype).eps) ** 2)
        noise = res <= floor
        if self.safeguard and m > 1:
            reject = res > state["bar"]
            fallback = torch.where(reject[:, None], eye[:, (slot - 1) % m, :used], newest)
            plain = reject | bad | noise
        else:
            fallback, plain = newest, bad | noise
        weights = torch.where(plain[:, None], fallback, alpha)
        z_next = combine(weights, X)
        # The next iterate is extrapolated (so tested) unless it is a plain step.
        bar = torch.where(plain | state["fresh"], float("inf"), res)
        # A broken-down sample restarts its history.
        system = torch.where(bad.view(-1, 1, 1), state["empty"], system)
        new_state = {**state, "system": system, "fresh": bad, "bar": bar, "floor": floor}
        return z_next, new_state, bad


#: The round-off floor: a residual at most this many epsilons of ``||f(z_0)||`` (l2) is noise.
_FLOOR = 2.0


def _batched_copy(z: Tensor, constant: Tensor) -> Tensor:
    """A writable ``(B, ...)`` copy of a batch-sized view of ``constant``, built from ``z`` so
    that under ``torch.func.vmap`` it is batched like the values written into it."""
    return constant.clone() + torch.zeros_like(z[:, :1, None])


def _constants(z: Tensor, m: int, regularization: float) -> dict[str, Tensor]:
    r"""The identity of the mixing weights, the same scaled by :math:`1 + \lambda` (the ridge
    of a new pair), the bordered system of an empty history (``diag(0, 1, ..., 1)``) and its
    right-hand side :math:`e_1` (a column), as ``(B, ...)`` views."""
    batch = z.shape[0]
    identity = torch.eye(m + 1, dtype=z.dtype, device=z.device)
    empty = torch.diag(1.0 - identity[0])
    return {
        "eye": identity[1:, 1:].expand(batch, m, m),
        "ridge": ((1.0 + regularization) * identity[1:, 1:]).expand(batch, m, m),
        "empty": empty.expand(batch, m + 1, m + 1),
        "e1": identity[:, :1].expand(batch, m + 1, 1),
    }
