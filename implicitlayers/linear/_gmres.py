"""Restarted GMRES on a batch of matrix-free linear systems."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._result import SolverResult, Status
from .._validate import check_int
from ._base import AbstractLinearSolver, MatVec

__all__ = ["GMRES"]

_SUCCESS, _MAX_ITER = int(Status.SUCCESS), int(Status.MAX_ITER)
_NONFINITE, _BREAKDOWN = int(Status.NONFINITE), int(Status.BREAKDOWN)

#: A new Krylov direction, or a pivot of the triangular factor, counts as zero below this many
#: machine epsilons times the sample's operator norm estimate (the largest ||A v|| seen).
_BREAKDOWN_EPS = 128.0


@dataclass(frozen=True, kw_only=True, repr=False)
class GMRES(AbstractLinearSolver):
    r"""Restarted GMRES (Saad & Schultz, 1986), batched and matrix-free.

    From the residual :math:`r_0 = b - A x_0`, :math:`\beta = \|r_0\|`, the Arnoldi process
    builds an orthonormal basis :math:`V_k = [v_1, \dots, v_k]` of the Krylov space
    :math:`\mathcal{K}_k(A, r_0) = \operatorname{span}\{r_0, A r_0, \dots, A^{k-1} r_0\}`
    with :math:`A V_k = V_{k+1} \bar H_k` (:math:`\bar H_k` is :math:`(k+1) \times k` upper
    Hessenberg), and takes the iterate of smallest residual in :math:`x_0 + \mathcal{K}_k`:

    .. math::

        x_k = x_0 + V_k y_k, \qquad
        y_k = \arg\min_y \|\beta e_1 - \bar H_k y\|, \qquad
        \|b - A x_k\| = \|\beta e_1 - \bar H_k y_k\|.

    Givens rotations reduce :math:`\bar H_k` to triangular form one column per step, so the
    residual estimate (the last rotated entry of :math:`\beta e_1`) comes free with each step.
    After :math:`m` = ``restart`` steps the iterate is formed, its true residual is measured
    with one matvec, and the process restarts from it (GMRES(:math:`m`)). A cycle also ends
    early when the estimate meets the tolerance, when the basis breaks down, or when the
    budget is about to run out; so every sample ends on a true residual, and ``SUCCESS``
    always means :math:`\|b - A z\| \le \mathrm{atol} + \mathrm{rtol}\,\|b\|` at the returned
    ``z`` (not only the estimate).

    Each sample advances on its own: the whole batch goes through ``matvec`` once per
    iteration, but each row is, by its own state, the next Krylov vector, the iterate whose
    residual is measured, or (after it stopped) zeros, and a stopped sample is never updated
    again. The solve ends when every sample has stopped; the stopping test is one host read
    per iteration. Orthogonalisation is classical Gram–Schmidt run twice (CGS2, as batched
    matrix products): as orthogonal as Householder to working precision, also in float32
    (Giraud, Langou & Rozložník, 2005), at two passes over the basis per step where modified
    Gram–Schmidt would take :math:`k` sequential ones.

    Unlike a fixed-point solver on the adjoint equation :math:`u = J^\top u + g`, which
    converges only when the spectral radius :math:`\rho(J) < 1` (near that, slowly), GMRES on
    :math:`(I - J^\top) u = g` needs only :math:`I - J^\top` invertible: full GMRES (``restart
    >= n``) solves any invertible system in at most :math:`n` steps in exact arithmetic.
    Restarted GMRES can stagnate on strongly non-normal or indefinite systems; a larger
    ``restart`` helps.

    A singular operator never raises. When a pivot of the triangular factor vanishes
    (:math:`A` is singular on the Krylov space; relative to the largest :math:`\|A v\|` seen),
    the cycle ends without that direction; if it then leaves the true residual no smaller, the
    sample stops as ``Status.BREAKDOWN`` with the smallest residual found (for :math:`A = 0`
    after 2 matvecs). A non-finite ``rhs``, ``x0`` or matvec stops that sample as
    ``Status.NONFINITE``. ``MAX_ITER`` (and ``BREAKDOWN``) samples return the iterate with the
    smallest true residual, which is the ``residual`` reported. Also takes the options of
    :class:`~implicitlayers.linear.AbstractLinearSolver` (defaults ``max_iter=200``,
    ``atol=1e-8``, ``rtol=1e-6``).

    Cost: one matvec per step, plus one per cycle to measure the true residual (none for the
    start when ``x0`` is ``None``: the residual is ``rhs``); ``n_steps`` and ``max_iter``
    count both kinds, so the identity takes 2 and ``max_iter >= 2`` is needed for a step.
    Each step also reads the basis four times. Memory: the basis, ``(B, m + 1, n)``, with
    :math:`m = \min(\text{restart}, n)`, plus a few ``(B, n)`` vectors. Not meant to be
    differentiated through (the basis is updated in place): differentiate a linear solve
    implicitly instead.

    Args:
        restart: :math:`m \ge 1`, the Krylov dimension of a cycle before GMRES restarts;
            capped at ``n``.

    Example:
        >>> import torch
        >>> from implicitlayers.linear import GMRES
        >>> J = torch.tensor([[0.0, 3.0], [-3.0, 0.0]], dtype=torch.float64)  # rho(J) = 3
        >>> g = torch.ones(2, 2, dtype=torch.float64)
        >>> result = GMRES().solve(lambda u: u - u @ J, g)  # (I - J^T) u = g, row by row
        >>> result.z
        tensor([[-0.2000,  0.4000],
                [-0.2000,  0.4000]], dtype=torch.float64)
        >>> result.statuses(), result.n_steps.tolist()  # 2 Krylov steps, 1 true residual
        ([<Status.SUCCESS: 0>, <Status.SUCCESS: 0>], [3, 3])

    References:
        Y. Saad and M. H. Schultz. *GMRES: A Generalized Minimal Residual Algorithm for
        Solving Nonsymmetric Linear Systems.* SIAM Journal on Scientific and Statistical
        Computing, 7(3):856--869, 1986.

        L. Giraud, J. Langou and M. Rozložník. *The loss of orthogonality in the Gram-Schmidt
        orthogonalization process.* Computers & Mathematics with Applications,
        50(7):1069--1075, 2005.
    """

    restart: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("restart", self.restart, minimum=1)

    def solve(
        self, matvec: MatVec, rhs: Tensor, x0: Tensor | None = None, *, host_reads: bool = True
    ) -> SolverResult:
        r"""Solve :math:`A_b x_b = r_b` for every sample by restarted GMRES.

        Args:
            matvec: Applies the operators to a ``(B, n)`` batch, row by row.
            rhs: ``(B, n)`` floating-point right-hand sides :math:`r_b`.
            x0: ``(B, n)`` initial guesses, same dtype and device; zeros when ``None``.
            host_reads: ``False``: no host read, exactly ``max_iter`` matvecs (see
                :meth:`AbstractLinearSolver.solve
                <implicitlayers.linear.AbstractLinearSolver.solve>`).

        Returns:
            A :class:`~implicitlayers.SolverResult` (see
            :meth:`AbstractLinearSolver.solve <implicitlayers.linear.AbstractLinearSolver.solve>`).
        """
        _check_inputs(rhs, x0)
        run = _Run(self, rhs, x0, host_reads)
        n_f_evals = 0
        running = run.any_active()
        # Every active row gets one matvec per iteration and stops by max_iter of them.
        for _ in range(self.max_iter):
            if not running:
                break
            operand = run.operand()
            product = matvec(operand)
            n_f_evals += 1
            if not isinstance(product, Tensor) or product.shape != operand.shape:
                got = tuple(product.shape) if isinstance(product, Tensor) else type(product)
                raise ValueError(
                    f"matvec must map a (B, n) tensor to one of the same shape, got "
                    f"{tuple(operand.shape)} -> {got}; flatten the operator's input and output"
                )
            if product.dtype != operand.dtype:
                raise TypeError(
                    f"matvec must keep the dtype, got {operand.dtype} -> {product.dtype}; "
                    "cast its output (or solve in its dtype)"
                )
            running = run.step(product)
        z = run.best_x.clone() if run.best_x is x0 else run.best_x
        return SolverResult(
            z=z,
            status=run.status,
            converged=run.status == _SUCCESS,
            n_steps=run.n_steps,
            residual=run.best_res,
            n_f_evals=n_f_evals,
            linear=True,
        )


def _check_inputs(rhs: Tensor, x0: Tensor | None) -> None:
    if not isinstance(rhs, Tensor) or rhs.ndim != 2:
        shape = tuple(rhs.shape) if isinstance(rhs, Tensor) else type(rhs).__name__
        raise ValueError(f"rhs must be a (B, n) tensor, got {shape}; flatten it with flatten(1)")
    if not rhs.is_floating_point():
        raise TypeError(f"rhs must be a floating-point tensor, got {rhs.dtype}")
    if x0 is None:
        return
    if not isinstance(x0, Tensor) or x0.shape != rhs.shape:
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(
            f"x0 must have the shape of rhs {tuple(rhs.shape)}, got {shape}; pass None for zeros"
        )
    if x0.dtype != rhs.dtype or x0.device != rhs.device:
        raise TypeError(
            f"x0 must have the dtype and device of rhs ({rhs.dtype}, {rhs.device}), got "
            f"({x0.dtype}, {x0.device})"
        )


class _Run:
    """The state of one batched solve; each :meth:`step` consumes one matvec.

    Per row, a sample is in one of three states: ``expanding`` (the next matvec extends its
    Krylov basis), ``checking`` (the next matvec measures the true residual of its iterate,
    which ends a cycle) or stopped (neither). ``x`` changes only when a cycle ends, so while a
    row expands, ``x`` is the iterate whose true residual the last check measured.
    """

    def __init__(self, solver: GMRES, rhs: Tensor, x0: Tensor | None, host_reads: bool) -> None:
        batch, n = rhs.shape
        # Without host reads every step runs every part (masked), and the loop never stops.
        self.host_reads = host_reads
        m = max(1, min(solver.restart, n))
        device = rhs.device
        self.m, self.max_iter, self.rhs = m, solver.max_iter, rhs
        self.tiny = _BREAKDOWN_EPS * torch.finfo(rhs.dtype).eps
        self.tol = torch.linalg.vector_norm(rhs, dim=1) * solver.rtol + solver.atol
        self.cols = torch.arange(m + 1, device=device)[None, :]
        self.rows = torch.arange(batch, device=device)
        self.eye = torch.eye(m, dtype=rhs.dtype, device=device)
        # The Krylov basis V (columns v_0..v_m), the rotated Hessenberg matrix R, the rotated
        # beta e_1 (g) and the rotations (cs, sn), per row; the basis is written in place.
        self.V = rhs.new_zeros(batch, m + 1, n)
        self.R = rhs.new_zeros(batch, m, m)
        self.g = rhs.new_zeros(batch, m + 1)
        self.cs = rhs.new_ones(batch, m)
        self.sn = rhs.new_zeros(batch, m)
        # The column the next step fills (0-based: the basis vector expanded is v_k).
        self.k = torch.zeros(batch, dtype=torch.long, device=device)
        # Host-side upper bound on every row's k, so early steps skip unused rotations.
        self.k_bound = 0
        self.any_expanding = True
        self.singular = torch.zeros(batch, dtype=torch.bool, device=device)
        # max ||A v|| over the unit vectors v expanded so far: a lower estimate of ||A||.
        self.a_norm = rhs.new_zeros(batch)
        self.expanding = torch.zeros(batch, dtype=torch.bool, device=device)
        self.checking = torch.zeros(batch, dtype=torch.bool, device=device)
        self.status = torch.full((batch,), _MAX_ITER, dtype=torch.long, device=device)
        self.n_steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.best_res = torch.full((batch,), float("inf"), dtype=rhs.dtype, device=device)
        if x0 is None:
            # The residual of x = 0 is rhs itself: the first cycle starts without a matvec.
            self.x = self.best_x = torch.zeros_like(rhs)
            everyone = torch.ones(batch, dtype=torch.bool, device=device)
            self.expanding = self._checked(everyone, rhs)
        else:
            self.x = self.best_x = x0
            self.checking = torch.ones(batch, dtype=torch.bool, device=device)

    def any_active(self) -> bool:
        """Whether any row still runs; also notes on the host whether any row expands."""
        if not self.host_reads:
            return True
        flags = torch.stack((self.expanding.any(), self.checking.any())).tolist()
        self.any_expanding = bool(flags[0])
        return bool(flags[0] or flags[1])

    def operand(self) -> Tensor:
        """The ``(B, n)`` rows to apply the operators to: ``v_k``, ``x`` or zeros."""
        v = self.V[self.rows, self.k]
        return torch.where(
            self.expanding[:, None], v, torch.where(self.checking[:, None], self.x, 0.0)
        )

    def step(self, product: Tensor) -> bool:
        """Consume the operators applied to :meth:`operand`; ``True`` while any row runs."""
        expanding, checking = self.expanding, self.checking
        self.n_steps = self.n_steps + (expanding | checking).long()
        if self.any_expanding:
            close, blew_up = self._expand(product, expanding)
        else:  # every running row measures a residual: no Krylov work this time
            close = blew_up = torch.zeros_like(expanding)
        restarting = self._checked(checking, self.rhs - product)
        self.expanding = (expanding & ~close & ~blew_up) | restarting
        self.checking = close
        self.k_bound = min(self.k_bound + 1, self.m - 1)
        if not self.host_reads:
            self._form_iterate(close)
            return True
        # The one host read per iteration.
        any_close, any_expanding = torch.stack((close.any(), self.expanding.any())).tolist()
        if any_close:
            self._form_iterate(close)
        self.any_expanding = bool(any_expanding)
        return bool(any_close or any_expanding)

    def _expand(self, w: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """One Arnoldi step with Givens rotation on ``rows``: ``w = A v_k``.

        Returns the rows whose cycle ends here and those whose matvec was not finite.
        """
        m, k, V = self.m, self.k, self.V
        w_norm = torch.linalg.vector_norm(w, dim=1)
        blew_up = rows & ~torch.isfinite(w_norm)
        live = rows & ~blew_up
        # Classical Gram-Schmidt against v_0..v_k, twice, over the columns some row has
        # filled (k_bound bounds every row's k on the host): the early steps of a cycle do
        # not read the whole (B, m + 1, n) basis.
        filled = self.k_bound + 1
        basis = V[:, :filled]
        in_basis = self.cols[:, :filled] <= k[:, None]
        coefs = w.new_zeros(w.shape[0], filled)
        for _ in range(2):
            coef = torch.bmm(w[:, None, :], basis.transpose(1, 2)).squeeze(1)
            coef = torch.where(in_basis, coef, 0.0)
            w = w - torch.bmm(coef[:, None, :], basis).squeeze(1)
            coefs = coefs + coef
        h = torch.nn.functional.pad(coefs, (0, m + 1 - filled))
        h_next = torch.linalg.vector_norm(w, dim=1)
        # Column k of H-bar (entries 0..k+1), then the earlier rotations, identities past k.
        entries = list(torch.where(self.cols == k[:, None] + 1, h_next[:, None], h).unbind(1))
        for i in range(self.k_bound):
            c, s = self.cs[:, i], self.sn[:, i]
            a, b = entries[i], entries[i + 1]
            entries[i], entries[i + 1] = c * a + s * b, c * b - s * a
        column = torch.stack(entries[:m], dim=1)
        # The new rotation zeroes entry k + 1 (which the earlier ones left at h_next).
        a = column.gather(1, k[:, None]).squeeze(1)
        pivot = torch.hypot(a, h_next)
        nonzero = pivot > 0
        c = torch.where(nonzero, a / pivot, 1.0)
        s = torch.where(nonzero, h_next / pivot, 0.0)
        at_k = (self.cols[:, :m] == k[:, None]) & live[:, None]
        column = torch.where(
            self.cols[:, :m] < k[:, None], column, torch.where(at_k, pivot[:, None], 0.0)
        )
        self.R = torch.where(at_k[:, None, :], column[:, :, None], self.R)
        self.cs = torch.where(at_k, c[:, None], self.cs)
        self.sn = torch.where(at_k, s[:, None], self.sn)
        g_k = self.g.gather(1, k[:, None]).squeeze(1)
        g_next = -s * g_k
        self.g = torch.where(
            live[:, None] & (self.cols == k[:, None]),
            (c * g_k)[:, None],
            torch.where(live[:, None] & (self.cols == k[:, None] + 1), g_next[:, None], self.g),
        )
        # Breakdown: the new direction (invariant Krylov space) or the pivot (A singular on
        # it) vanishes relative to ||A||; with A = 0 both hold.
        self.a_norm = torch.where(live, torch.maximum(self.a_norm, w_norm), self.a_norm)
        threshold = self.tiny * self.a_norm
        invariant = h_next <= threshold
        singular = pivot <= threshold
        extend = live & ~invariant
        V[self.rows, k + 1] = torch.where(extend[:, None], w / h_next[:, None], V[self.rows, k + 1])
        close = live & (
            (g_next.abs() <= self.tol)
            | (k + 1 >= m)
            | invariant
            | (self.n_steps + 2 > self.max_iter)
        )
        self.singular = torch.where(close, singular, self.singular)
        self.k = torch.where(live & ~close, k + 1, k)
        self.status = torch.where(blew_up, _NONFINITE, self.status)
        return close, blew_up

    def _form_iterate(self, rows: Tensor) -> None:
        r"""End the cycle of ``rows``: :math:`x \leftarrow x + V_j R_j^{-1} g_j`.

        :math:`j = k + 1` columns, or :math:`k` when the last pivot was singular.
        """
        m = self.m
        n_cols = self.k + 1 - self.singular.long()
        used = self.cols[:, :m] < n_cols[:, None]
        square = torch.where(used[:, :, None] & used[:, None, :], self.R, self.eye)
        g = torch.where(used, self.g[:, :m], 0.0)
        y = torch.linalg.solve_triangular(square, g[:, :, None], upper=True).squeeze(2)
        dx = torch.bmm(y[:, None, :], self.V[:, :m]).squeeze(1)
        self.x = torch.where(rows[:, None], self.x + dx, self.x)

    def _checked(self, rows: Tensor, r: Tensor) -> Tensor:
        """Take ``r = rhs - A x`` for ``rows``: stop them or start a new cycle.

        Returns the rows that start a new cycle.
        """
        beta = torch.linalg.vector_norm(r, dim=1)
        finite = torch.isfinite(beta)
        blew_up = rows & ~finite
        better = rows & finite & (beta < self.best_res)
        # A cycle that ended on a singular pivot and left the residual no smaller would only
        # repeat itself: the operator is singular on its Krylov space.
        broke = rows & finite & ~(beta <= self.tol) & self.singular & ~better
        self.best_x = torch.where(better[:, None], self.x, self.best_x)
        # A row that is not finite on its first check reports that residual.
        first = blew_up & torch.isinf(self.best_res)
        self.best_res = torch.where(better | first, beta, self.best_res)
        done = rows & finite & (beta <= self.tol)
        restart: Tensor = rows & finite & ~done & ~broke & (self.n_steps + 2 <= self.max_iter)
        self.status = torch.where(
            blew_up,
            _NONFINITE,
            torch.where(done, _SUCCESS, torch.where(broke, _BREAKDOWN, self.status)),
        )
        safe_beta = torch.where(restart, beta, 1.0)
        self.V[:, 0] = torch.where(restart[:, None], r / safe_beta[:, None], self.V[:, 0])
        first_col = self.cols == 0
        self.g = torch.where(restart[:, None], torch.where(first_col, beta[:, None], 0.0), self.g)
        self.cs = torch.where(restart[:, None], 1.0, self.cs)
        self.sn = torch.where(restart[:, None], 0.0, self.sn)
        self.k = torch.where(restart, 0, self.k)
        self.singular = self.singular & ~restart
        return restart
