r"""Suite: adjoint solvers on hard adjoint equations, GMRES against fixed-point solvers.

Implicit differentiation solves :math:`(I - J^\top) u = g` with vector-Jacobian products
only. Picard iterates :math:`u \leftarrow J^\top u + g`, which converges only when the
spectral radius :math:`\rho(J) < 1`, slowly as it nears 1; Anderson and Broyden accelerate
that iteration (on an affine map they are Krylov-like and quasi-Newton methods, with no
guarantee once :math:`\rho(J) \ge 1`); GMRES needs only :math:`I - J^\top` invertible. Linear
cells on a 2-D grid put that to the test:

* a Jacobi sweep for the Poisson equation, :math:`\rho(J) = \cos(\pi / (N + 1))`
  (0.9955 on 32 x 32): contractive, but barely;
* convection-diffusion stencils whose :math:`J` has purely imaginary eigenvalues with
  :math:`\rho(J) = 1.51` and :math:`1.83`: not contractions, yet :math:`I - J^\top` is
  invertible (its eigenvalues are :math:`1 \pm i y`, :math:`|y| \le \rho`).

Each adjoint solver gets a budget of 500 VJPs and the target relative residual
:math:`\|g - (I - J^\top) u\| \le 10^{-6} \|g\|` (every ``g`` has unit norm, so this is
``atol=1e-6, rtol=0`` for both kinds of solver). The suite records the VJPs spent, the time,
whether each sample converged, and the true residual and error of the returned ``u`` against
``torch.linalg.solve`` on the dense :math:`I - J^\top` in float64.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicitlayers as il

from .._report import fmt
from .._timing import measure
from .._types import SuiteContext, SuiteResult

NAME = "adjoint"
TITLE = "Adjoint solvers: GMRES against fixed-point solvers"
TARGET = 1e-6  # relative residual of the adjoint equation
BUDGET = 500  # VJPs per solve
DIFFUSION = 0.5
#: Advection strengths of the non-contractive cells: rho(J) = 1.51 and 1.83 at 32 x 32.
ADVECTIONS = (0.8, 0.95)


class StencilCell(nn.Module):
    r"""A linear cell :math:`f(z, x) = K * z + x` with a fixed 3x3 stencil :math:`K`, zero
    boundary (``(B, 1, N, N)`` states).

    Args:
        stencil: The ``(3, 3)`` stencil.
    """

    stencil: Tensor

    def __init__(self, stencil: Tensor) -> None:
        super().__init__()
        self.register_buffer("stencil", stencil.view(1, 1, 3, 3))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """Apply the cell."""
        return F.conv2d(z, self.stencil, padding=1) + x


def jacobi_poisson() -> Tensor:
    r"""The Jacobi sweep for :math:`-\Delta u = x`: each value becomes the mean of its four
    neighbours, :math:`\rho(J) = \cos(\pi / (N + 1))`."""
    return torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]])


def convection_diffusion(advection: float, diffusion: float = DIFFUSION) -> Tensor:
    r"""A diffusion (weight ``diffusion``, symmetric) plus central-difference advection
    (``advection``, antisymmetric) stencil in both directions. For ``advection > diffusion /
    2`` the eigenvalues of :math:`J` are purely imaginary, :math:`\rho(J) = 4
    \sqrt{a^2/4 - d^2/16}\,\cos(\pi / (N + 1))` (1.51 for ``advection=0.8`` at N = 32)."""
    d, a = diffusion / 4, advection / 2
    return torch.tensor([[0.0, d + a, 0.0], [d - a, 0.0, d + a], [0.0, d - a, 0.0]])


def _solvers(quick: bool) -> dict[str, il.AbstractSolver | il.linear.AbstractLinearSolver]:
    # The same stopping rule for both kinds: ||g - (I - J^T) u|| <= TARGET (||g|| = 1).
    fixed: dict[str, Any] = {"max_iter": BUDGET, "atol": TARGET, "rtol": 0.0}
    solvers: dict[str, il.AbstractSolver | il.linear.AbstractLinearSolver] = {
        "Picard": il.Picard(**fixed),
        "Anderson(m=5)": il.Anderson(**fixed),
        "Anderson(m=20)": il.Anderson(history_size=20, **fixed),
        "Broyden(history_size=10)": il.Broyden(**fixed),
        "Broyden(history_size=40)": il.Broyden(history_size=40, **fixed),
        "GMRES(restart=20)": il.GMRES(restart=20, **fixed),
        "GMRES(restart=50)": il.GMRES(restart=50, **fixed),
    }
    if quick:
        for label in ("Anderson(m=20)", "Broyden(history_size=40)", "GMRES(restart=50)"):
            del solvers[label]
    return solvers


class _Adjoint:
    """The adjoint equation of one cell at one state: a counted VJP and its dense reference.

    Args:
        cell: ``f(z, x)``.
        x: The input, ``(B, 1, N, N)``.
        g: The right-hand sides, ``(B, N * N)``.
        dtype: The dtype the solvers run in (the reference is always float64).
    """

    def __init__(self, cell: nn.Module, x: Tensor, g: Tensor, dtype: torch.dtype) -> None:
        self.g64 = g.to(torch.float64)
        self.g = g.to(dtype)
        self.calls = 0
        cell64 = copy.deepcopy(cell).to(torch.float64)
        cell = copy.deepcopy(cell).to(dtype)
        # The cells are affine, so J is the same everywhere: the VJPs are taken at z = 0.
        self._z = torch.zeros_like(x, dtype=dtype).requires_grad_(True)
        self._fz = cell(self._z, x.to(dtype))
        n = self.g.shape[1]
        # Row i of J is e_i^T J: one batched VJP of n basis vectors gives the dense J.
        z_basis = torch.zeros((n, *x.shape[1:]), dtype=torch.float64, requires_grad=True)
        f_basis = cell64(z_basis, torch.zeros_like(z_basis))
        eye = torch.eye(n, dtype=torch.float64)
        (jac,) = torch.autograd.grad(f_basis, z_basis, eye.view_as(f_basis))
        self.operator = eye - jac.reshape(n, n).T  # I - J^T
        self.rho = float(torch.linalg.eigvals(jac.reshape(n, n)).abs().max())
        self.u_exact = torch.linalg.solve(self.operator, self.g64.T).T

    def vjp(self, v: Tensor) -> Tensor:
        """:math:`J^\\top v` for a ``(B, n)`` batch, counted."""
        self.calls += 1
        (out,) = torch.autograd.grad(self._fz, self._z, v.view_as(self._fz), retain_graph=True)
        return out.flatten(1)

    def vjp_of_g(self, _: object = None) -> Tensor:
        """One batched VJP (the unit of time), as :func:`measure` calls it."""
        return self.vjp(self.g)

    def check(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample true relative residual and relative error of ``u`` (in float64)."""
        u64 = u.detach().to(torch.float64)
        residual = self.g64 - u64 @ self.operator.T
        res = torch.linalg.vector_norm(residual, dim=1) / torch.linalg.vector_norm(self.g64, dim=1)
        err = torch.linalg.vector_norm(u64 - self.u_exact, dim=1) / torch.linalg.vector_norm(
            self.u_exact, dim=1
        )
        return res, err


def _config(ctx: SuiteContext) -> dict[str, Any]:
    return {
        "grid": 8 if ctx.quick else 32,
        "batch": 2 if ctx.quick else 4,
        "dtypes": ["float64", "float32"],
        "repeats": ctx.repeats(5, 1),
        "budget_vjps": BUDGET,
        "target_relative_residual": TARGET,
    }


def run(ctx: SuiteContext) -> SuiteResult:
    """Run the suite (on the CPU: the cells are tiny, and the solvers' own work is the point)."""
    config = _config(ctx)
    suite = SuiteResult(name=NAME, title=TITLE, config=config)
    grid, batch = config["grid"], config["batch"]
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(batch, grid * grid, generator=gen, dtype=torch.float64)
    g = g / torch.linalg.vector_norm(g, dim=1, keepdim=True)
    x = torch.zeros(batch, 1, grid, grid)
    cells = {f"Jacobi-Poisson {grid}x{grid}": StencilCell(jacobi_poisson())}
    for a in ADVECTIONS:
        cells[f"convection-diffusion {grid}x{grid}, a={a}"] = StencilCell(convection_diffusion(a))
    solvers = _solvers(ctx.quick)
    for problem, cell in cells.items():
        for dtype_name in config["dtypes"]:
            dtype = getattr(torch, dtype_name)
            eq = _Adjoint(cell, x, g, dtype)
            unit = measure(eq.vjp_of_g, device=torch.device("cpu"), repeats=20)
            for label, solver in ctx.bar(list(solvers.items()), f"adjoint {problem} {dtype_name}"):
                _run_one(suite, eq, problem, dtype_name, label, solver, unit.median, config)
    _summarise(suite, config)
    return suite


def _run_one(
    suite: SuiteResult,
    eq: _Adjoint,
    problem: str,
    dtype: str,
    label: str,
    solver: il.AbstractSolver | il.linear.AbstractLinearSolver,
    vjp_s: float,
    config: dict[str, Any],
) -> None:
    # No JFB fallback, so a failed sample's error is that of the solver's own best iterate.
    rule = il.ImplicitDifferentiation(solver=solver, fallback_to_jfb=False, on_unconverged="ignore")
    outcome: dict[str, Any] = {}

    def solve(_: Any) -> None:
        eq.calls = 0
        outcome["u"], outcome["result"] = rule.adjoint(eq.vjp, eq.g)
        outcome["calls"] = eq.calls

    timing = measure(solve, device=torch.device("cpu"), repeats=config["repeats"], warmup=1)
    result = outcome["result"]
    res, err = eq.check(outcome["u"])
    converged = result.converged.tolist()
    suite.add(
        kind="adjoint",
        problem=problem,
        n=eq.g.shape[1],
        batch=eq.g.shape[0],
        rho=eq.rho,
        dtype=dtype,
        solver=label,
        solver_repr=repr(solver),
        vjps=outcome["calls"],
        n_steps=result.n_steps.tolist(),
        status=[s.name for s in result.statuses()],
        converged=converged,
        all_converged=all(converged),
        solver_residual=result.residual.tolist(),
        relative_residual_max=float(res.max()),
        relative_error_max=float(err.max()),
        relative_error=err.tolist(),
        vjp_s=vjp_s,
        time_in_vjps=timing.median / vjp_s,
        own_s_per_vjp=(timing.median - outcome["calls"] * vjp_s) / outcome["calls"],
        **timing.as_dict("time"),
    )


def _converged(r: dict[str, Any]) -> str:
    done = sum(r["converged"])
    verdict = "yes" if done == len(r["converged"]) else ("no" if done == 0 else "partly")
    failures = sorted({s for s in r["status"] if s != "SUCCESS"})
    return f"{verdict} ({done}/{len(r['converged'])})" + (
        f", {'/'.join(failures)}" if failures else ""
    )


def _summarise(suite: SuiteResult, config: dict[str, Any]) -> None:
    records = [r for r in suite.records if r["kind"] == "adjoint"]
    header = [
        "solver",
        "dtype",
        "converged",
        "VJPs",
        "per-sample VJPs",
        "time ms",
        "solver's own ms / VJP",
        "max rel. residual",
        "max rel. error to dense",
    ]
    for problem in dict.fromkeys(r["problem"] for r in records):
        recs = [r for r in records if r["problem"] == problem]
        rows = [
            [
                r["solver"],
                r["dtype"],
                _converged(r),
                str(r["vjps"]),
                f"{min(r['n_steps'])}-{max(r['n_steps'])}",
                fmt(r["time_s"] * 1e3),
                fmt(r["own_s_per_vjp"] * 1e3),
                fmt(r["relative_residual_max"], 2),
                fmt(r["relative_error_max"], 2),
            ]
            for r in recs
        ]
        first = recs[0]
        caption = (
            f"{problem} (n = {first['n']:,}, batch {first['batch']}, rho(J) = "
            f"{first['rho']:.4f}): solve (I - J^T) u = g to relative residual {TARGET:g} "
            f"within {BUDGET} VJPs"
        )
        suite.tables.append((caption, header, rows))
    vjp_rows = sorted({(r["problem"], r["dtype"], r["vjp_s"]) for r in records})
    suite.tables.append(
        (
            "One batched VJP (ms)",
            ["problem", "dtype", "ms"],
            [[p, d, fmt(s * 1e3)] for p, d, s in vjp_rows],
        )
    )
    grid = config["grid"]
    suite.notes.append(
        f"Cells on a {grid}x{grid} grid with zero boundary, f(z, x) = K * z + x: the Jacobi "
        "sweep for the Poisson equation (K = neighbour mean, rho(J) = cos(pi / "
        f"{grid + 1}) = {math.cos(math.pi / (grid + 1)):.4f}), and convection-diffusion "
        f"stencils (diffusion d = {DIFFUSION}, central-difference advection a = "
        f"{' or '.join(map(str, ADVECTIONS))} in both directions) whose J has purely "
        "imaginary eigenvalues, so rho(J) > 1 while the eigenvalues of I - J^T are 1 + iy "
        "(rho(J) is measured from the dense J). "
        f"Each solve: ImplicitDifferentiation(solver=..., fallback_to_jfb=False, "
        f"on_unconverged='ignore').adjoint on {config['batch']} unit-norm right-hand sides g "
        f"at once, every solver with max_iter={BUDGET}, atol={TARGET:g}, rtol=0 (for a "
        "fixed-point solver the residual ||J^T u + g - u|| is that of the linear system), "
        "other settings at their defaults (fixed-point solvers stop a sample as DIVERGED "
        "once its residual exceeds 1e4 times its first). 'VJPs' counts the batched VJP "
        "calls of the solve (every sample goes through each call; 501 when the fixed-point "
        "loop evaluates once more to re-measure an earlier best iterate); 'per-sample VJPs' is the "
        "range of SolverResult.n_steps; the solver's own time per VJP is (solve time - VJPs x "
        "one batched VJP's time) / VJPs, what the algorithm costs on top of f (these VJPs are "
        "cheap, a DEQ cell's are dearer). Residual and error are recomputed in float64 against "
        "torch.linalg.solve on the dense I - J^T (J from one batched VJP of the basis) and "
        "are the worst over the batch; a sample that did not converge reports the solver's "
        f"best iterate. Always on the CPU. Times: median of {config['repeats']} repeat(s) "
        "after a warm-up (VJP counts, residuals and errors are deterministic)."
    )
