"""The forward solve as one autograd ``Function``, so that ``torch.func`` transforms pass it.

The driver loop reads per-sample flags on the host, which ``torch.func.vmap`` cannot batch.
:class:`_Solve` wraps the whole solve; its vmap rule folds the mapped dimension into the
batch (``(V, B, ...)`` becomes ``V * B`` samples), solves once (every sample is its own solve:
per-sample stopping) and unfolds the outputs, so statuses stay per sample and nested
``vmap`` folds again. Its outputs carry no gradient: the backward rule attaches the solution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _tree
from ._flat import FlatMap
from ._solve import apply_policies, solve
from .solvers import AbstractSolver
from .solvers._loop import LoopOutput

__all__ = ["Request", "solve_op"]


@dataclass
class Request:
    """What :func:`solve_op` solves, and, after it ran, the loop's output.

    Attributes:
        f_flat: The flat map; its inputs are rebuilt from the tensors passed to the op.
        solver, independent_samples, host_reads, record_at, keep_state: As for the loop.
        out: The loop's output (of the folded batch under ``vmap``).
        vmapped: Whether the solve ran under ``torch.func.vmap`` (the caller then reads
            nothing on the host: its tensors are batched).
    """

    f_flat: FlatMap
    solver: AbstractSolver
    independent_samples: bool
    host_reads: bool | None
    record_at: tuple[int, ...]
    keep_state: bool = False
    out: LoopOutput | None = None
    vmapped: bool = False
    _structure: Any = field(default=None, repr=False)

    def rebind(self, tensors: tuple[Tensor, ...], batch: int) -> FlatMap:
        """The flat map on the inputs rebuilt with ``tensors`` (in :func:`_tree.tensors_in`
        order), for a batch of ``batch`` samples."""
        it = iter(tensors)
        inputs = tuple(_tree.map_tensors(lambda _: next(it), x) for x in self.f_flat.inputs)
        f = self.f_flat
        return FlatMap(
            f.f, f.spec, inputs, batch=batch, dtype=f.dtype, amp=f.amp, has_aux=f.has_aux
        )


def solve_op(request: Request, flat0: Tensor) -> LoopOutput:
    """Solve through :class:`_Solve`: the loop's output, with every per-sample tensor (under
    ``vmap``, batched as the caller's tensors are); policies applied inside."""
    if _compiling() or _reads_nothing(request):
        # torch.compile and torch.export trace the solve itself (the chunks of the sync-free
        # path compile as graphs), and a solve that reads nothing on the host is plain tensor
        # operations, which every torch.func transform batches or differentiates as they are;
        # the Function serves the solves that read the host under torch.func's transforms.
        f_flat = request.f_flat
        out = solve(
            f_flat,
            flat0,
            request.solver,
            independent_samples=request.independent_samples,
            host_reads=request.host_reads,
            record_at=request.record_at,
            keep_state=request.keep_state,
        )
        request.out = out
        if not (_compiling() and _reads_nothing(request)):
            # A traced solve that reads nothing on the host stays one graph: its policies,
            # which would read the statuses, are not applied (check result.status).
            apply_policies(out, f_flat, request.solver)
        return out
    tensors = tuple(_tree.tensors_in(request.f_flat.inputs))
    outputs = _Solve.apply(flat0, request, *tensors)  # type: ignore[no-untyped-call]
    solved = request.out
    assert solved is not None
    out = solved
    z, status, n_steps, residual, rate, fz, *rest = outputs
    n_states = len(out.states)
    states = tuple(rest[:n_states])
    keys = () if out.solver_state is None else tuple(out.solver_state)
    kept = dict(zip(keys, rest[n_states : n_states + len(keys)], strict=True))
    trace = rest[-1] if out.trace is not None else None
    return LoopOutput(
        z=z,
        status=status,
        n_steps=n_steps,
        residual=residual,
        n_f_evals=out.n_f_evals,
        trace=trace,
        rate=rate,
        states=states,
        fz=None if request.vmapped or out.fz is None else fz,
        solver_state=kept if keys else None,
    )


class _Solve(torch.autograd.Function):
    """The solve: outputs ``(z, status, n_steps, residual, rate, fz, *states, *kept[, trace])``
    (``kept``: the solver's memory kept for its inverse estimate), none of them
    differentiable."""

    @staticmethod
    def forward(flat0: Tensor, request: Request, *tensors: Tensor) -> tuple[Tensor, ...]:
        f_flat = request.rebind(tensors, flat0.shape[0])
        out = solve(
            f_flat,
            flat0,
            request.solver,
            independent_samples=request.independent_samples,
            host_reads=request.host_reads,
            record_at=request.record_at,
            keep_state=request.keep_state,
        )
        request.out = out
        # Plain tensors here (under vmap too: the rule below folds first): the policies can
        # read the statuses.
        apply_policies(out, f_flat, request.solver)
        request.f_flat.aux = f_flat.aux
        fz = out.fz if out.fz is not None else out.z
        kept = () if out.solver_state is None else tuple(out.solver_state.values())
        extra = () if out.trace is None else (out.trace,)
        return (
            out.z,
            out.status,
            out.n_steps,
            out.residual,
            out.rate,
            fz,
            *out.states,
            *kept,
            *extra,
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.mark_non_differentiable(*output)
        ctx.n_outputs = len(output)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[None, ...]:
        return (None,) * len(ctx.needs_input_grad)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[None, ...]:
        count: int = ctx.n_outputs
        return (None,) * count

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        flat0: Tensor,
        request: Request,
        *tensors: Tensor,
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        mapped = info.batch_size
        z_dim = in_dims[0]
        batch = flat0.shape[0] if z_dim is None else flat0.movedim(z_dim, 0).shape[1]
        folded0 = _fold(flat0, z_dim, mapped, batch, "z0")
        folded = tuple(
            _fold(t, d, mapped, batch, f"input {i}")
            for i, (t, d) in enumerate(zip(tensors, in_dims[2:], strict=True))
        )
        outputs = _Solve.apply(folded0, request, *folded)  # type: ignore[no-untyped-call]
        request.vmapped = True
        traced = request.out is not None and request.out.trace is not None
        per_sample = outputs[:-1] if traced else outputs
        unfolded = [o.reshape(mapped, batch, *o.shape[1:]) for o in per_sample]
        dims = [0] * len(unfolded)
        if traced:  # the trace is (K, V * B): (K, V, B), mapped at dim 1
            trace = outputs[-1]
            unfolded.append(trace.reshape(trace.shape[0], mapped, batch))
            dims.append(1)
        return tuple(unfolded), tuple(dims)


def _reads_nothing(request: Request) -> bool:
    """Whether the solve reads nothing on the host: the sync-free path in one chunk."""
    solver = request.solver
    return (
        request.host_reads is False
        and not request.independent_samples
        and solver.check_every >= solver.max_iter
    )


def _compiling() -> bool:
    """Whether ``torch.compile`` or ``torch.export`` is tracing (``torch.compiler.is_compiling``
    from torch 2.3, ``torch._dynamo.is_compiling`` before)."""
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


def _fold(t: Tensor, dim: int | None, mapped: int, batch: int, name: str) -> Tensor:
    """``t`` with the mapped dimension folded into the batch: ``(V, B, ...)`` to
    ``(V * B, ...)``; a tensor batched like the state but not mapped is repeated ``V`` times,
    one that is neither is passed as it is."""
    if dim is None:
        if t.dim() == 0 or t.shape[0] != batch:
            return t
        return t.unsqueeze(0).expand(mapped, *t.shape).reshape(mapped * batch, *t.shape[1:])
    t = t.movedim(dim, 0)
    if t.dim() < 2 or t.shape[1] != batch:
        raise ValueError(
            f"vmap over {name} of shape {tuple(t.shape[1:])} (mapped size {mapped}): the "
            f"solve folds the mapped dimension into the batch of {batch} samples, so every "
            "mapped tensor the solve takes must be batched like the state (leading dimension "
            f"{batch}). Map only over tensors batched like the state (the inputs and z0), or "
            "close over the others."
        )
    return t.reshape(mapped * batch, *t.shape[2:])
