"""Structured outcome of a fixed-point solve."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["SolverResult", "Status"]


class Status(enum.IntEnum):
    """Per-sample outcome of a solve.

    ``SolverResult.status`` is an integer tensor holding these values, so
    ``result.status == Status.SUCCESS`` gives a boolean mask.
    """

    SUCCESS = 0
    MAX_ITER = 1
    NONFINITE = 2
    DIVERGED = 3
    BREAKDOWN = 4
    UNSETTLED = 5

    @property
    def message(self) -> str:
        """What happened in a fixed-point solve, and what to try."""
        return _MESSAGES[self]

    @property
    def linear_message(self) -> str:
        """What happened in a linear solve :math:`A z = b` (GMRES, e.g. the adjoint solve of
        :class:`~implicitlayers.ImplicitDifferentiation`), and what to try."""
        return _LINEAR_MESSAGES[self]


_MESSAGES = {
    Status.SUCCESS: "Converged: ||f(z) - z|| <= atol + rtol * ||f(z)||.",
    Status.MAX_ITER: (
        "Did not meet the tolerance within max_iter evaluations of f. Raise max_iter, loosen "
        "atol/rtol, or make f more contractive (a smaller step size, spectral normalisation); "
        "Picard converges at f's contraction rate, Anderson and Broyden usually faster."
    ),
    Status.NONFINITE: (
        "f returned NaN or Inf. Check the inputs for NaN/Inf; if they are finite, the iteration "
        "blew up: make f contractive or lower the solver's mixing (Picard(mixing=0.5), "
        "Anderson(mixing=0.5))."
    ),
    Status.DIVERGED: (
        "The residual grew past divergence_ratio times its initial value: f is probably not "
        "contractive here. Use a smaller step size, spectral normalisation, or a mixing below 1 "
        "(Picard(mixing=0.5))."
    ),
    Status.BREAKDOWN: (
        "The solver's internal system broke down (Anderson's least-squares system or Broyden's "
        "update was singular) and the history was restarted without reaching the tolerance. "
        "Raise Anderson's regularization, lower history_size, or use Broyden or Picard."
    ),
    Status.UNSETTLED: (
        "Met the tolerance, but f couples the samples (batch statistics, a batch mean) and the "
        "other samples' later iterates moved it out of tolerance; it had not met it again when "
        "the solve ended. It settles once every sample converges: raise max_iter for the "
        "samples still running, or make f treat the samples independently (batch norm in eval "
        "mode inside f)."
    ),
}


_LINEAR_MESSAGES = {
    Status.SUCCESS: "Converged: ||b - A z|| <= atol + rtol * ||b||.",
    Status.MAX_ITER: (
        "Reached max_iter matrix-vector products before ||b - A z|| <= atol + rtol * ||b||. "
        "Raise max_iter, raise restart (restarted GMRES can stagnate; a larger Krylov space "
        "per cycle helps), or loosen atol/rtol. For the adjoint system (I - J^T) u = g, an "
        "eigenvalue of J near 1 makes it ill-conditioned: regularise f towards a contraction."
    ),
    Status.NONFINITE: (
        "The right-hand side, the initial guess or a matrix-vector product was NaN or Inf. For "
        "the adjoint solve: check the incoming gradient and f's vector-Jacobian products at "
        "the fixed point."
    ),
    Status.DIVERGED: (
        "The residual ||b - A z|| grew, which a minimal-residual method does not do on a fixed "
        "linear operator: check that the matrix-vector product is linear and deterministic."
    ),
    Status.BREAKDOWN: (
        "The Krylov process broke down before the tolerance: A is singular (or numerically "
        "so) on the Krylov space. For the adjoint system (I - J^T) u = g, J has an eigenvalue "
        "at or near 1: regularise f towards a contraction."
    ),
    Status.UNSETTLED: "Not a linear solve's status: a fixed-point solve's, for coupled samples.",
}


@dataclass(frozen=True)
class SolverResult:
    r"""The outcome of a fixed-point solve, one entry per sample.

    ``SUCCESS`` means the sample's residual is within tolerance at the returned batch, also when
    ``f`` couples the samples (see :func:`~implicitlayers.fixed_point`); ``UNSETTLED`` marks
    a sample that met it at some batch and lost it as the other samples moved on. A small
    residual is not a small error when ``f`` contracts slowly: for a contraction with
    Lipschitz constant :math:`L < 1`,

    .. math::

        \|z - z^\star\| \le \frac{\|f(z) - z\|}{1 - L},

    which :attr:`error_estimate` evaluates with the solver's estimate :attr:`rate` of
    :math:`L`.

    Attributes:
        z: The solution, with the structure of ``z0`` (a tensor, or a tuple/list/dict of them).
            For samples that did not converge it is the iterate with the smallest residual.
        status: ``(B,)`` int64 tensor of :class:`Status` values.
        converged: ``(B,)`` bool tensor, ``status == Status.SUCCESS``.
        n_steps: ``(B,)`` int64 tensor: iterations each sample ran (evaluations of ``f`` it
            received while running, the one that stopped it included).
        residual: ``(B,)`` tensor: :math:`\|f(z) - z\|` at the returned ``z``, in the
            solver's ``norm`` over all non-batch dimensions of the flattened state: the
            Euclidean norm (``"l2"``) or that norm divided by :math:`\sqrt{n}` for :math:`n`
            features per sample (``"rms"``).
        n_f_evals: Number of calls of ``f`` (each on the whole batch, or on the samples still
            running when ``independent_samples=True``), including the one evaluation at the
            returned batch that the default path adds when some samples return an earlier
            iterate.
        trace: ``(K, B)`` tensor of residuals at every iteration when the solver was built with
            ``trace=True`` (samples that had stopped repeat their last value), in the norm of
            :attr:`residual`, else ``None``.
        rate: ``(B,)`` tensor: the secant estimate
            :math:`\|f(z_k) - f(z_{k-1})\| / \|z_k - z_{k-1}\|` of the contraction rate
            over each sample's last step (a lower estimate of the Lipschitz constant of ``f``
            along that step; a ratio, so the same in either norm); NaN where no step was
            taken, ``None`` when no estimate was made (an empty batch, a linear solve).
        states: The iterates requested with ``fixed_point(..., states=(k1, k2, ...))``, each
            with the structure of ``z0`` (a sample that stopped before :math:`k` gives its
            returned iterate); empty when none were requested.
        linear: ``True`` for the result of a linear solve :math:`A z = b`
            (:class:`~implicitlayers.GMRES`): then :attr:`residual` is
            :math:`\|b - A z\|` and :meth:`summary` words each status for a linear system
            (:attr:`Status.linear_message`).
    """

    z: Any
    status: Tensor
    converged: Tensor
    n_steps: Tensor
    residual: Tensor
    n_f_evals: int
    trace: Tensor | None = None
    rate: Tensor | None = None
    states: tuple[Any, ...] = ()
    linear: bool = False

    @property
    def error_estimate(self) -> Tensor | None:
        r"""``(B,)`` a-posteriori estimate of :math:`\|z - z^\star\|`: ``residual / (1 - rate)``.

        In the norm of :attr:`residual` (so the RMS error for a solver with ``norm="rms"``).
        Zero where the residual is zero, ``inf`` where the rate estimate is at least 1 (no
        contraction seen), NaN where no rate was estimated; ``None`` without :attr:`rate`.
        An estimate, not a bound: :attr:`rate` can underestimate the contraction rate when the
        last step ran along a fast-contracting direction.

        Example:
            >>> import torch, implicitlayers as il
            >>> r = il.fixed_point(lambda z: 0.99 * z + 1, torch.zeros(1, 1),
            ...                    solver=il.Picard(max_iter=5000))
            >>> error = (r.z - 100).abs().item()   # the fixed point is 100
            >>> round(r.rate.item(), 4), error > 100 * r.residual.item()
            (0.99, True)
            >>> abs(r.error_estimate.item() - error) < 0.01 * error
            True
        """
        if self.rate is None:
            return None
        contracting = self.residual / (1 - self.rate)
        estimate = torch.where(self.rate < 1, contracting, float("inf"))
        estimate = torch.where(torch.isnan(self.rate), float("nan"), estimate)
        return torch.where(self.residual == 0, 0.0, estimate)

    @property
    def batch_size(self) -> int:
        """Number of samples."""
        return int(self.status.shape[0])

    def statuses(self) -> list[Status]:
        """The per-sample statuses as :class:`Status` members."""
        return [Status(int(s)) for s in self.status.tolist()]

    def summary(self) -> str:
        """One line per status that occurred, with its count and its message."""
        if self.batch_size == 0:
            return "empty batch"
        counts = torch.bincount(self.status.cpu(), minlength=len(Status)).tolist()
        lines = [
            f"{n}/{self.batch_size} {Status(code).name}: "
            + (Status(code).linear_message if self.linear else Status(code).message)
            for code, n in enumerate(counts)
            if n
        ]
        return "\n".join(lines)
