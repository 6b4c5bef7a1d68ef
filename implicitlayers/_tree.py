"""Flatten states that are tensors or (nested) tuples, lists and dicts of tensors.

Written here rather than borrowed from ``torch.utils._pytree``, which is private API.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class TreeSpec:
    """How to rebuild a state from its flat ``(B, n)`` form."""

    kind: str  # "tensor", "tuple", "list" or "dict"
    shape: tuple[int, ...] = ()  # per-sample shape of a tensor leaf
    keys: tuple[Any, ...] = ()
    children: tuple[TreeSpec, ...] = ()

    @property
    def numel(self) -> int:
        """Flat size of one sample."""
        if self.kind == "tensor":
            return int(torch.Size(self.shape).numel())
        return sum(c.numel for c in self.children)

    def describe(self) -> str:
        """Readable structure, e.g. ``(B, 3, 8, 8)`` or ``tuple[(B, 4), (B, 2)]``."""
        if self.kind == "tensor":
            return "(" + ", ".join(["B", *map(str, self.shape)]) + ")"
        if self.kind == "dict":
            pairs = zip(self.keys, self.children, strict=True)
            inner = ", ".join(f"{k!r}: {c.describe()}" for k, c in pairs)
            return "{" + inner + "}"
        return f"{self.kind}[" + ", ".join(c.describe() for c in self.children) + "]"


def leaves(tree: Any) -> list[Tensor]:
    """The tensors of a state, in flattening order."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [leaf for k in tree for leaf in leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [leaf for t in tree for leaf in leaves(t)]
    raise TypeError(
        f"a state must be a Tensor or a tuple/list/dict of Tensors, got {type(tree).__name__}"
    )


def spec_of(tree: Any) -> TreeSpec:
    """The structure of a state (batch dimension first in every leaf)."""
    if isinstance(tree, Tensor):
        if tree.dim() == 0:
            raise ValueError(
                "a state tensor needs a leading batch dimension, got a 0-d tensor; "
                "use shape (B, ...) with B = 1 for a single sample"
            )
        return TreeSpec("tensor", shape=tuple(tree.shape[1:]))
    if isinstance(tree, dict):
        keys = tuple(tree)
        return TreeSpec("dict", keys=keys, children=tuple(spec_of(tree[k]) for k in keys))
    if isinstance(tree, (tuple, list)):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return TreeSpec(kind, children=tuple(spec_of(t) for t in tree))
    raise TypeError(
        f"a state must be a Tensor or a tuple/list/dict of Tensors, got {type(tree).__name__}"
    )


def flatten(tree: Any) -> Tensor:
    """Concatenate every leaf, reshaped to ``(B, -1)``, into one ``(B, n)`` tensor."""
    parts = [p.reshape(p.shape[0], _numel(p)) for p in leaves(tree)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _numel(p: Tensor) -> int:
    return int(torch.Size(p.shape[1:]).numel())


def unflatten(flat: Tensor, spec: TreeSpec) -> Any:
    """Inverse of :func:`flatten` for a structure ``spec``."""
    out, _ = _unflatten(flat, spec, 0)
    return out


def _unflatten(flat: Tensor, spec: TreeSpec, start: int) -> tuple[Any, int]:
    if spec.kind == "tensor":
        n = spec.numel
        return flat[:, start : start + n].reshape(flat.shape[0], *spec.shape), start + n
    items: list[Any] = []
    for child in spec.children:
        item, start = _unflatten(flat, child, start)
        items.append(item)
    if spec.kind == "dict":
        return dict(zip(spec.keys, items, strict=False)), start
    if spec.kind == "tuple":
        return tuple(items), start
    return items, start


def batch_size(parts: Sequence[Tensor]) -> int:
    """The common leading dimension of ``parts``; raises if they disagree."""
    sizes = {p.shape[0] for p in parts}
    if len(sizes) != 1:
        raise ValueError(f"all state tensors must share the batch size, got sizes {sorted(sizes)}")
    return sizes.pop()


def map_tensors(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it, however deep: through tuples
    (named tuples too), lists, dicts and dataclass instances. Anything else is kept as it
    is, and a container in which nothing changed is returned itself (no copy).

    This is for the inputs of ``f``, which may be any structure; states are the narrower
    structures :func:`spec_of` describes.
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        items = {k: map_tensors(fn, v) for k, v in obj.items()}
        return obj if all(items[k] is obj[k] for k in obj) else type(obj)(items)
    if isinstance(obj, (tuple, list)):
        values = [map_tensors(fn, v) for v in obj]
        if all(a is b for a, b in zip(values, obj, strict=True)):
            return obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
            return type(obj)(*values)
        return type(obj)(values)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            new = map_tensors(fn, value)
            if new is not value:
                changes[field.name] = new
        if not changes:
            return obj
        out = copy.copy(obj)
        for name, value in changes.items():
            object.__setattr__(out, name, value)  # frozen dataclasses too
        return out
    return obj


def tensors_in(obj: Any) -> list[Tensor]:
    """Every tensor in ``obj``, in the order :func:`map_tensors` visits them."""
    found: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        found.append(t)
        return t

    map_tensors(keep, obj)
    return found
