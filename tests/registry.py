r"""The one registry of solvers, backward rules and loop paths that the contract tests run on.

Modelled on torch's ``optim_db`` (``common_optimizers.py``) and lineax's solver tags x
operators (``tests/helpers.py``): every solver of :data:`implicitlayers.solvers.SOLVERS` and
every rule of :data:`implicitlayers.backward.BACKWARDS` is read from the library and becomes a
row here, with the tags a contract test needs; the contract tests cross the rows with the
problem zoo (``tests/zoo.py``) and with the driver loop's paths. A new solver or rule is one
row (a library one only needs its tags below, a test-only one goes in ``EXTRA_SOLVERS`` /
``EXTRA_RULES``): every contract test then covers it, and ``test_solvers.py`` /
``test_backward.py`` fail for a library solver or rule that has no tags.

Formulas are written for row vectors, as the zoo's affine map ``f(z) = z W^T + x U^T + b``
is: its Jacobian is :math:`J = W`, and :math:`u = J^\top g` for a column :math:`g` is
``g @ J`` for a row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

import implicitlayers as il
from implicitlayers.backward import BACKWARDS, NeumannPhantom, PhantomGradient
from implicitlayers.solvers import SOLVERS, AbstractSolver

#: Tolerances no iterate meets (both 0 is refused), so every row runs every iteration.
NEVER = {"atol": 0.0, "rtol": 1e-300, "on_unconverged": "ignore"}

#: The options of :class:`~implicitlayers.solvers.AbstractSolver`, shared by every solver.
SHARED_OPTIONS = frozenset(f.name for f in dataclasses.fields(AbstractSolver) if f.init)


# --- Solvers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """A value of an option that must change a solve, from ``base`` options, on the map of
    ``test_properties.MAPS`` named ``on``."""

    value: Any
    base: Mapping[str, Any] = field(default_factory=dict)
    on: str = "affine"


@dataclass(frozen=True)
class SolverRow:
    """A solver class and what its contract tests need to know about it.

    Attributes:
        name: The row's id (the library's name for a library solver).
        cls: The solver class; :meth:`make` builds it with the given options.
        speedup: For an accelerated solver, the most evaluations it may need, as a fraction
            of Picard's, on the zoo's slow affine map (contraction 0.95); ``None`` for one
            that converges at the contraction rate, as Picard does.
        can_break_down: Whether its step may flag a breakdown of an internal system
            (``False``: every step returns ``None`` as its breakdown).
        own_options: For each option the solver adds to the shared ones, a :class:`Change`
            of it that must change the solve (every option changes behaviour). An own option
            missing here fails ``test_every_own_option_of_every_solver_changes_behaviour``.
    """

    name: str
    cls: type[AbstractSolver]
    speedup: float | None = None
    can_break_down: bool = True
    own_options: Mapping[str, Change] = field(default_factory=dict)

    @property
    def accelerated(self) -> bool:
        return self.speedup is not None

    @property
    def has_history(self) -> bool:
        return "history_size" in self.own_fields

    @property
    def own_fields(self) -> tuple[str, ...]:
        """The constructor options this solver adds to the shared ones."""
        return tuple(
            f.name for f in dataclasses.fields(self.cls) if f.init and f.name not in SHARED_OPTIONS
        )

    def make(self, **options: Any) -> AbstractSolver:
        return self.cls(**options)

    def __repr__(self) -> str:
        return self.name


#: The tags of the library's solvers, by class (the classes themselves come from SOLVERS).
SOLVER_TAGS: dict[type[AbstractSolver], dict[str, Any]] = {
    il.Picard: {"can_break_down": False, "own_options": {"mixing": Change(0.5)}},
    il.Anderson: {
        "speedup": 0.25,
        "own_options": {
            "history_size": Change(2),
            "mixing": Change(0.5),
            "regularization": Change(1e-2, {"rtol": 1e-10, "atol": 0.0}),
            # On an affine map Anderson's residuals never rise: an expanding tanh map.
            "safeguard": Change(False, {"rtol": 1e-10, "atol": 0.0}, on="expanding tanh"),
        },
    },
    il.Broyden: {
        "speedup": 0.4,
        "own_options": {"history_size": Change(2, {"rtol": 1e-10, "atol": 0.0})},
    },
}

#: Solvers registered only for the tests (a plug-in solver a contract should cover).
EXTRA_SOLVERS: list[SolverRow] = []

SOLVER_ROWS: list[SolverRow] = [
    *(SolverRow(name, cls, **SOLVER_TAGS.get(cls, {})) for name, cls in SOLVERS.items()),
    *EXTRA_SOLVERS,
]

#: For ``pytest.mark.parametrize("solver", ...)``: one param a row, with its name as the id.
SOLVER_PARAMS = [pytest.param(row, id=row.name) for row in SOLVER_ROWS]
ACCELERATED_PARAMS = [p for p in SOLVER_PARAMS if p.values[0].accelerated]
BREAKING_PARAMS = [p for p in SOLVER_PARAMS if p.values[0].can_break_down]
STEADY_PARAMS = [p for p in SOLVER_PARAMS if not p.values[0].can_break_down]


# --- Backward rules -----------------------------------------------------------------------

#: ``formula(rule, J, g)``: the rule's vector :math:`u` for rows ``g`` when ``f`` is affine in
#: ``z`` with Jacobian ``J`` (``f(z) = z J^T + ...``), at an exact fixed point.
Formula = Callable[[Any, Tensor, Tensor], Tensor]


def _neumann(J: Tensor, g: Tensor, terms: int, mixing: float) -> Tensor:
    r""":math:`\lambda \sum_{i=0}^{k} B^i g` with :math:`B = (1 - \lambda) I + \lambda J^\top`,
    for rows (``v B^T = v M``, :math:`M = (1 - \lambda) I + \lambda J`)."""
    M = (1 - mixing) * torch.eye(J.shape[0], dtype=J.dtype) + mixing * J
    term = total = g
    for _ in range(terms):
        term = term @ M
        total = total + term
    return mixing * total


def _exact(rule: Any, J: Tensor, g: Tensor) -> Tensor:
    r""":math:`u = (I - J^\top)^{-1} g`, for rows."""
    eye = torch.eye(J.shape[0], dtype=J.dtype)
    return torch.linalg.solve(eye - J.T, g.T).T


FORMULAS: dict[type, Formula] = {
    il.JFB: lambda rule, J, g: g,
    il.Neumann: lambda rule, J, g: _neumann(J, g, rule.terms, 1.0),
    il.ImplicitDifferentiation: _exact,
    # k damped steps keep the powers B^0 .. B^(k-1) (at an exact fixed point).
    PhantomGradient: lambda rule, J, g: _neumann(J, g, rule.steps - 1, rule.mixing),
    NeumannPhantom: lambda rule, J, g: _neumann(J, g, rule.terms, rule.mixing),
    # SHINE returns the solver's estimate where its adjoint residual is within max_residual,
    # the exact solve elsewhere. On the contract problems the estimate is either exact (the
    # scalar maps: one secant spans them) or poor (the zoo's affine map: the histories span
    # too little, residuals 0.15 to 0.4 against 0.1, so every sample falls back): exact both
    # ways. test_shine.py checks an accepted inexact estimate against its own formula.
    il.SHINE: _exact,
}


@dataclass(frozen=True)
class RuleRow:
    """A configured backward rule and what its contract tests need to know about it.

    Whether the rule is ``exact`` and whether it ``uses_vjp`` are read from the rule itself.

    Attributes:
        name: The row's id.
        rule: The rule, configured.
        tolerance: How far (absolute) its gradients may be from :meth:`u`'s on the zoo's affine
            map solved to 1e-13 (an adjoint solve's own tolerance, or none).
        reports_adjoint: Whether a backward pass records an adjoint solve's result
            (``DEQ.last_backward_result``).
        unrolls: Whether the rule differentiates applications of ``f`` at points it unrolls
            from the fixed point (its formula then holds at an exact fixed point only).
    """

    name: str
    rule: il.AbstractBackward
    tolerance: float = 1e-10
    reports_adjoint: bool = False
    unrolls: bool = False

    def u(self, J: Tensor, g: Tensor) -> Tensor:
        """The rule's own formula for :math:`u` (rows) given the Jacobian ``J`` and ``g``."""
        return FORMULAS[type(self.rule)](self.rule, J, g)

    def __repr__(self) -> str:
        return self.name


#: An adjoint solve to the last digits: the fixed-point adjoints' options.
TIGHT_ADJOINT = {"max_iter": 500, "atol": 1e-14, "rtol": 1e-13}

RULE_TAGS: dict[type, dict[str, Any]] = {
    # The default GMRES adjoint stops at rtol 1e-6.
    il.ImplicitDifferentiation: {"tolerance": 1e-6, "reports_adjoint": True},
    PhantomGradient: {"unrolls": True},
    # The fallback is the default GMRES adjoint, which stops at rtol 1e-6.
    il.SHINE: {"tolerance": 1e-6, "reports_adjoint": True},
}

#: Rules registered only for the tests.
EXTRA_RULES: list[RuleRow] = []

RULE_ROWS: list[RuleRow] = [
    # Each library rule in its default configuration, ...
    *(RuleRow(name, cls(), **RULE_TAGS.get(cls, {})) for name, cls in BACKWARDS.items()),
    # ... the configured variants: the Neumann phantom, exact differentiation with a GMRES
    # adjoint solved tight, and with every registered solver as the adjoint's fixed-point
    # solver (u = J^T u + g).
    RuleRow("neumann-phantom", NeumannPhantom(terms=3, mixing=0.7), tolerance=1e-12),
    RuleRow(
        "implicit-gmres",
        il.ImplicitDifferentiation(solver=il.GMRES(rtol=1e-13, atol=1e-15)),
        tolerance=1e-9,
        reports_adjoint=True,
    ),
    # SHINE refining its estimate to a tight tolerance (the estimate preconditions GMRES),
    # and accepting an estimate only when it is exact to round-off.
    RuleRow(
        "shine-refine",
        il.SHINE(refine=True, solver=il.GMRES(rtol=1e-13, atol=1e-15)),
        tolerance=1e-9,
        reports_adjoint=True,
    ),
    RuleRow(
        "shine-strict",
        il.SHINE(max_residual=1e-12, solver=il.GMRES(rtol=1e-13, atol=1e-15)),
        tolerance=1e-9,
        reports_adjoint=True,
    ),
    *(
        RuleRow(
            f"implicit-{row.name}",
            il.ImplicitDifferentiation(solver=row.make(**TIGHT_ADJOINT)),
            tolerance=1e-9,
            reports_adjoint=True,
        )
        for row in SOLVER_ROWS
    ),
    *EXTRA_RULES,
]

RULE_PARAMS = [pytest.param(row, id=row.name) for row in RULE_ROWS]
EXACT_RULE_PARAMS = [p for p in RULE_PARAMS if p.values[0].rule.exact]


# --- Paths of the driver loop -------------------------------------------------------------


@dataclass(frozen=True)
class Path:
    """One way the driver loop runs the one stopping rule.

    Attributes:
        name: The row's id.
        options: The keywords of ``fixed_point`` (and ``DEQ``) that select it.
        running_rows: ``f`` sees only the rows still running (``independent_samples=True``);
            otherwise all rows, stopped ones frozen. Valid only for an ``f`` that treats the
            samples independently; one evaluation of the whole returned batch at the end
            checks that it does.
    """

    name: str
    options: Mapping[str, Any]
    running_rows: bool = False

    def __repr__(self) -> str:
        return self.name


PATHS = [
    Path("host-reads", {"host_reads": True}),  # the host reads per-row flags every iteration
    Path("sync-free", {"host_reads": False}),  # chunks of check_every iterations, no reads
    Path("running-rows", {"independent_samples": True}, running_rows=True),
]
PATH_PARAMS = [pytest.param(path, id=path.name) for path in PATHS]
#: The paths that evaluate every row (valid for an f that couples the samples).
ALL_ROW_PARAMS = [p for p in PATH_PARAMS if not p.values[0].running_rows]
