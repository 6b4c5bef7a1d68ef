"""The interface every fixed-point solver implements."""

from __future__ import annotations

import abc
import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from .._repr import compact_repr
from .._validate import Policy, check_budget, check_choice, check_float, check_int

if TYPE_CHECKING:
    from ._estimate import InverseEstimate

__all__ = ["AbstractSolver", "SolverState"]

#: A solver's memory between steps: tensors whose leading dimension is the batch, so the
#: driver loop can select, freeze and restore samples without knowing the algorithm.
SolverState = dict[str, Tensor]

_POLICIES = ("ignore", "warn", "raise")

#: How a residual is measured: over all features (``"l2"``) or per feature (``"rms"``).
Norm = Literal["l2", "rms"]
_NORMS = ("l2", "rms")


@dataclass(frozen=True, kw_only=True, repr=False)
class AbstractSolver(abc.ABC):
    r"""Base class of the fixed-point solvers.

    A solver only proposes the next iterate; the shared driver loop
    (:func:`~implicitlayers.fixed_point`) evaluates ``f``, measures residuals, freezes samples
    that have converged, keeps the best iterate, records traces and applies the policies. A
    sample has converged when

    .. math::

        \|f(z) - z\| \le \mathrm{atol} + \mathrm{rtol}\, \|f(z)\|,

    with the solver's ``norm`` over all non-batch dimensions: with ``norm="l2"`` (default) the
    Euclidean norm :math:`\|v\|_2`, with ``norm="rms"`` the root mean square
    :math:`\|v\|_2 / \sqrt{n}` over the :math:`n` features of a sample (all its non-batch
    entries, every tensor of the state together). Both sides are measured in the same norm,
    so ``rtol`` means the same under either; ``atol`` is an absolute level in the chosen norm.
    With ``"rms"`` it is a per-entry level that does not grow with the size of the state (an
    image's pixels, a sequence's tokens): multiplying both sides by :math:`\sqrt{n}`, the test
    is

    .. math::

        \|f(z) - z\|_2 \le \mathrm{atol} \sqrt{n} + \mathrm{rtol}\, \|f(z)\|_2,

    which is how it is evaluated, so ``norm="rms", atol=a`` stops exactly where
    ``norm="l2", atol=a * math.sqrt(n)`` does. Everything the result reports in the units
    of the residual is in the solver's norm: ``SolverResult.residual``, ``trace`` and
    ``error_estimate`` (then an estimate of the RMS error); ``rate`` is a ratio of two norms
    and the same under both.

    To write your own solver, subclass this (as a frozen keyword-only dataclass if it has
    hyperparameters) and implement :meth:`init` and :meth:`step` on flat ``(B, n)`` iterates.
    The options below are validated at construction for every subclass, also one whose
    ``__post_init__`` does not call ``super().__post_init__()``; the driver loop checks the
    state :meth:`init` returns (with ``independent_samples=True``) and what the first
    :meth:`step` of each solve returns, once per solve and on shapes only.

    Args:
        max_iter: Most evaluations of ``f`` per sample.
        atol: Absolute tolerance on the residual norm.
        rtol: Tolerance relative to :math:`\|f(z)\|`.
        norm: How residuals are measured (above): ``"l2"`` (the Euclidean norm over all
            features of a sample) or ``"rms"`` (that norm divided by :math:`\sqrt{n}`, so
            ``atol`` is a per-feature level, independent of the state's size).
        on_unconverged: What to do when samples end without converging (status
            ``MAX_ITER``, ``DIVERGED`` or ``BREAKDOWN``): ``"ignore"`` (only recorded in the
            result), ``"warn"`` (:class:`~implicitlayers.ConvergenceWarning`) or ``"raise"``
            (:class:`~implicitlayers.ConvergenceError`). The same word as
            :class:`~implicitlayers.ImplicitDifferentiation`'s policy for its adjoint.
        on_nonfinite: The same choice for samples where ``f`` returned NaN or Inf.
        divergence_ratio: A sample is stopped as ``DIVERGED`` once its residual exceeds this
            multiple of its first residual; ``None`` disables the check.
        check_every: Check whether every sample has stopped (a host synchronisation on CUDA)
            only every this many iterations. Per-sample freezing stays exact; at most
            ``check_every - 1`` evaluations are spent after the last sample converged.
        trace: Record every iteration's residuals in ``SolverResult.trace``.
    """

    max_iter: int = 50
    atol: float = 1e-6
    rtol: float = 1e-4
    norm: Norm = "l2"
    on_unconverged: Policy = "ignore"
    on_nonfinite: Policy = "raise"
    divergence_ratio: float | None = 1e4
    check_every: int = 1
    trace: bool = False

    #: The entries of the state that :meth:`inverse_estimate` reads; empty for a solver that
    #: gives no estimate. A solve whose backward rule asks for the estimate keeps a copy of
    #: these entries for each sample as it stops (before a frozen sample's memory is
    #: overwritten by the steps the other samples still take).
    estimate_keys: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        _check_shared_options(self)

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        _check_step_signature(cls)
        _validate_after(cls, "__post_init__")  # one that forgets super().__post_init__()
        _validate_after(cls, "__init__")  # a hand-written one (not a dataclass)

    def __repr__(self) -> str:
        return compact_repr(self)

    @abc.abstractmethod
    def init(self, z: Tensor) -> SolverState:
        """Create the solver's memory for the flat initial iterate ``z`` of shape ``(B, n)``.

        Every tensor in the returned dict must have the batch as its leading dimension.
        """

    @abc.abstractmethod
    def step(
        self, state: SolverState, z: Tensor, fz: Tensor, iteration: int
    ) -> tuple[Tensor, SolverState, Tensor | None]:
        """Propose the next iterate.

        The driver loop calls this once per iteration, so on a small ``f`` every tensor
        operation here is a visible share of the solve (and a kernel launch on a GPU): keep
        them few, and read nothing on the host (no ``.item()``, ``bool(tensor)``,
        ``.tolist()``), so that a chunk of ``check_every`` iterations runs without a
        synchronisation and can be compiled as one graph.

        Args:
            state: The memory returned by :meth:`init` or the previous :meth:`step`.
            z: ``(B, n)`` current iterate.
            fz: ``(B, n)`` value of ``f(z)``.
            iteration: Calls of :meth:`step` before this one in this solve (``0`` for the
                first), the same for every row: every row of ``state`` has been through
                exactly that many (frozen samples are stepped too, and their result
                discarded; a solver's own per-sample count can be lower after a restart). A
                solver whose memory fills at most one slot per step can use it to skip the
                unfilled slots, or to write every row's new pair to one slot, without reading
                its state on the host (a synchronisation on CUDA). Most solvers ignore it.

        Returns:
            ``(z_next, state, breakdown)``: the next iterate, the updated memory, and a
            ``(B,)`` bool tensor marking samples whose internal system broke down this step
            (their memory should already be restarted), or ``None`` for a solver that has no
            internal system to break down.
        """

    def inverse_estimate(self, state: SolverState) -> InverseEstimate | None:
        r"""The solver's estimate of :math:`(I - J)^{-1}` from its memory at a sample's last
        iterate, for :class:`~implicitlayers.SHINE`; ``None`` (the default) for a solver whose
        memory holds none.

        Args:
            state: The entries :attr:`estimate_keys` of the solver's state, each sample's as it
                stopped. Called once per forward pass, outside the iterations.
        """
        return None


def _check_shared_options(solver: AbstractSolver) -> None:
    """The checks of the options every solver shares (see :class:`AbstractSolver`)."""
    check_budget(solver.max_iter, solver.atol, solver.rtol)
    check_choice("norm", solver.norm, _NORMS)
    check_choice("on_unconverged", solver.on_unconverged, _POLICIES)
    check_choice("on_nonfinite", solver.on_nonfinite, _POLICIES)
    if solver.divergence_ratio is not None:
        check_float("divergence_ratio", solver.divergence_ratio, low=1.0, low_open=True)
    check_int("check_every", solver.check_every, minimum=1)
    if not isinstance(solver.trace, bool):
        raise TypeError(f"trace must be a bool, got {solver.trace!r}")


def _validate_after(cls: type, name: str) -> None:
    """Make ``cls``'s own ``name`` method (if it defines one) check the shared options before
    it returns, so that a subclass is validated however it is written: a ``__post_init__``
    that forgets ``super().__post_init__()``, or an ``__init__`` of a class that is not a
    dataclass. (``__init_subclass__`` runs before ``@dataclass`` adds its ``__init__``, which
    calls ``__post_init__``; the checks are cheap and may run twice.)"""
    method = vars(cls).get(name)
    if not inspect.isfunction(method):
        return

    @functools.wraps(method)
    def validated(self: AbstractSolver, *args: Any, **kwargs: Any) -> None:
        method(self, *args, **kwargs)
        _check_shared_options(self)

    setattr(cls, name, validated)


def _check_step_signature(cls: type) -> None:
    """Refuse, when the class is defined, a ``step`` the driver loop cannot call as
    ``step(state, z, fz, iteration)`` (it would otherwise fail with a bare argument-count
    error in the middle of a solve)."""
    step = vars(cls).get("step")
    if not inspect.isfunction(step):
        return
    parameters = inspect.signature(step).parameters
    named = parameters.get("iteration")
    if named is not None and named.kind is inspect.Parameter.KEYWORD_ONLY:
        raise TypeError(
            f"{cls.__name__}.step takes iteration as a keyword-only parameter; the driver loop "
            "passes it positionally, so iteration must be a positional parameter: "
            "def step(self, state, z, fz, iteration)"
        )
    kinds = [p.kind for p in parameters.values()]
    positional = sum(
        kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for kind in kinds
    )
    if positional < 5 and inspect.Parameter.VAR_POSITIONAL not in kinds:
        raise TypeError(
            f"{cls.__name__}.step takes {positional - 1} arguments after self; the driver loop "
            "calls it with four: def step(self, state, z, fz, iteration) (ignore iteration if "
            "you do not need it)"
        )


#: Up to this many features per sample, a batched product with the history is faster on the
#: CPU as ``vecdot`` or a broadcast product and a sum (the batched matrix product has a slow
#: path there); above, the matrix product wins (2-3x at 10^4 features) and allocates no
#: temporary.
_SMALL = 64


def history_buffer(z: Tensor, slots: int) -> Tensor:
    """A zeroed ``(B, slots, n)`` buffer for a solver's history, built from ``z`` so that under
    ``torch.func.vmap`` it is batched like the values the solver writes into it in place."""
    return torch.zeros_like(z)[:, None].repeat(1, slots, 1)


def dots(W: Tensor, x: Tensor) -> Tensor:
    """``(B, k)`` products :math:`w_i^\\top x` of the ``k`` rows of each ``W[b]`` with ``x[b]``."""
    if W.shape[2] <= _SMALL:
        out: Tensor = torch.linalg.vecdot(W, x[:, None, :])
        return out
    # As a row vector times W^T: several times faster on CPU than W times a column vector.
    out = torch.bmm(x[:, None, :], W.transpose(1, 2)).squeeze(1)
    return out


def combine(coeff: Tensor, W: Tensor) -> Tensor:
    """``(B, n)`` combinations :math:`\\sum_i c_i w_i` of the rows of each ``W[b]``."""
    if W.shape[2] <= _SMALL:
        return (coeff[:, :, None] * W).sum(dim=1)
    out: Tensor = torch.bmm(coeff[:, None, :], W).squeeze(1)
    return out
