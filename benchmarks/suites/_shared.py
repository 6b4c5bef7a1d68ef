"""Helpers shared by several suites: solver factories, problem lists, record formatting."""

from __future__ import annotations

from typing import Any

import torch

import implicitlayers as il

from .._problems import (
    Problem,
    Unavailable,
    degrad_problem,
    residual_block_problem,
    tanh_conv_problem,
)
from .._types import SuiteContext, SuiteResult


def make_solver(name: str, **options: Any) -> il.AbstractSolver:
    """A solver by name (the library's own table) with the given shared options
    (``max_iter``, ``atol``, ...)."""
    if name not in il.solvers.SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid: {', '.join(il.solvers.SOLVERS)}")
    return il.solvers.SOLVERS[name](**options)


#: The library's solvers, by name: every suite runs each one.
SOLVER_NAMES = tuple(il.solvers.SOLVERS)


def conv_layer(ctx: SuiteContext, dtype: torch.dtype = torch.float32) -> Problem:
    """The standard DEQ layer every suite uses (tiny under ``--quick``)."""
    if ctx.quick:
        return tanh_conv_problem(batch=2, channels=4, size=8, device=ctx.device, dtype=dtype)
    return tanh_conv_problem(batch=8, channels=32, size=32, device=ctx.device, dtype=dtype)


def residual_block(ctx: SuiteContext, dtype: torch.dtype = torch.float32) -> Problem:
    """An MDEQ-style residual block at the conv layer's sizes (tiny under ``--quick``)."""
    if ctx.quick:
        return residual_block_problem(batch=2, channels=8, size=8, device=ctx.device, dtype=dtype)
    return residual_block_problem(batch=8, channels=32, size=32, device=ctx.device, dtype=dtype)


def maybe_degrad(
    ctx: SuiteContext, *, batch: int, size: int, dtype: torch.dtype = torch.float32
) -> tuple[Problem | None, str | None]:
    """The DE-GRAD problem, or ``(None, reason)`` when ``implicitlayers.imaging`` is absent."""
    try:
        return degrad_problem(batch=batch, size=size, device=ctx.device, dtype=dtype), None
    except Unavailable as err:
        return None, str(err)


def conv_and_degrad(ctx: SuiteContext, suite: SuiteResult) -> list[Problem]:
    """The conv layer and DE-GRAD (batch 2 at 64x64; 1 at 16x16 under ``--quick``); a note
    on ``suite`` says why DE-GRAD is missing when it is."""
    problems = [conv_layer(ctx)]
    degrad, reason = maybe_degrad(ctx, batch=1 if ctx.quick else 2, size=16 if ctx.quick else 64)
    if degrad is None:
        suite.notes.append(f"DE-GRAD problem skipped: {reason}")
    else:
        problems.append(degrad)
    return problems


def relative_residual(problem: Problem, z: torch.Tensor) -> float:
    r"""Largest per-sample :math:`\|f(z) - z\| / \|f(z)\|` over the batch (recomputed)."""
    with torch.no_grad():
        fz = problem.f(z)
        res = torch.linalg.vector_norm((fz - z).flatten(1), dim=1)
        return float((res / torch.linalg.vector_norm(fz.flatten(1), dim=1)).max())
