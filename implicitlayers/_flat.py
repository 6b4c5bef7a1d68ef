"""``FlatMap``: ``f`` on flat ``(B, n)`` states, the one wrapper every part of a solve calls.

A state may be a tensor or a (nested) tuple, list or dict of tensors. It is flattened once,
where a solve enters the library (:func:`flatten_state`), and everything after that, the
driver loop, the backward rule's attach, the diagnostics, works on the flat ``(B, n)`` form
through one :class:`FlatMap`, until the solution is unflattened once at the exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _tree
from ._autocast import AutocastSplit

__all__ = ["FlatMap", "check_structure", "flat_map", "flatten_state", "split_aux"]


class FlatMap:
    """``f`` on flat ``(b, n)`` iterates.

    Rebuilds the state's structure from a flat iterate (in the state's dtype; a single-tensor
    state costs no operation when it is already flat, one reshape otherwise), calls
    ``f(z, *inputs)``, splits off the auxiliary output when ``has_aux``, checks the structure,
    batch and dtype of what ``f`` returned and flattens it. ``f`` is called once per
    iteration, so the wrapper adds no tensor operation it can avoid.

    The solve calls it as ``f_flat(z, idx)``, ``idx`` selecting the samples the rows of ``z``
    belong to (``None``: all, in order), with ``f`` under the caller's autocast and the
    bookkeeping outside it (``amp``). A backward rule calls :meth:`with_inputs`'s map as
    ``f_flat(z)``.

    Attributes:
        spec: The state's structure.
        batch: Its batch size.
        dtype: The state's dtype (``f`` sees states in it).
        aux: With ``has_aux``: the auxiliary output of the latest call of ``f``.
    """

    def __init__(
        self,
        f: Callable[..., Any],
        spec: _tree.TreeSpec,
        inputs: tuple[Any, ...],
        *,
        batch: int,
        dtype: torch.dtype,
        amp: AutocastSplit | None = None,
        has_aux: bool = False,
    ) -> None:
        self.f = f
        self.spec = spec
        self.inputs = inputs
        self.batch = batch
        self.dtype = dtype
        self.amp = amp if amp is not None and amp.enabled else None
        self.has_aux = has_aux
        self.aux: Any = None
        #: Called once with the flat output of the next call, then cleared (a check).
        self.on_next_call: Callable[[Tensor], None] | None = None
        # Of a single-tensor state: its per-sample shape, and whether it is flat already.
        self._shape = spec.shape if spec.kind == "tensor" else None
        self._is_flat = self._shape is not None and len(self._shape) == 1
        self._numel = spec.numel  # explicit: an empty batch cannot infer it

    def with_inputs(self, inputs: tuple[Any, ...]) -> FlatMap:
        """The same map on other ``inputs``, with ``f`` under whatever autocast the caller has
        (no split: the caller does no bookkeeping), e.g. for the differentiable application
        that attaches the solution."""
        return FlatMap(
            self.f, self.spec, inputs, batch=self.batch, dtype=self.dtype, has_aux=self.has_aux
        )

    def unflatten(self, flat: Tensor, *, cast: bool = True) -> Any:
        """The state with this map's structure, from ``flat`` (cast to the state's dtype,
        unless ``cast=False``)."""
        if cast and flat.dtype != self.dtype:
            flat = flat.to(self.dtype)
        shape = self._shape
        if shape is None:
            return _tree.unflatten(flat, self.spec)
        return flat if self._is_flat else flat.reshape(flat.shape[0], *shape)

    def __call__(self, z: Tensor, idx: Tensor | None = None) -> Tensor:
        inputs = self.inputs
        if idx is not None:
            inputs = _select_rows(inputs, idx, self.batch)
        state = self.unflatten(z)
        if self.amp is None:  # the common case, without a context manager's cost on every call
            out = self.f(state, *inputs)
        else:
            with self.amp.user():
                out = self.f(state, *inputs)
        if self.has_aux:
            out, self.aux = split_aux(out)
        shape = self._shape
        if shape is None:
            check_structure(out, self.spec)
            flat: Tensor = _tree.flatten(out)
        else:
            if not isinstance(out, Tensor) or out.shape[1:] != shape:
                check_structure(out, self.spec)  # raises, naming both structures
            flat = out if out.dim() == 2 else out.reshape(out.shape[0], self._numel)
        if flat.shape[0] != z.shape[0]:
            _batch_error(flat.shape[0], z.shape[0])
        if flat.dtype != self.dtype and flat.is_complex() and not z.is_complex():
            _complex_error(flat.dtype, self.dtype)
        if self.on_next_call is not None:
            check, self.on_next_call = self.on_next_call, None
            check(flat)
        return flat


def flatten_state(
    f: Callable[..., Any], z0: Any, inputs: tuple[Any, ...], *, has_aux: bool = False
) -> tuple[FlatMap, Tensor]:
    """Check ``z0`` once and flatten it: the map on flat states and the flat ``(B, n)`` start.

    The map runs ``f`` under the autocast active here, and the start is in the solve's working
    dtype (float32 for half-precision states).
    """
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, *inputs), got {type(f).__name__}")
    spec = _tree.spec_of(z0)
    parts = _tree.leaves(z0)
    batch = _tree.batch_size(parts)
    first = parts[0]
    for p in parts:
        if not p.is_floating_point():
            raise TypeError(
                f"z0 must hold real floating-point tensors, got dtype {p.dtype}; pass z0 as "
                "float32 or float64 (a complex state: its real and imaginary parts as two "
                "tensors of a tuple state, or torch.view_as_real)"
            )
        if p.dtype != first.dtype or p.device != first.device:
            raise ValueError(
                "every tensor of z0 must share dtype and device, got "
                f"{first.dtype} on {first.device} and {p.dtype} on {p.device}"
            )
    amp = AutocastSplit(first.device.type)
    f_flat = FlatMap(f, spec, inputs, batch=batch, dtype=first.dtype, amp=amp, has_aux=has_aux)
    with torch.no_grad():
        flat0 = _tree.flatten(z0).to(work_dtype(first.dtype))
    return f_flat, flat0


def flat_map(f: Callable[..., Any], z: Any, inputs: tuple[Any, ...]) -> tuple[FlatMap, Tensor]:
    """The map of ``f`` on flat states with ``z``'s structure, and ``z`` flattened (detached,
    in its own dtype): for evaluating ``f`` at a point, as the diagnostics do."""
    spec = _tree.spec_of(z)
    flat = _tree.flatten(z).detach()
    if not flat.is_floating_point():
        raise TypeError(f"z must hold floating-point tensors, got dtype {flat.dtype}")
    return FlatMap(f, spec, inputs, batch=flat.shape[0], dtype=flat.dtype), flat


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a solve works in for states of ``dtype``: float32 for half precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def split_aux(out: Any) -> tuple[Any, Any]:
    """``(z_next, aux)`` from the output of an ``f`` built for ``DEQ(f, has_aux=True)``."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(
            "DEQ(f, has_aux=True) needs f to return a pair (z_next, aux), got "
            f"{type(out).__name__}; return (z_next, aux) or pass has_aux=False"
        )
    return out[0], out[1]


def check_structure(out: Any, spec: _tree.TreeSpec) -> None:
    """Raise a ``ValueError`` naming both structures when ``f``'s output does not match the
    state's."""
    hint = ""
    if spec.kind == "tensor" and isinstance(out, tuple) and len(out) == 2:
        hint = " If f returns (z_next, aux), construct the DEQ with has_aux=True."
    try:
        out_spec = _tree.spec_of(out)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"f returned {type(out).__name__}, expected {spec.describe()}.{hint}"
        ) from err
    if out_spec == spec:
        return
    if (
        out_spec.kind == spec.kind == "tensor"
        and out_spec.shape != spec.shape
        and sorted(out_spec.shape) == sorted(spec.shape)
    ):
        fix = (
            " The same sizes in another order: f must return the state in the layout it is "
            "given (a transpose or permute inside f, undone before it returns?)."
        )
    else:
        fix = (
            " A fixed point needs f to map a state to a state of the same structure: if z0 "
            "was taken by default (zeros like the first input), pass z0 with the state's "
            "structure, deq(*inputs, z0=...), fixed_point(f, z0, *inputs)."
        )
    raise ValueError(
        f"f(z, *inputs) returned {out_spec.describe()} for a state of structure "
        f"{spec.describe()}.{fix}{hint}"
    )


def _select_rows(inputs: tuple[Any, ...], idx: Tensor, batch: int) -> tuple[Any, ...]:
    """``inputs`` with every tensor batched like the state (leading dimension ``batch``),
    however deep in a structure, cut to the rows ``idx``."""

    def select(x: Tensor) -> Tensor:
        return x[idx] if x.dim() > 0 and x.shape[0] == batch else x

    return tuple(_tree.map_tensors(select, x) for x in inputs)


def _batch_error(got: int, expected: int) -> None:
    """Raise for an ``f`` whose output has another batch size than its input (broadcasting
    would otherwise give every sample one sample's answer)."""
    raise ValueError(
        f"f returned a batch of {got} samples for a state of {expected}; f must keep the "
        "batch dimension (one output row per input row)"
    )


def _complex_error(got: torch.dtype, state: torch.dtype) -> None:
    """Raise for a complex ``f(z)`` on a real state: casting it would drop the imaginary part
    and solve another problem."""
    raise TypeError(
        f"f returned a {got} state for a {state} state: its imaginary part would be dropped "
        "and the solve would find the fixed point of Re f, not of f. Solve for the real and "
        "imaginary parts as a real state (a tuple (re, im), or torch.view_as_real), with f "
        "returning them real."
    )
