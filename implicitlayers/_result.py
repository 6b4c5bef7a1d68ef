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

    @property
    def message(self) -> str:
        """What happened, and what to try."""
        return _MESSAGES[self]


_MESSAGES = {
    Status.SUCCESS: "Converged: ||f(z) - z|| <= atol + rtol * ||f(z)||.",
    Status.MAX_ITER: (
        "Reached max_iter before the tolerance. Raise max_iter, loosen atol/rtol, use an "
        "accelerated solver (Anderson, Broyden), or make f more contractive (smaller step size, "
        "spectral normalisation)."
    ),
    Status.NONFINITE: (
        "f returned NaN or Inf. Check the inputs for NaN/Inf; if they are finite, the iteration "
        "blew up: make f contractive or damp the solver (Picard(damping=...), "
        "Anderson(mixing=...))."
    ),
    Status.DIVERGED: (
        "The residual grew past divergence_ratio times its initial value: f is probably not "
        "contractive here. Use a smaller step size, spectral normalisation, or damping."
    ),
    Status.BREAKDOWN: (
        "The solver's internal system broke down (Anderson's least-squares system or Broyden's "
        "update was singular) and the history was restarted without reaching the tolerance. "
        "Raise Anderson's regularization, lower history_size, or use Broyden or Picard."
    ),
}


@dataclass(frozen=True)
class SolverResult:
    r"""The outcome of a fixed-point solve, one entry per sample.

    Attributes:
        z: The solution, with the structure of ``z0`` (a tensor, or a tuple/list/dict of them).
            For samples that did not converge it is the iterate with the smallest residual.
        status: ``(B,)`` int64 tensor of :class:`Status` values.
        converged: ``(B,)`` bool tensor, ``status == Status.SUCCESS``.
        n_steps: ``(B,)`` int64 tensor: evaluations of ``f`` each sample received.
        residual: ``(B,)`` tensor: :math:`\|f(z) - z\|` at the returned ``z``, the norm taken
            over all non-batch dimensions of the flattened state.
        n_f_evals: Number of calls of ``f`` (each on the whole batch, or on the samples still
            running when ``independent_samples=True``).
        trace: ``(K, B)`` tensor of residuals at every iteration when the solver was built with
            ``trace=True`` (samples that had stopped repeat their last value), else ``None``.
    """

    z: Any
    status: Tensor
    converged: Tensor
    n_steps: Tensor
    residual: Tensor
    n_f_evals: int
    trace: Tensor | None = None

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
            f"{n}/{self.batch_size} {Status(code).name}: {Status(code).message}"
            for code, n in enumerate(counts)
            if n
        ]
        return "\n".join(lines)
