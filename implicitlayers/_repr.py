"""Compact ``repr`` for the hyperparameter dataclasses: only fields that differ from default."""

from __future__ import annotations

import dataclasses
from typing import Any


def compact_repr(obj: Any) -> str:
    """``Anderson(max_iter=100)`` rather than every field."""
    shown = []
    for f in dataclasses.fields(obj):
        if not f.repr:
            continue
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if default is dataclasses.MISSING or value != default:
            shown.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(shown)})"
