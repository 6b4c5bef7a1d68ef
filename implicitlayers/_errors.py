"""Exceptions and warnings raised by the solvers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._result import SolverResult

__all__ = ["ConvergenceError", "ConvergenceWarning"]


class ConvergenceError(RuntimeError):
    """A fixed-point solve failed in a way its policy says must stop the program.

    Raised for non-finite iterates by default (``on_nonfinite="raise"``) and for samples that
    did not converge when ``on_unconverged="raise"``.

    Attributes:
        result: The :class:`~implicitlayers.SolverResult` of the failed solve, so the caller
            can inspect per-sample statuses, residuals and the best iterate found.
    """

    def __init__(self, message: str, result: SolverResult) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[type[ConvergenceError], tuple[str, SolverResult]]:
        # Pickled with its result, so errors cross process boundaries (DataLoader workers,
        # multiprocessing, DDP ranks) intact; the default rebuilds from args alone.
        return type(self), (str(self), self.result)


class ConvergenceWarning(UserWarning):
    """Some samples did not converge (issued when a policy is ``"warn"``)."""
