"""Argument checks shared by the solver and backward-rule dataclasses.

Every message names the argument, the value received and what to pass instead.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, Literal

#: What to do about samples that did not converge: record it, warn, or raise.
Policy = Literal["ignore", "warn", "raise"]


def check_int(name: str, value: Any, *, minimum: int) -> None:
    """``value`` must be an int (not a bool) with ``value >= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_float(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``value`` must be a finite real number in the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {left}{low}, {high}{right}, got {value}")


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")


def check_budget(max_iter: Any, atol: Any, rtol: Any, *, example_rtol: str = "1e-4") -> None:
    """The budget and tolerances every iterative solver takes: ``max_iter >= 1``, ``atol`` and
    ``rtol`` non-negative and not both 0 (nothing could converge in floating point)."""
    check_int("max_iter", max_iter, minimum=1)
    check_float("atol", atol, low=0.0)
    check_float("rtol", rtol, low=0.0)
    if atol == 0 and rtol == 0:
        raise ValueError(
            "atol and rtol are both 0, so no iterate can converge in floating point; "
            f"make at least one positive (e.g. rtol={example_rtol})"
        )
