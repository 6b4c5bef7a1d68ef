"""The solvers' names for the string forms (``DEQ(f, solver="anderson")``)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .._lookup import describe, lookup
from ..linear._base import AbstractLinearSolver
from ._anderson import Anderson
from ._base import AbstractSolver
from ._broyden import Broyden
from ._picard import Picard

#: The names the string forms accept, and the class each names (read-only).
SOLVERS: Mapping[str, type[AbstractSolver]] = MappingProxyType(
    {
        "picard": Picard,
        "anderson": Anderson,
        "broyden": Broyden,
    }
)


def as_solver(solver: Any, argument: str = "solver") -> AbstractSolver:
    """Return ``solver`` itself, or the default-configured solver it names."""
    if isinstance(solver, AbstractLinearSolver):
        valid = ", ".join(repr(name) for name in SOLVERS)
        raise TypeError(
            f"{argument} must be {describe(AbstractSolver)} or one of {valid}, got {solver!r}, "
            f"which is a linear solver: it solves the adjoint system (I - J^T) u = g of "
            f"implicit differentiation, not the forward fixed point. Pass it as "
            f"ImplicitDifferentiation(solver={solver!r}) (DEQ(f, backward=...)) and choose a "
            "fixed-point solver here, e.g. Anderson()"
        )
    found: AbstractSolver = lookup(solver, argument, SOLVERS, AbstractSolver)
    return found
