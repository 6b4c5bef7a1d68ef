"""The backward rules' names for the string forms (``DEQ(f, backward="jfb")``)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .._lookup import lookup
from ._base import AbstractBackward
from ._implicit import ImplicitDifferentiation
from ._jfb import JFB
from ._neumann import Neumann
from ._phantom import PhantomGradient
from ._shine import SHINE

#: The names the string forms accept, and the class each names (read-only).
BACKWARDS: Mapping[str, type[AbstractBackward]] = MappingProxyType(
    {
        "jfb": JFB,
        "neumann": Neumann,
        "implicit": ImplicitDifferentiation,
        "phantom": PhantomGradient,
        "shine": SHINE,
    }
)


def as_backward(backward: Any, argument: str = "backward") -> AbstractBackward:
    """Return ``backward`` itself, or the default-configured rule it names."""
    found: AbstractBackward = lookup(backward, argument, BACKWARDS, AbstractBackward)
    return found
