"""``DEQ``: an ``nn.Module`` whose output is the fixed point of ``f``."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _tree
from ._errors import ConvergenceError
from ._fixed_point import check_structure, fixed_point
from ._lookup import as_backward, as_solver
from ._result import SolverResult
from .backward import AbstractBackward
from .solvers import AbstractSolver

__all__ = ["DEQ", "DEQOutput"]


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
        solver_ = self.solver if solver is None else as_solver(solver)
        try:
            result = fixed_point(
                self.f, z0, *inputs, solver=solver_, independent_samples=self.independent_samples
            )
        except RuntimeError as err:
            if not default_z0 or isinstance(err, ConvergenceError):
                raise
            raise ValueError(
                f"f failed on the default z0 = zeros_like(inputs[0]) of shape "
                f"{tuple(z0.shape)}: {err}. If the state's shape differs from the first "
                "input's, pass z0 with the state's shape: deq(*inputs, z0=...)."
            ) from err
        if not (torch.is_grad_enabled() and self._needs_grad(inputs)):
            return DEQOutput(result.z, result)
        spec = _tree.spec_of(z0)

        def f_flat(z: Tensor) -> Tensor:
            out = self.f(_tree.unflatten(z, spec), *inputs)
            check_structure(out, spec)
            return _tree.flatten(out)

        self_ref = weakref.ref(self)

        def record(backward_result: SolverResult | None) -> None:
            module = self_ref()
            if module is not None:
                module.last_backward_result = backward_result

        z_flat = self.backward.attach(f_flat, _tree.flatten(result.z), record)
        return DEQOutput(_tree.unflatten(z_flat, spec), result)

    def _needs_grad(self, inputs: tuple[Any, ...]) -> bool:
        if any(isinstance(x, Tensor) and x.requires_grad for x in inputs):
            return True
        if isinstance(self.f, nn.Module):
            return any(p.requires_grad for p in self.f.parameters())
        return True  # a plain callable may close over parameters we cannot see
