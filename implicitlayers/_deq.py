"""``DEQ``: an ``nn.Module`` whose output is the fixed point of ``f``."""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._attach import (
    clean_rows,
    failed_rows,
    forward_mode,
    grad_leaves,
    needs_attach,
    watch_determinism,
    without_nonfinite,
)
from ._cache import FixedPointCache
from ._errors import ConvergenceError
from ._flat import FlatMap, flatten_state
from ._result import SolverResult
from ._solve import check_flags, record_at, result_of
from ._solve_op import Request, solve_op
from .backward import AbstractBackward
from .backward._functions import functorch_active
from .backward._names import as_backward
from .diagnostics import SpectralRadius
from .diagnostics._jacobian import penalty_at
from .diagnostics._spectral import radius_at
from .nn import one_map
from .solvers import AbstractSolver
from .solvers._loop import LoopOutput, l2_atol
from .solvers._names import as_solver

__all__ = ["DEQ", "DEQOutput"]

logger = logging.getLogger(__name__)


class DEQOutput(tuple[Any, SolverResult]):
    r"""What :class:`DEQ` returns: unpacks as ``z, result``; the optional outputs are attributes.

    Attributes:
        aux: With ``DEQ(f, has_aux=True)``: the auxiliary output of ``f`` at the fixed point,
            else ``None``. When autograd records, a loss on it gets the total derivative
            (through the fixed point by the backward rule, and directly).
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
        from_cache: With ``deq(x, keys=...)`` and a cache: the ``(B,)`` bool tensor of the
            samples that started from their cached state, else ``None``.
    """

    aux: Any
    states: tuple[Any, ...]
    from_cache: Tensor | None
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
        from_cache: Tensor | None = None,
    ) -> DEQOutput:
        out = super().__new__(cls, (z, result))
        out.aux = aux
        out.states = states
        out.from_cache = from_cache
        out.jacobian_penalty = jacobian_penalty
        out.spectral_radius = spectral_radius
        return out

    def __getnewargs_ex__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        extra = {
            "aux": self.aux,
            "jacobian_penalty": self.jacobian_penalty,
            "spectral_radius": self.spectral_radius,
            "states": self.states,
            "from_cache": self.from_cache,
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
            ``aux`` is that of ``f`` at the fixed point. When autograd records it is taken from
            one more application of ``f`` at the attached fixed point, so a loss on it gets
            the total derivative :math:`\partial a / \partial \theta + \partial a /
            \partial z \cdot dz^\star / d\theta` (with the rule's :math:`dz^\star/d\theta`),
            exactly as the same quantity computed from ``z``; for the partial derivative with
            :math:`z^\star` held, use ``f(z.detach(), x)[1]``.
        host_reads: Passed to :func:`fixed_point` (``False``: the sync-free chunked path, for
            ``torch.compile`` and CUDA graphs).
        cache: A :class:`FixedPointCache`: a call given the batch's ``keys`` starts each
            sample whose key it holds from its stored fixed point (checked at the current
            parameters) and stores every solution under its key. Not a submodule (DDP leaves
            it alone, ``state_dict`` does not hold it: save ``cache.state_dict()`` yourself).

    Samples whose forward solve failed (``NONFINITE``, ``DIVERGED``) return their best iterate
    with no gradient: the backward rule never sees their rows (non-finite entries of their
    state and batched inputs are zeros inside the attach), so one bad sample cannot poison the
    others' gradients or the parameters'. ``MAX_ITER``, ``UNSETTLED`` and ``BREAKDOWN``
    samples keep the rule's gradient at their best iterate.

    Every tensor that requires grad and that ``f`` depends on gets its gradient: the inputs
    however nested (dicts, lists, tuples, dataclasses), the parameters, buffers and tensor
    attributes of an ``nn.Module`` ``f``, the closure of a plain ``f``; when none of those
    requires grad but autograd records, one application of ``f`` without a graph finds any
    other (a global).

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
        cache: FixedPointCache | None = None,
    ) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be an nn.Module or callable f(z, *inputs), got {f!r}")
        if not isinstance(has_aux, bool):
            raise TypeError(f"has_aux must be a bool, got {has_aux!r}")
        check_flags(independent_samples=independent_samples, host_reads=host_reads)
        self.f = f
        self.solver = as_solver(solver)
        self.backward = as_backward(backward)
        self.independent_samples = independent_samples
        self.has_aux = has_aux
        self.host_reads = host_reads
        if cache is not None and not isinstance(cache, FixedPointCache):
            raise TypeError(
                f"cache must be an implicitlayers.FixedPointCache or None, got {cache!r}"
            )
        self.cache = cache
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
        keys: Any = None,
    ) -> DEQOutput:
        r"""Solve for the fixed point.

        ``f`` is one map for the whole call: when it is an ``nn.Module`` the call runs inside
        :func:`~implicitlayers.nn.one_map`, so parametrized weights (spectral or weight
        normalisation) are computed once and variational dropout masks drawn once.

        Args:
            *inputs: Passed to ``f(z, *inputs)``: tensors, or any structure of them (dicts,
                lists, tuples, dataclasses); every tensor in them that requires grad gets its
                gradient.
            z0: Initial state; defaults to ``torch.zeros_like(inputs[0])`` (which then must be
                a tensor of shape ``(B, *S)`` with at least one feature dimension).
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
            keys: With the module's ``cache``: one key per sample (dataset indices, sequence
                ids); samples whose key the cache holds start from their stored state
                (``z0`` is then the default for the others), and the solutions are stored.
                ``None``: the cache is not used (e.g. at evaluation time).

        Returns:
            :class:`DEQOutput`, which unpacks as ``z, result``.
        """
        _check_penalty(jacobian_penalty, normalize_penalty, spectral_radius)
        solver_ = self.solver if solver is None else as_solver(solver)
        recorded = record_at(states)
        default_z0 = z0 is None
        if z0 is None:
            z0 = _default_z0(inputs)
        # The one flatten: the state's structure and every check of it, once.
        f_flat, flat0 = flatten_state(self.f, z0, inputs, has_aux=self.has_aux)
        _check_batch(f_flat.batch, inputs)
        cache = _cache_for(self.cache, keys)
        from_cache = None
        # One forward, one map: parametrized weights computed once, dropout masks drawn once.
        frozen = one_map(self.f) if isinstance(self.f, nn.Module) else contextlib.nullcontext()
        with frozen:
            if cache is not None:  # the cached starts, checked on this forward's map
                flat0, from_cache = cache.start(f_flat, flat0, keys)
            # A rule that uses the solver's inverse estimate needs its memory kept, when a
            # gradient or tangent may flow.
            keep = (
                self.backward.uses_estimate
                and bool(solver_.estimate_keys)
                and (torch.is_grad_enabled() or forward_mode(self.f, inputs))
            )
            request = Request(
                f_flat, solver_, self.independent_samples, self.host_reads, recorded, keep
            )
            out = self._solve(request, flat0, default_z0)
            if cache is not None:
                cache.finish(keys, out.z, out.status)
            failed = failed_rows(out.status)
            # One host read where f is applied again: are there samples to keep out of it?
            # (Under torch.func.vmap none: the statuses are batched, and the failed rows'
            # entries are zeroed by masks, whether there are any or not.)
            tangents = not torch.is_grad_enabled() and forward_mode(self.f, inputs)
            reapplied = torch.is_grad_enabled() or tangents or jacobian_penalty or spectral_radius
            any_failed = request.vmapped or (bool(failed.any()) if reapplied else False)
            # The map the attach and the diagnostics apply f through: the caller's autocast,
            # and the failed samples' non-finite inputs zeroed.
            f_main = f_flat.with_inputs(without_nonfinite(inputs, failed) if any_failed else inputs)
            z_flat, attached = self._attach(
                f_main, out, solver_, failed if any_failed else None, tangents
            )
            # Each returned state unflattened once: the solve's (detached) and, attached, the
            # output (in f's dtype under autocast).
            result = result_of(out, f_flat)
            if attached is None:
                z, states_out = result.z, result.states
            else:
                z = f_flat.unflatten(z_flat, cast=False)
                states_out = tuple(f_flat.unflatten(s, cast=False) for s in attached)
            aux = self._aux(f_flat, f_main, out, z_flat, attached is not None)
            penalty = radius = None
            if jacobian_penalty or spectral_radius:
                point = clean_rows(out.z, failed) if any_failed else out.z
                point = point.to(f_flat.dtype)
                if jacobian_penalty:
                    penalty = penalty_at(
                        f_main, point, n_probes=jacobian_penalty, normalize=normalize_penalty
                    )
                    penalty = torch.where(failed, 0.0, penalty) if any_failed else penalty
                if spectral_radius:
                    radius = radius_at(f_main, point)
        return DEQOutput(
            z,
            result,
            aux=aux,
            jacobian_penalty=penalty,
            spectral_radius=radius,
            states=states_out,
            from_cache=from_cache,
        )

    def _solve(self, request: Request, flat0: Tensor, default_z0: bool) -> LoopOutput:
        """The forward solve (policies applied), with a hint on a shape error inside ``f``
        from the default z0."""
        try:
            return solve_op(request, flat0)
        except RuntimeError as err:
            if default_z0 and _looks_like_shape_error(err):
                f_flat = request.f_flat
                shape = (f_flat.batch, *f_flat.spec.shape)
                _add_note(
                    err,
                    f"implicitlayers: f was called with the default z0 = zeros_like(inputs[0]) "
                    f"of shape {shape}. If the state's shape differs from the first "
                    "input's, pass z0 with the state's shape: deq(*inputs, z0=...).",
                )
            raise

    def _attach(
        self,
        f_main: FlatMap,
        out: LoopOutput,
        solver_: AbstractSolver,
        failed: Tensor | None,
        tangents: bool,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """The flat fixed point carrying the backward rule's derivatives (when autograd
        records and a tensor wants a gradient, or when forward-mode ``tangents`` flow), and the
        recorded states, each attached at its own point (``None``: nothing attached)."""
        if not (torch.is_grad_enabled() or tangents):
            return out.z, None
        z_star = clean_rows(out.z, failed) if failed is not None else out.z
        if out.fz is not None and failed is None and self.host_reads is not False:
            # f at the returned batch from the solve: a deterministic f gives it again. (Not
            # with failed rows, whose zeroed entries change what a coupled f sees; not on
            # the sync-free path, whose user asked for no host read.)
            atol = l2_atol(solver_, out.z.shape[1])
            watch_determinism(f_main, out.fz, solver_.rtol, atol)
        leaves = grad_leaves(self.f, f_main.inputs)
        if not needs_attach(f_main, z_star, leaves):
            f_main.on_next_call = None
            return out.z, None
        self_ref = weakref.ref(self)

        def record(rule: AbstractBackward, backward_result: SolverResult | None) -> None:
            module = self_ref()
            if module is not None:
                module.last_backward_result = backward_result

        rule = self.backward
        if rule.uses_estimate:  # the rule with the solver's estimate of (I - J)^-1
            kept = out.solver_state
            rule = rule.with_estimate(None if kept is None else solver_.inverse_estimate(kept))

        def attach(point: Tensor, on_result: Any) -> Tensor:
            z_in = clean_rows(point, failed) if failed is not None else point
            attached = rule.attach(f_main, z_in, on_result, leaves=leaves)
            if failed is not None:
                # Failed samples return their best iterate with no gradient; inside the attach
                # their non-finite entries are zeros, so they cannot reach other gradients.
                attached = torch.where(failed[:, None], point.detach().to(attached.dtype), attached)
            return attached

        z_flat = attach(out.z, record)
        return z_flat, tuple(attach(state, None) for state in out.states)

    def _aux(
        self, f_flat: FlatMap, f_main: FlatMap, out: LoopOutput, z_flat: Tensor, attached: bool
    ) -> Any:
        r"""``f``'s auxiliary output at the fixed point. Attached, it is taken from one more
        application of ``f`` at the attached solution, so a loss on it gets the total
        derivative (through :math:`z^\star` by the backward rule, and directly); otherwise
        from the solve's last evaluation when that was the returned batch."""
        if not self.has_aux:
            return None
        if attached:
            f_main(z_flat)
            return f_main.aux
        if out.fz is not None:
            return f_flat.aux
        with torch.no_grad():
            f_main(out.z)
        return f_main.aux


def _cache_for(cache: FixedPointCache | None, keys: Any) -> FixedPointCache | None:
    """The cache a call with ``keys`` uses (``None``: none)."""
    if keys is None:
        return None
    if cache is None:
        raise ValueError(
            "keys were given but this DEQ has no cache: construct it with "
            "DEQ(f, cache=implicitlayers.FixedPointCache(...)), or drop keys"
        )
    if functorch_active():
        raise RuntimeError(
            "a FixedPointCache cannot be used under a torch.func transform (its keys and "
            "entries live on the host, per sample): call the DEQ without keys there"
        )
    return cache


def _check_penalty(jacobian_penalty: Any, normalize_penalty: Any, spectral_radius: Any) -> None:
    """The forward's diagnostic options."""
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


def _default_z0(inputs: tuple[Any, ...]) -> Tensor:
    """``zeros_like(inputs[0])``, for a first input that is a batch of samples with features."""
    if not inputs or not isinstance(inputs[0], Tensor):
        raise TypeError(
            "DEQ needs z0 when its first input is not a tensor: call deq(*inputs, z0=...)"
        )
    x = inputs[0]
    if x.dim() < 2:
        raise ValueError(
            f"the first input has shape {tuple(x.shape)}, which leaves no feature dimension "
            "for the default z0 = zeros_like(inputs[0]): the leading dimension is the batch. "
            "For one sample of "
            f"{x.shape[0] if x.dim() else 1} features pass x.unsqueeze(0); for a batch of "
            "scalars pass x.unsqueeze(1); or pass z0 with shape (B, *S) yourself."
        )
    return torch.zeros_like(x)


def _check_batch(batch: int, inputs: tuple[Any, ...]) -> None:
    """``z0``'s batch must match the first input's leading dimension when that is a tensor."""
    if not inputs or not isinstance(inputs[0], Tensor) or inputs[0].dim() == 0:
        return
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
