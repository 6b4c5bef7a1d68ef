"""Closed name lookups for the string forms accepted at the edges of the API."""

from __future__ import annotations

from typing import Any

from .backward import JFB, AbstractBackward, ImplicitDifferentiation, Neumann
from .solvers import AbstractSolver, Anderson, Broyden, Picard

SOLVERS: dict[str, type[AbstractSolver]] = {
    "picard": Picard,
    "anderson": Anderson,
    "broyden": Broyden,
}
BACKWARDS: dict[str, type[AbstractBackward]] = {
    "jfb": JFB,
    "neumann": Neumann,
    "implicit": ImplicitDifferentiation,
}


def as_solver(solver: Any, argument: str = "solver") -> AbstractSolver:
    """Return ``solver`` itself, or the default-configured solver it names."""
    found: AbstractSolver = _lookup(solver, argument, SOLVERS, AbstractSolver)
    return found


def as_backward(backward: Any, argument: str = "backward") -> AbstractBackward:
    """Return ``backward`` itself, or the default-configured rule it names."""
    found: AbstractBackward = _lookup(backward, argument, BACKWARDS, AbstractBackward)
    return found


def _lookup(value: Any, argument: str, table: dict[str, Any], base: type) -> Any:
    if isinstance(value, base):
        return value
    if isinstance(value, str):
        key = value.lower()
        if key in table:
            return table[key]()
        valid = ", ".join(repr(name) for name in table)
        raise ValueError(f"unknown {argument} {value!r}; valid names are {valid}")
    if isinstance(value, type) and issubclass(value, base):
        raise TypeError(
            f"{argument} must be an instance, got the class {value.__name__}; "
            f"write {value.__name__}() (with its hyperparameters)"
        )
    raise TypeError(
        f"{argument} must be a {base.__name__} instance or one of "
        f"{', '.join(repr(n) for n in table)}, got {value!r} ({type(value).__name__})"
    )
