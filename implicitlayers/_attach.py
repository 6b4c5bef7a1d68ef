"""What :class:`~implicitlayers.DEQ` needs to attach a solution to the autograd graph: which
tensors want a gradient, failed samples kept out of the graph, and a check that ``f`` is one
deterministic map."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from . import _tree
from ._errors import ConvergenceWarning
from ._flat import FlatMap
from ._result import Status
from ._warn import warn_at_caller
from .backward._functions import functorch_active
from .solvers._loop import _read, _read_traced, _tracing

__all__ = [
    "failed_rows",
    "forward_mode",
    "grad_leaves",
    "needs_attach",
    "watch_determinism",
    "without_nonfinite",
]


def grad_leaves(f: Callable[..., Any], inputs: tuple[Any, ...]) -> list[Tensor]:
    """Every tensor requiring grad that ``f`` can be seen to depend on, each once: the tensors
    of the inputs however deep (dicts, lists, tuples, dataclasses), and of an ``nn.Module``
    ``f`` (and its submodules) its parameters, buffers and plain tensor attributes; of a
    plain function, the tensors its closure and bound ``self`` hold. A tensor reached in
    another way (a global) is found by :func:`needs_attach`'s probe instead."""
    found = [t for t in _tree.tensors_in(inputs) if t.requires_grad]
    if isinstance(f, nn.Module):
        for m in f.modules():
            found += [p for p in m._parameters.values() if p is not None and p.requires_grad]
            found += [b for b in m._buffers.values() if b is not None and b.requires_grad]
            found += [v for v in vars(m).values() if isinstance(v, Tensor) and v.requires_grad]
    else:
        owner = getattr(f, "__self__", None)
        if isinstance(owner, nn.Module):
            found += grad_leaves(owner, ())
        cells = getattr(f, "__closure__", None) or ()
        for cell in cells:
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, nn.Module):
                found += grad_leaves(value, ())
            else:
                found += [t for t in _tree.tensors_in(value) if t.requires_grad]
    unique: dict[int, Tensor] = {}
    for t in found:
        unique.setdefault(id(t), t)
    return list(unique.values())


def needs_attach(f_flat: FlatMap, z_star: Tensor, leaves: list[Tensor]) -> bool:
    """Whether the solution needs attaching: a visible tensor wants a gradient, a
    ``torch.func`` transform runs, or, when neither, one application of ``f`` at the detached
    solution with autograd on says that ``f`` depends on a tensor that wants a gradient or
    carries a forward-mode tangent (a global, or one built inside ``f``). The probe costs one
    evaluation of ``f`` without a graph."""
    if leaves or functorch_active():
        return True
    with torch.enable_grad():
        out = f_flat(z_star.detach())
    return bool(out.requires_grad) or fwAD.unpack_dual(out).tangent is not None  # type: ignore[no-untyped-call]


def forward_mode(f: Callable[..., Any], inputs: tuple[Any, ...]) -> bool:
    """Whether tangents may flow through the solution although autograd does not record: a
    ``torch.func`` transform runs, or a tensor of the inputs or of an ``nn.Module`` ``f`` is
    a dual tensor of ``torch.autograd.forward_ad``."""
    if functorch_active():
        return True
    tensors = _tree.tensors_in(inputs)
    if isinstance(f, nn.Module):
        tensors += [*f.parameters(), *f.buffers()]
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)  # type: ignore[no-untyped-call]


def failed_rows(status: Tensor) -> Tensor:
    """``(B,)`` samples whose forward solve failed (``NONFINITE``, ``DIVERGED``): they get no
    gradient."""
    return (status == int(Status.NONFINITE)) | (status == int(Status.DIVERGED))


def clean_rows(z_flat: Tensor, failed: Tensor) -> Tensor:
    """``z_flat`` with the non-finite entries of the ``failed`` rows set to 0."""
    return torch.where(failed[:, None] & ~torch.isfinite(z_flat), 0.0, z_flat)


def without_nonfinite(inputs: tuple[Any, ...], failed: Tensor) -> tuple[Any, ...]:
    """``inputs`` with the non-finite entries of the ``failed`` samples' rows set to 0.

    Only tensors batched like the state (leading dimension ``B``), however deep in a
    structure, are touched; the failed rows' finite entries stay, so a map that couples
    samples sees the batch it was solved on.
    """
    batch = failed.shape[0]

    def clean(x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[0] != batch:
            return x
        if not x.is_floating_point() and not x.is_complex():
            return x
        rows = failed.view(batch, *([1] * (x.dim() - 1)))
        return torch.where(rows & ~torch.isfinite(x), 0.0, x)

    return tuple(_tree.map_tensors(clean, x) for x in inputs)


#: The checks that have warned in this process: each warns once (Python's default filter would
#: show it once per call site and message; the fix it names applies to every site).
_WARNED: set[str] = set()


def watch_determinism(f_flat: FlatMap, fz_solved: Tensor, rtol: float, atol: float) -> None:
    """Compare the next call of ``f_flat`` (the attach's application of ``f`` at the returned
    batch) with ``fz_solved``, ``f`` at the same batch in the solve: a deterministic map gives
    the same values, so rows that differ by more than the solver's tolerance mean that ``f``
    changes from call to call (``nn.Dropout`` in training mode, a random layer), and the
    solution is not a fixed point of any one of its draws. Warns once (``atol`` in l2 units).
    """

    def check(fz: Tensor) -> None:
        ref = fz_solved
        diff = torch.linalg.vector_norm(fz.detach().to(ref.dtype) - ref, dim=1)
        bound = torch.linalg.vector_norm(ref, dim=1).mul_(rtol).add_(atol)
        # One host read, through the dynamo-disabled reader when compiling (no graph-break
        # warning in a compiled DEQ with host reads).
        n_moved = (_read_traced if _tracing() else _read)((diff > bound).sum())
        if not n_moved:
            return
        message = (
            f"f is not one deterministic map: applied twice at the returned batch, its value "
            f"changed by more than the solver's tolerance for {n_moved}/{len(diff)} "
            "samples, so what the solve reported as converged is not a fixed point of the map "
            "the backward pass differentiates (and the next draw would move it again). A "
            "random layer inside f, usually nn.Dropout in training mode, draws a new mask at "
            "every call: use implicitlayers.nn.VariationalDropout (one mask per forward, "
            "frozen by implicitlayers.nn.one_map, which DEQ enters), or put the random layer "
            "outside f. This warning is shown once."
        )
        if "determinism" in _WARNED:
            return
        _WARNED.add("determinism")
        warn_at_caller(message, ConvergenceWarning)

    f_flat.on_next_call = check
