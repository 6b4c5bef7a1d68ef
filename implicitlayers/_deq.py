"""``DEQ``: an ``nn.Module`` whose output is the fixed point of ``f``."""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _tree
from ._errors import ConvergenceError
from ._fixed_point import check_structure, fixed_point
from ._result import SolverResult, Status
from .backward import AbstractBackward
from .backward._names import as_backward
from .nn import one_map
from .solvers import AbstractSolver
from .solvers._names import as_solver

__all__ = ["DEQ", "DEQOutput"]

logger = logging.getLogger(__name__)


class DEQOutput(NamedTuple):
    """What :class:`DEQ` returns: the fixed point and the forward solve's result."""

    z: Any
    result: SolverResult


class DEQ(nn.Module):
    r"""A deep equilibrium layer: its output is the fixed point :math:`z^\star = f(z^\star, x)`.

    The forward pass solves for :math:`z^\star` without recording autograd history, so training
    memory does not grow with the number of iterations. Whenever autograd is recording
    (whatever ``module.training`` says), the backward rule attaches :math:`z^\star` to the
    graph through one application of ``f``:

    .. math::

        \frac{\partial L}{\partial \theta} = u^\top
            \frac{\partial f(z^\star, x; \theta)}{\partial \theta}, \qquad
        u \approx (I - J^\top)^{-1} \frac{\partial L}{\partial z^\star},

    with :math:`u` chosen by the rule (:class:`JFB`, :class:`Neumann`,
    :class:`ImplicitDifferentiation`).

    Args:
        f: An ``nn.Module`` (registered as a submodule, so its parameters train) or any
            callable ``f(z, *inputs)`` returning a state shaped like ``z``.
        solver: Forward solver object or name (``"picard"``, ``"anderson"``, ``"broyden"``).
        backward: Backward rule object or name (``"jfb"``, ``"neumann"``, ``"implicit"``).
        independent_samples: Evaluate ``f`` only on samples still running; see
            :func:`fixed_point`. Valid only when ``f`` treats samples independently.

    Attributes:
        last_backward_result: The adjoint solve's :class:`SolverResult` from the latest
            backward pass (for :class:`ImplicitDifferentiation`), else ``None``.

    Example:
        >>> import torch, implicitlayers as il
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(8, 8)
        ...     def forward(self, z, x):
        ...         return torch.tanh(0.5 * self.lin(z) + x)
        >>> deq = il.DEQ(Cell(), solver=il.Anderson(max_iter=50, rtol=1e-5), backward=il.JFB())
        >>> z, result = deq(torch.randn(4, 8))
        >>> z.shape, bool(result.converged.all())
        (torch.Size([4, 8]), True)
        >>> z.sum().backward()  # gradients reach Cell's parameters
    """

    last_backward_result: SolverResult | None

    def __init__(
        self,
        f: Callable[..., Any],
        *,
        solver: AbstractSolver | str = "anderson",
        backward: AbstractBackward | str = "jfb",
        independent_samples: bool = False,
    ) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be an nn.Module or callable f(z, *inputs), got {f!r}")
        if not isinstance(independent_samples, bool):
            raise TypeError(f"independent_samples must be a bool, got {independent_samples!r}")
        self.f = f
        self.solver = as_solver(solver)
        self.backward = as_backward(backward)
        self.independent_samples = independent_samples
        self.last_backward_result = None

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.backward!r}"

    def forward(
        self, *inputs: Any, z0: Any = None, solver: AbstractSolver | str | None = None
    ) -> DEQOutput:
        """Solve for the fixed point.

        Args:
            *inputs: Passed to ``f(z, *inputs)``.
            z0: Initial state; defaults to ``torch.zeros_like(inputs[0])``.
            solver: Overrides the module's solver for this call (e.g. a larger test-time
                ``max_iter``).

        Returns:
            ``DEQOutput(z, result)``.
        """
        default_z0 = z0 is None
        if z0 is None:
            if not inputs or not isinstance(inputs[0], Tensor):
                raise TypeError(
                    "DEQ needs z0 when its first input is not a tensor: call deq(*inputs, z0=...)"
                )
            z0 = torch.zeros_like(inputs[0])
        else:
            _check_batch(z0, inputs)
        solver_ = self.solver if solver is None else as_solver(solver)
        # One forward, one map: parametrized weights computed once, dropout masks drawn once.
        frozen = one_map(self.f) if isinstance(self.f, nn.Module) else contextlib.nullcontext()
        with frozen:
            return self._solve_and_attach(inputs, z0, default_z0, solver_)

    def _solve_and_attach(
        self, inputs: tuple[Any, ...], z0: Any, default_z0: bool, solver_: AbstractSolver
    ) -> DEQOutput:
        try:
            result = fixed_point(
                self.f, z0, *inputs, solver=solver_, independent_samples=self.independent_samples
            )
        except RuntimeError as err:
            if default_z0 and _looks_like_shape_error(err):
                _add_note(
                    err,
                    f"implicitlayers: f was called with the default z0 = zeros_like(inputs[0]) "
                    f"of shape {tuple(z0.shape)}. If the state's shape differs from the first "
                    "input's, pass z0 with the state's shape: deq(*inputs, z0=...).",
                )
            raise
        if not (torch.is_grad_enabled() and self._needs_grad(inputs)):
            return DEQOutput(result.z, result)
        spec = _tree.spec_of(z0)
        z_star = _tree.flatten(result.z)
        failed = (result.status == int(Status.NONFINITE)) | (result.status == int(Status.DIVERGED))
        # One host read per differentiable forward: are there samples to keep out of the graph?
        any_failed = bool(failed.any())
        attach_inputs = _without_nonfinite(inputs, failed) if any_failed else inputs

        def f_flat(z: Tensor) -> Tensor:
            out = self.f(_tree.unflatten(z, spec), *attach_inputs)
            check_structure(out, spec)
            return _tree.flatten(out)

        self_ref = weakref.ref(self)

        def record(rule: AbstractBackward, backward_result: SolverResult | None) -> None:
            module = self_ref()
            if module is not None:
                module.last_backward_result = backward_result

        leaves = [x for x in attach_inputs if isinstance(x, Tensor) and x.requires_grad]
        if isinstance(self.f, nn.Module):
            leaves += [p for p in self.f.parameters() if p.requires_grad]
        z_in = (
            torch.where(failed[:, None] & ~torch.isfinite(z_star), 0.0, z_star)
            if any_failed
            else z_star
        )
        z_flat = self.backward.attach(f_flat, z_in, record, leaves=leaves)
        if any_failed:
            # Failed samples return their best iterate with no gradient; inside the attach
            # their non-finite entries are zeros, so they cannot reach other gradients.
            z_flat = torch.where(failed[:, None], z_star.detach().to(z_flat.dtype), z_flat)
        return DEQOutput(_tree.unflatten(z_flat, spec), result)

    def _needs_grad(self, inputs: tuple[Any, ...]) -> bool:
        if any(isinstance(x, Tensor) and x.requires_grad for x in inputs):
            return True
        if isinstance(self.f, nn.Module):
            return any(p.requires_grad for p in self.f.parameters())
        return True  # a plain callable may close over parameters we cannot see


def _check_batch(z0: Any, inputs: tuple[Any, ...]) -> None:
    """``z0``'s batch must match the first input's leading dimension when that is a tensor."""
    if not inputs or not isinstance(inputs[0], Tensor) or inputs[0].dim() == 0:
        return
    try:
        batch = _tree.batch_size(_tree.leaves(z0))
    except (TypeError, ValueError):
        return  # fixed_point reports a malformed z0 with its own message
    if batch != inputs[0].shape[0]:
        raise ValueError(
            f"z0 has batch size {batch} but the first input has {inputs[0].shape[0]} "
            f"(shape {tuple(inputs[0].shape)}); pass z0 with one row per sample, e.g. "
            f"z0=torch.zeros({inputs[0].shape[0]}, ...)"
        )


_SHAPE_WORDS = ("shape", "size", "dimension")


def _looks_like_shape_error(err: RuntimeError) -> bool:
    """Whether ``err`` reads as a shape mismatch (torch words these as below)."""
    if isinstance(err, (ConvergenceError, torch.cuda.OutOfMemoryError)):
        return False
    message = str(err).lower()
    return any(word in message for word in _SHAPE_WORDS)


def _add_note(err: BaseException, note: str) -> None:
    """Attach a hint to ``err`` without changing its type (PEP 678 where available)."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:  # pragma: no cover - Python 3.10: no notes; keep the type and the message
        logger.info(note)


def _without_nonfinite(inputs: tuple[Any, ...], failed: Tensor) -> tuple[Any, ...]:
    """``inputs`` with the non-finite entries of the ``failed`` samples' rows set to 0.

    Only tensors batched like the state (leading dimension ``B``) are touched; the failed rows'
    finite entries stay, so a map that couples samples sees the batch it was solved on.
    """
    batch = failed.shape[0]

    def clean(x: Any) -> Any:
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != batch:
            return x
        if not x.is_floating_point() and not x.is_complex():
            return x
        rows = failed.view(batch, *([1] * (x.dim() - 1)))
        return torch.where(rows & ~torch.isfinite(x), 0.0, x)

    return tuple(clean(x) for x in inputs)
