r"""``MonotoneDEQ``: a monotone equilibrium cell solved by operator splitting, with its
certificate.

The splitting operator is built here from the cell's parts (:math:`I - W`, its resolvent, the
proximal nonlinearity) and the solver's step; the splitting solvers of
:mod:`implicitlayers.nn` iterate it in the library's driver loop (see
``implicitlayers/nn/_splitting.py`` for why the operator lives with the layer).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ._deq import DEQ
from ._errors import ConvergenceWarning
from ._result import SolverResult
from ._warn import warn_at_caller
from .backward import AbstractBackward, ImplicitDifferentiation
from .nn import MonotoneCell, MonotoneCertificate, PeacemanRachford, one_map
from .nn._certificate import Splitting
from .nn._monotone import Operator, splitting_of
from .nn._splitting import splitting_active
from .solvers import AbstractSolver, Picard

__all__ = ["CertifiedOutput", "MonotoneDEQ"]


def default_backward() -> ImplicitDifferentiation:
    """Exact gradients with a Picard adjoint: certified for monotone cells (below)."""
    return ImplicitDifferentiation(solver=Picard(max_iter=500, rtol=1e-6, atol=1e-10))


class _SplittingMap:
    """The splitting operator of one forward, ``T(v, c)``, with ``c = Ux + b``.

    The cell's operator (:math:`I - W` for forward-backward, the resolvent for
    Peaceman-Rachford) is built once per forward, under the caller's autograd mode: the solve
    applies it without recording, the attach (and any later call of a backward rule) with the
    graph back to the weights.
    """

    def __init__(self, cell: MonotoneCell) -> None:
        self.cell = cell
        self.splitting: Splitting = "peaceman-rachford"
        self.alpha = 1.0
        self.op: Operator | None = None

    def configure(self, splitting: Splitting, alpha: float, shape: tuple[int, ...]) -> None:
        self.splitting, self.alpha = splitting, alpha
        if splitting == "forward-backward":
            self.op = self.cell.operator(shape)
        else:
            self.op = self.cell.resolvent(alpha, shape)

    def __getstate__(self) -> dict[str, Any]:
        # The operator is a closure (not picklable) and is rebuilt at every forward.
        return {**self.__dict__, "op": None}

    def __call__(self, v: Tensor, c: Tensor) -> Tensor:
        cell, a, op = self.cell, self.alpha, self.op
        if op is None:
            raise RuntimeError("the splitting map is built by MonotoneDEQ.forward; call that")
        if self.splitting == "forward-backward":
            return cell.prox(v - a * (op(v) - c), a)
        z = cell.prox(v, a)
        reflected = 2 * z - v
        return 2 * op(reflected + a * c) - reflected


class CertifiedOutput(tuple[Tensor, SolverResult]):
    r"""What :class:`MonotoneDEQ` returns: unpacks as ``z, result``, with the certificate.

    Attributes:
        certificate: The :class:`~implicitlayers.nn.MonotoneCertificate` of the weights at
            this forward, or ``None`` for ``MonotoneDEQ(..., certify=False)``.
        error_bound: ``(B,)`` certified bounds on :math:`\|z - z^\star\|` per sample, in the
            solver's norm (``certificate.error_bound(result.residual)``); ``None`` without a
            certificate. Finite for every sample the iteration reached, converged or not.
    """

    certificate: MonotoneCertificate | None
    error_bound: Tensor | None

    def __new__(
        cls,
        z: Tensor,
        result: SolverResult,
        *,
        certificate: MonotoneCertificate | None = None,
        error_bound: Tensor | None = None,
    ) -> CertifiedOutput:
        out = super().__new__(cls, (z, result))
        out.certificate = certificate
        out.error_bound = error_bound
        return out

    def __getnewargs_ex__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        extra = {"certificate": self.certificate, "error_bound": self.error_bound}
        return (self[0], self[1]), extra

    @property
    def z(self) -> Tensor:
        """The equilibrium, attached to the graph by the backward rule."""
        return self[0]

    @property
    def result(self) -> SolverResult:
        """The splitting iteration's :class:`~implicitlayers.SolverResult`."""
        return self[1]

    def __repr__(self) -> str:
        return f"CertifiedOutput(z={self[0]!r}, result={self[1]!r})"


class MonotoneDEQ(nn.Module):
    r"""A monotone equilibrium layer: solves a :class:`~implicitlayers.nn.MonotoneCell` by
    operator splitting and returns its equilibrium with a certificate.

    .. math::

        z^\star = \sigma(W z^\star + U x + b),

    unique for every input because :math:`I - W` is strongly monotone. The solver is a
    splitting method (:class:`~implicitlayers.nn.PeacemanRachford`, the default, or
    :class:`~implicitlayers.nn.ForwardBackward`) run by the library's driver loop on the
    splitting operator built here, and differentiated by any backward rule through that
    operator: its fixed point defines the same :math:`z^\star(x, \theta)`, so
    :class:`~implicitlayers.ImplicitDifferentiation` gives the exact gradient. The operator's
    Jacobian :math:`J` at the fixed point has :math:`\|J\|_2 \le \gamma` (the certificate's
    rate: a 0/1 diagonal, or the reflection :math:`2D - I`, times the linear part whose norm
    :math:`\gamma` is), so the adjoint iteration :math:`u \leftarrow J^\top u + g` contracts
    at the same certified rate, and the default backward rule is exact implicit
    differentiation with a Picard adjoint,
    ``ImplicitDifferentiation(solver=Picard(max_iter=500, rtol=1e-6, atol=1e-10))``: a
    training step 2.4 to 3.5 times faster than with the GMRES default of
    :class:`~implicitlayers.ImplicitDifferentiation`, to the same tolerance
    (``benchmarks/certified_cost.py``, widths 64 and 256).

    Each forward computes the :class:`~implicitlayers.nn.MonotoneCertificate` of the current
    weights (exact eigen- and singular values of :math:`I - W`'s blocks: :math:`O(n^3)` for a
    dense width :math:`n`; ``certify=False`` skips it except for what ``alpha=None`` needs,
    :math:`\|I - W\|_2`).

    Args:
        cell: The monotone cell (:class:`~implicitlayers.nn.MonotoneLinear`,
            :class:`~implicitlayers.nn.MonotoneConv2d`, :class:`~implicitlayers.nn.LBEN`).
        solver: A splitting solver object (default ``PeacemanRachford()``).
        backward: A backward rule (object or name), as for :class:`~implicitlayers.DEQ`
            (default: exact, with the certified Picard adjoint above).
        independent_samples: Evaluate the splitting operator only on samples still running
            (valid: the cells treat samples independently).
        certify: Compute the certificate at every forward.

    Example:
        >>> import torch, implicitlayers as il
        >>> deq = il.MonotoneDEQ(il.nn.MonotoneLinear(4, 16, margin=0.5))
        >>> x = torch.randn(8, 4)
        >>> z, result = out = deq(x)
        >>> bool(result.converged.all()), out.certificate.rate < 1
        (True, True)
        >>> bool((out.error_bound <= 1e-2).all())  # ||z - z*|| per sample, certified
        True
    """

    def __init__(
        self,
        cell: MonotoneCell,
        *,
        solver: AbstractSolver | None = None,
        backward: AbstractBackward | str | None = None,
        independent_samples: bool = False,
        certify: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(cell, MonotoneCell):
            raise TypeError(
                f"cell must be a MonotoneCell (il.nn.MonotoneLinear, MonotoneConv2d, LBEN), "
                f"got {type(cell).__name__}; for a general f use il.DEQ(f)"
            )
        if not isinstance(certify, bool):
            raise TypeError(f"certify must be a bool, got {certify!r}")
        solver = PeacemanRachford() if solver is None else solver
        splitting_of(solver)
        self.cell = cell
        self.solver = solver
        self.certify = certify
        self._map = _SplittingMap(cell)
        self._deq = DEQ(
            self._map,
            solver=solver,
            backward=default_backward() if backward is None else backward,
            independent_samples=independent_samples,
        )

    @property
    def backward(self) -> AbstractBackward:
        """The backward rule."""
        return self._deq.backward

    @property
    def last_backward_result(self) -> SolverResult | None:
        """The adjoint solve's result from the latest backward pass (as
        ``DEQ.last_backward_result``)."""
        return self._deq.last_backward_result

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.backward!r}"

    def forward(
        self, x: Tensor, *, z0: Tensor | None = None, solver: AbstractSolver | None = None
    ) -> CertifiedOutput:
        r"""Solve for the equilibrium of ``x``.

        Args:
            x: ``(B, ...)`` input batch.
            z0: Initial state of the iteration (:math:`z` for forward-backward, :math:`u`
                for Peaceman-Rachford), ``(B, *cell.state_shape(x))``; zeros by default. To
                warm-start from an earlier solve, pass its ``result.z`` (the iterated
                variable: :math:`u^\star` for Peaceman-Rachford, not the returned
                :math:`z^\star = \sigma(u^\star)`).
            solver: Overrides the splitting solver for this call.

        Returns:
            :class:`CertifiedOutput`, which unpacks as ``z, result``.
        """
        solver_ = self.solver if solver is None else solver
        splitting = splitting_of(solver_)
        shape = self.cell.state_shape(x)
        if z0 is None:
            z0 = x.new_zeros((x.shape[0], *shape))
        with one_map(self.cell):
            certificate, alpha = self._certificate(shape, solver_)
            self._map.configure(splitting, alpha, shape)
            c = self.cell.inject(x)
            with splitting_active():
                v, result = self._deq(c, z0=z0, solver=solver_)
            z = self.cell.prox(v, alpha) if splitting == "peaceman-rachford" else v
        bound = None if certificate is None else certificate.error_bound(result.residual)
        return CertifiedOutput(z, result, certificate=certificate, error_bound=bound)

    def _certificate(
        self, shape: tuple[int, ...], solver: AbstractSolver
    ) -> tuple[MonotoneCertificate | None, float]:
        alpha = getattr(solver, "alpha", None)
        if self.certify:
            certificate = self.cell.certificate(shape, solver)
            if not certificate.certified:
                warn_at_caller(
                    f"{type(solver).__name__}(alpha={certificate.alpha:.4g}) is not a certified "
                    f"contraction for these weights (rate {certificate.rate:.4g} >= 1; "
                    f"certified below alpha = 2 mu / L^2 = "
                    f"{2 * certificate.monotonicity / certificate.lipschitz**2:.4g}); pass "
                    "alpha=None for the certified step",
                    ConvergenceWarning,
                )
            return certificate, certificate.alpha
        if alpha is not None:
            return None, float(alpha)
        return None, self.cell.certified_alpha(shape, solver)
