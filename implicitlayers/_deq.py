"""``DEQ``: an ``nn.Module`` whose output is the fixed point of ``f``."""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _tree
from ._errors import ConvergenceError
from ._fixed_point import _check_states, solve, split_aux
from ._result import SolverResult, Status
from .backward import AbstractBackward
from .backward._names import as_backward
from .diagnostics import SpectralRadius
from .diagnostics import jacobian_penalty as _jacobian_penalty
from .diagnostics import spectral_radius as _spectral_radius
from .nn import one_map
from .solvers import AbstractSolver
from .solvers._names import as_solver

__all__ = ["DEQ", "DEQOutput"]

logger = logging.getLogger(__name__)


class DEQOutput(tuple[Any, SolverResult]):
    r"""What :class:`DEQ` returns: unpacks as ``z, result``; the optional outputs are attributes.

    Attributes:
        aux: With ``DEQ(f, has_aux=True)``: the auxiliary output of the application of ``f``
            at the fixed point (attached to the graph when autograd records), else ``None``.
        jacobian_penalty: With ``deq(x, jacobian_penalty=k)``: the ``(B,)`` Hutchinson
            estimate of :math:`\|\partial f(z^\star) / \partial z\|_F^2` from ``k`` probes
            (divided by the state size :math:`n` with ``normalize_penalty=True``),
            differentiable in the parameters and inputs (add its mean to the loss), else
            ``None``.
        spectral_radius: With ``deq(x, spectral_radius=True)``: the
            :class:`~implicitlayers.diagnostics.SpectralRadius` of that Jacobian, else ``None``.
        states: With ``deq(x, states=(k1, k2, ...))``: the solver's iterates :math:`z_k`, each
            attached to the graph by the backward rule at its own point (fixed-point
            correction, Bai et al. 2022), else ``()``.
    """

    aux: Any
    states: tuple[Any, ...]
    jacobian_penalty: Tensor | None
    spectral_radius: SpectralRadius | None

    def __new__(
        cls,
        z: Any,
        result: SolverResult,
        *,
        aux: Any = None,
        jacobian_penalty: Tensor | None = None,
        spectral_radius: SpectralRadius | None = None,
        states: tuple[Any, ...] = (),
    ) -> DEQOutput:
        out = super().__new__(cls, (z, result))
        out.aux = aux
        out.states = states
        out.jacobian_penalty = jacobian_penalty
        out.spectral_radius = spectral_radius
        return out

    def __getnewargs_ex__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        extra = {
            "aux": self.aux,
            "jacobian_penalty": self.jacobian_penalty,
            "spectral_radius": self.spectral_radius,
            "states": self.states,
        }
        return (self[0], self[1]), extra

    @property
    def z(self) -> Any:
        """The fixed point, attached to the graph by the backward rule."""
        return self[0]

    @property
    def result(self) -> SolverResult:
        """The forward solve's :class:`~implicitlayers.SolverResult`."""
        return self[1]

    def __repr__(self) -> str:
        return f"DEQOutput(z={self[0]!r}, result={self[1]!r})"


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
        has_aux: ``f`` returns ``(z_next, aux)``; the solve uses ``z_next`` and the output's
            ``aux`` is that of the application of ``f`` at the fixed point (attached to the
            graph when autograd records: use it in a loss or a log), as optimistix's
            ``has_aux``.
        host_reads: Passed to :func:`fixed_point` (``False``: the sync-free chunked path, for
            ``torch.compile`` and CUDA graphs).

    Samples whose forward solve failed (``NONFINITE``, ``DIVERGED``) return their best iterate
    with no gradient: the backward rule never sees their rows (non-finite entries of their
    state and batched inputs are zeros inside the attach), so one bad sample cannot poison the
    others' gradients or the parameters'. ``MAX_ITER`` and ``BREAKDOWN`` samples keep the
    rule's gradient at their best iterate.

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
        has_aux: bool = False,
        host_reads: bool | None = None,
    ) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be an nn.Module or callable f(z, *inputs), got {f!r}")
        for name, flag in (("independent_samples", independent_samples), ("has_aux", has_aux)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.f = f
        self.solver = as_solver(solver)
        self.backward = as_backward(backward)
        self.independent_samples = independent_samples
        if host_reads is not None and not isinstance(host_reads, bool):
            raise TypeError(f"host_reads must be None, True or False, got {host_reads!r}")
        self.has_aux = has_aux
        self.host_reads = host_reads
        self.last_backward_result = None

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.backward!r}"

    def forward(
        self,
        *inputs: Any,
        z0: Any = None,
        solver: AbstractSolver | str | None = None,
        jacobian_penalty: int = 0,
        normalize_penalty: bool = False,
        spectral_radius: bool = False,
        states: Sequence[int] = (),
    ) -> DEQOutput:
        r"""Solve for the fixed point.

        ``f`` is one map for the whole call: when it is an ``nn.Module`` the call runs inside
        :func:`~implicitlayers.nn.one_map`, so parametrized weights (spectral or weight
        normalisation) are computed once and variational dropout masks drawn once.

        Args:
            *inputs: Passed to ``f(z, *inputs)``.
            z0: Initial state; defaults to ``torch.zeros_like(inputs[0])``.
            solver: Overrides the module's solver for this call (e.g. a larger test-time
                ``max_iter``).
            jacobian_penalty: Number of Hutchinson probes for the Jacobian regulariser of
                Bai et al. (2021), :math:`\|\partial f(z^\star)/\partial z\|_F^2` per sample,
                returned as ``output.jacobian_penalty`` (``0``: not computed): the value of
                :func:`~implicitlayers.diagnostics.jacobian_penalty` with the same
                ``normalize``, computed inside this forward's
                :func:`~implicitlayers.nn.one_map`, so on the map that was solved (a separate
                call after the forward would re-evaluate ``f`` outside it). Costs one more
                application of ``f`` and one VJP per probe (two under autograd).
            normalize_penalty: Divide the penalty by :math:`n`, the flat size of one sample
                of the state, as Bai et al. do and as the stability guide trains
                (:math:`\|J\|_F^2 / n`, the mean squared entry of :math:`J`, comparable
                across state sizes). The default, ``False``, keeps the unnormalised
                :math:`\|J\|_F^2`, the default of
                :func:`~implicitlayers.diagnostics.jacobian_penalty` too, so the two agree
                argument for argument. Needs ``jacobian_penalty >= 1``.
            spectral_radius: Also estimate the spectral radius of that Jacobian per sample
                (:func:`~implicitlayers.diagnostics.spectral_radius`, up to 50 VJPs without
                graph), returned as ``output.spectral_radius``.
            states: Iterations :math:`k` whose iterates :math:`z_k` to return as
                ``output.states`` for fixed-point correction (Bai et al., 2022): a loss on
                them, weighted as you like, supervises the solver's trajectory. Each is
                attached by the backward rule at its own point (one more application of ``f``
                per state); a sample that stopped before :math:`k` (or a :math:`k` past the
                solve) gives its returned ``z``. Memory: one state and one graph of ``f`` per
                entry, whatever ``max_iter`` is.

        Returns:
            :class:`DEQOutput`, which unpacks as ``z, result``.
        """
        if isinstance(jacobian_penalty, bool) or not isinstance(jacobian_penalty, int):
            raise TypeError(
                f"jacobian_penalty must be an int (the number of probes; 0 for none), got "
                f"{jacobian_penalty!r}"
            )
        if jacobian_penalty < 0:
            raise ValueError(f"jacobian_penalty must be >= 0 probes, got {jacobian_penalty}")
        if not isinstance(normalize_penalty, bool):
            raise TypeError(f"normalize_penalty must be a bool, got {normalize_penalty!r}")
        if normalize_penalty and not jacobian_penalty:
            raise ValueError(
                "normalize_penalty=True normalises the Jacobian penalty, but jacobian_penalty=0 "
                "computes none: pass jacobian_penalty=k (k >= 1 probes) as well"
            )
        if not isinstance(spectral_radius, bool):
            raise TypeError(f"spectral_radius must be a bool, got {spectral_radius!r}")
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
            z, result, aux, attached = self._solve_and_attach(
                inputs, z0, default_z0, solver_, _check_states(states)
            )
            penalty = radius = None
            if jacobian_penalty or spectral_radius:
                point = _tree.unflatten(
                    _clean_rows(_tree.flatten(result.z), result), _tree.spec_of(z0)
                )
                clean_inputs = _without_nonfinite(inputs, _failed(result))
                if jacobian_penalty:
                    penalty = _jacobian_penalty(
                        self._main,
                        point,
                        *clean_inputs,
                        n_probes=jacobian_penalty,
                        normalize=normalize_penalty,
                    )
                    penalty = torch.where(_failed(result), 0.0, penalty)
                if spectral_radius:
                    radius = _spectral_radius(self._main, point, *clean_inputs)
        return DEQOutput(
            z, result, aux=aux, jacobian_penalty=penalty, spectral_radius=radius, states=attached
        )

    def _main(self, z: Any, *inputs: Any) -> Any:
        """``f``'s state output (without the auxiliary output when ``has_aux``)."""
        out = self.f(z, *inputs)
        return split_aux(out)[0] if self.has_aux else out

    def _solve_and_attach(
        self,
        inputs: tuple[Any, ...],
        z0: Any,
        default_z0: bool,
        solver_: AbstractSolver,
        states: tuple[int, ...],
    ) -> tuple[Any, SolverResult, Any, tuple[Any, ...]]:
        """The fixed point (attached when autograd records), the solve's result, aux, and the
        requested intermediate states (attached too)."""
        try:
            # One flat map for the solve and the attach: it flattens the state, checks what f
            # returns and, with has_aux, splits the auxiliary output off.
            result, f_flat = solve(
                self.f,
                z0,
                inputs,
                solver=solver_,
                independent_samples=self.independent_samples,
                states=states,
                host_reads=self.host_reads,
                has_aux=self.has_aux,
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
            aux = None
            if self.has_aux:
                with torch.no_grad():
                    aux = self.f(result.z, *inputs)[1]
            return result.z, result, aux, result.states
        spec = f_flat.spec
        z_star = _tree.flatten(result.z)
        failed = _failed(result)
        # One host read per differentiable forward: are there samples to keep out of the graph?
        any_failed = bool(failed.any())
        attach_inputs = _without_nonfinite(inputs, failed) if any_failed else inputs
        # The same map on the attach's inputs; it keeps the aux of its first application.
        f_attach = f_flat.for_attach(attach_inputs)

        self_ref = weakref.ref(self)

        def record(rule: AbstractBackward, backward_result: SolverResult | None) -> None:
            module = self_ref()
            if module is not None:
                module.last_backward_result = backward_result

        leaves = [x for x in attach_inputs if isinstance(x, Tensor) and x.requires_grad]
        if isinstance(self.f, nn.Module):
            leaves += [p for p in self.f.parameters() if p.requires_grad]

        def attach(point: Tensor, on_result: Any) -> Tensor:
            z_in = _clean_rows(point, result) if any_failed else point
            out = self.backward.attach(f_attach, z_in, on_result, leaves=leaves)
            if any_failed:
                # Failed samples return their best iterate with no gradient; inside the attach
                # their non-finite entries are zeros, so they cannot reach other gradients.
                out = torch.where(failed[:, None], point.detach().to(out.dtype), out)
            return out

        z_flat = attach(z_star, record)
        attached = tuple(
            _tree.unflatten(attach(_tree.flatten(state), None), spec) for state in result.states
        )
        return _tree.unflatten(z_flat, spec), result, f_attach.aux, attached

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


def _failed(result: SolverResult) -> Tensor:
    """``(B,)`` samples whose forward solve failed: they get no gradient."""
    return (result.status == int(Status.NONFINITE)) | (result.status == int(Status.DIVERGED))


def _clean_rows(z_flat: Tensor, result: SolverResult) -> Tensor:
    """``z_flat`` with the non-finite entries of failed samples set to 0."""
    return torch.where(_failed(result)[:, None] & ~torch.isfinite(z_flat), 0.0, z_flat)
