"""Closed name lookups for the string forms accepted at the edges of the API.

Each package owns its table (:mod:`implicitlayers.solvers._names`,
:mod:`implicitlayers.backward._names`); this module only resolves a value against one.
"""

from __future__ import annotations

from typing import Any


def lookup(value: Any, argument: str, table: dict[str, Any], base: type) -> Any:
    """Return ``value`` if it is a ``base`` instance, else the default object it names."""
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
