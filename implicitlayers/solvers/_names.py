"""The solvers' names for the string forms (``DEQ(f, solver="anderson")``)."""

from __future__ import annotations

from typing import Any

from .._lookup import lookup
from ._anderson import Anderson
from ._base import AbstractSolver
from ._broyden import Broyden
from ._picard import Picard

SOLVERS: dict[str, type[AbstractSolver]] = {
    "picard": Picard,
    "anderson": Anderson,
    "broyden": Broyden,
}


def as_solver(solver: Any, argument: str = "solver") -> AbstractSolver:
    """Return ``solver`` itself, or the default-configured solver it names."""
    found: AbstractSolver = lookup(solver, argument, SOLVERS, AbstractSolver)
    return found
