"""Closed name lookups for the string forms accepted at the edges of the API.

Each package owns its table (:mod:`implicitlayers.solvers._names`,
:mod:`implicitlayers.backward._names`); this module only resolves a value against one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def lookup(
    value: Any, argument: str, table: Mapping[str, Any], base: type | tuple[type, ...]
) -> Any:
    """Return ``value`` if it is a ``base`` instance (one of them, for a tuple), else the
    default object it names (``table`` maps each name to a class or factory)."""
    if isinstance(value, base):
        return value
    valid = ", ".join(repr(name) for name in table)
    if isinstance(value, str):
        key = value.lower()
        if key in table:
            return table[key]()
        raise ValueError(f"unknown {argument} {value!r}; valid names are {valid}")
    if isinstance(value, type) and issubclass(value, base):
        raise TypeError(
            f"{argument} must be an instance, got the class {value.__name__}; "
            f"write {value.__name__}() (with its hyperparameters)"
        )
    raise TypeError(
        f"{argument} must be {describe(base)} or one of {valid}, got {value!r} "
        f"({type(value).__name__})"
    )


def describe(base: type | tuple[type, ...]) -> str:
    """``"an AbstractSolver instance"``, ``"an A or B instance"``: the article agrees."""
    names = [b.__name__ for b in (base if isinstance(base, tuple) else (base,))]
    article = "an" if names[0][:1].upper() in "AEIOU" else "a"
    return f"{article} {' or '.join(names)} instance"
