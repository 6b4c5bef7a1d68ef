"""``unroll``: ``f`` applied a fixed number of times under autograd, optionally checkpointed."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from . import _tree
from ._flat import check_structure
from ._validate import check_int
from .nn import one_map
from .nn._dropout import _VariationalDropoutBase

__all__ = ["unroll"]


def unroll(
    f: Callable[..., Any],
    z0: Any,
    *inputs: Any,
    steps: int,
    checkpoint_every: int | None = None,
) -> Any:
    r"""Apply ``f`` ``steps`` times from ``z0``, recorded by autograd: an explicit, weight-tied
    network of ``steps`` layers, for the unrolled warm-up stage of a DEQ.

    .. math::

        z_{i+1} = f(z_i, x; \theta), \quad i = 0, \dots, k - 1, \qquad
        \text{returns } z_k,

    and backpropagation goes through every step. MDEQ (Bai et al., 2020) pretrains this way
    for its first epochs, before switching to the equilibrium :class:`~implicitlayers.DEQ`
    with the same ``f``: ``z = unroll(deq.f, z0, x, steps=8)``, later ``z, _ = deq(x)``.

    Memory holds the graph of all :math:`k` steps. With ``checkpoint_every`` :math:`= c`,
    the steps run in segments of :math:`c` under
    :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): the forward pass keeps only
    the :math:`\lceil k / c \rceil` states between segments, and the backward pass recomputes
    one segment at a time, so memory is :math:`O(k / c + c)` states (least near
    :math:`c = \sqrt{k}`; Chen et al., 2016) for one more forward evaluation of each step.
    The gradients are those of the plain loop.

    When ``f`` is an ``nn.Module`` the steps run inside :func:`~implicitlayers.nn.one_map`,
    as a DEQ's forward does: parametrized weights (``spectral_norm``) are computed once and
    one variational-dropout mask is drawn for all ``steps``. A checkpointed segment is
    recomputed with those same weights and masks, so the gradient matches the plain loop's
    even if ``f`` runs again before the backward pass. Other dropout (``nn.Dropout``) is
    replayed from the saved random state. A plain callable is called as it is.

    Args:
        f: ``f(z, *inputs)`` returning a state with ``z``'s structure: an ``nn.Module``
            (the :class:`~implicitlayers.DEQ`'s ``deq.f``) or any callable.
        z0: Initial state: a tensor ``(B, *S)`` or a tuple/list/dict of them.
        *inputs: Passed to ``f`` at every step.
        steps: :math:`k \ge 1`, the number of applications of ``f``.
        checkpoint_every: :math:`c \ge 1`, the segment length for gradient checkpointing;
            ``None`` (the default) records every step. Checkpointing applies only while
            autograd records.

    Returns:
        :math:`z_k`, with ``z0``'s structure.

    Raises:
        ValueError: If ``steps`` or ``checkpoint_every`` is below 1, or ``f`` returns a state
            shaped unlike ``z0``.
        TypeError: If ``f`` is not callable, or ``steps`` / ``checkpoint_every`` not an int.

    Example:
        >>> import torch
        >>> from implicitlayers import unroll
        >>> cell = torch.nn.Linear(4, 4)
        >>> f = lambda z, x: torch.tanh(0.5 * cell(z) + x)
        >>> x = torch.randn(2, 4)
        >>> z = unroll(f, torch.zeros(2, 4), x, steps=8, checkpoint_every=4)
        >>> z.sum().backward()  # through all 8 steps, two segments recomputed
        >>> plain = torch.zeros(2, 4)
        >>> for _ in range(8):
        ...     plain = f(plain, x)
        >>> torch.allclose(z, plain)
        True
    """
    if not callable(f):
        raise TypeError(f"f must be an nn.Module or callable f(z, *inputs), got {f!r}")
    check_int("steps", steps, minimum=1)
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every, minimum=1)
    spec = _tree.spec_of(z0)
    frozen = one_map(f) if isinstance(f, nn.Module) else contextlib.nullcontext()
    with frozen:
        if checkpoint_every is None or not torch.is_grad_enabled():
            return _run(f, spec, steps, z0, *inputs)
        replay = _Replay(f) if isinstance(f, nn.Module) else None

        def contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
            recompute = contextlib.nullcontext() if replay is None else replay.context()
            return contextlib.nullcontext(), recompute

        z = z0
        for start in range(0, steps, checkpoint_every):
            segment = functools.partial(_run, f, spec, min(checkpoint_every, steps - start))
            z = checkpoint(segment, z, *inputs, use_reentrant=False, context_fn=contexts)
        if replay is not None:
            replay.record_masks()
        return z


def _run(f: Callable[..., Any], spec: _tree.TreeSpec, steps: int, z: Any, *inputs: Any) -> Any:
    """``steps`` applications of ``f``, each output checked against ``z0``'s structure."""
    for _ in range(steps):
        z = f(z, *inputs)
        check_structure(z, spec)
    return z


class _Replay:
    """What a checkpointed segment of an ``nn.Module`` ``f`` must see again when recomputed.

    Taken inside :func:`~implicitlayers.nn.one_map`: the parametrized tensors it cached (with
    their graphs to the parameters) and, after the forward, the variational-dropout masks.
    Recomputing without them would recompute the parametrizations, which records operations
    the forward did not (``checkpoint`` then raises ``CheckpointError``) and, for
    ``spectral_norm`` in training mode, advances the power iteration during the backward
    pass; and it would read whatever mask a later forward left behind.
    """

    def __init__(self, f: nn.Module) -> None:
        self.weights: dict[tuple[int, str], Tensor] = {}
        for m in f.modules():
            if parametrize.is_parametrized(m):
                for name in m.parametrizations:  # type: ignore[union-attr]
                    self.weights[(id(m), name)] = getattr(m, name)
        self.dropouts = [m for m in f.modules() if isinstance(m, _VariationalDropoutBase)]
        self.masks: list[tuple[Tensor | None, tuple[int, ...] | None]] = []

    def record_masks(self) -> None:
        self.masks = [(m.mask, m._input_shape) for m in self.dropouts]

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Entered around a segment's recomputation, during the backward pass."""
        saved = [(m.mask, m._input_shape) for m in self.dropouts]
        try:
            for m, (mask, shape) in zip(self.dropouts, self.masks, strict=True):
                m.mask, m._input_shape = mask, shape
            with parametrize.cached():
                # torch has no public way to seed the cache with given tensors; its keys are
                # (id(module), tensor name) since torch 1.9. Restore what was there after.
                cache: dict[tuple[int, str], Tensor | None] = parametrize._cache
                before = {key: cache.get(key) for key in self.weights}
                cache.update(self.weights)
                try:
                    yield
                finally:
                    cache.update(before)
        finally:
            for m, (mask, shape) in zip(self.dropouts, saved, strict=True):
                m.mask, m._input_shape = mask, shape
