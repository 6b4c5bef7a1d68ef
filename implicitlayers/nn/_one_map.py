r"""``one_map``: every call of a module inside the context applies the same function.

A deep equilibrium model calls ``f`` tens of times per forward, under ``torch.no_grad()``,
then once more with autograd on at the detached fixed point. Two common ingredients of ``f``
change the function from one call to the next: parametrized weights
(``torch.nn.utils.parametrizations.spectral_norm`` recomputes :math:`W / \sigma(W)` and, in
training mode, advances its power iteration at every access; ``weight_norm`` recomputes
:math:`g\, v / \lVert v \rVert`) and dropout masks; so does the power iteration of
:class:`~implicitlayers.imaging.NormalizedConv2d`. :func:`one_map` freezes all three for the
duration of one forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._dropout import _VariationalDropoutBase

__all__ = ["one_map"]

# ids of the modules covered by an active ``one_map``: an inner ``one_map`` of a module (or of
# one of its submodules) already covered leaves it alone, so nesting neither redraws masks nor
# refills the cache. A module is alive while its context runs, so its id cannot be reused.
_ACTIVE: set[int] = set()


@contextlib.contextmanager
def one_map(module: nn.Module) -> Iterator[None]:
    r"""Make every call of ``module`` (and its submodules) inside the context apply one map.

    A fixed-point solve iterates :math:`z_{k+1} = f(z_k, x; \theta)`; it converges to a fixed
    point only if :math:`f` is the same function at every :math:`k`. On entry, ``one_map``

    1. enters :func:`torch.nn.utils.parametrize.cached` and computes every parametrized tensor
       of every submodule once, **with autograd enabled** (even when entered under
       ``torch.no_grad()``): each call inside the context then reads the same tensor
       :math:`W = P(\theta)`, and since that tensor carries the graph back to the original
       parameters (``parametrizations.weight.original`` and so on), the differentiable
       application of :math:`f` at the end of a DEQ's forward sends their gradients there.
       (Filling the cache lazily would store the tensor computed by the solver's first call,
       under ``no_grad``, without history: the parameters would silently get no gradient.)
    2. calls ``reset_mask()`` on every
       :class:`~implicitlayers.nn.VariationalDropout` and
       :class:`~implicitlayers.nn.VariationalDropout2d`, so the first call draws a new mask
       that every later call, the differentiable one included, reuses.
    3. advances the power iteration of every
       :class:`~implicitlayers.imaging.NormalizedConv2d` once (in training mode, with
       autograd enabled, as one plain forward of the layer would) and freezes its vector
       until the context exits, so that the solve and the differentiable application divide
       by the same :math:`\hat\sigma`.

    In training mode, ``spectral_norm``'s power iteration (and ``NormalizedConv2d``'s)
    therefore advances exactly once per context, at entry, as it does once per forward of an
    ordinary network, instead of once per solver iteration. The cached tensors are dropped
    when the outermost :func:`~torch.nn.utils.parametrize.cached` context exits; the autograd
    graph keeps what the backward pass needs.

    Nesting is harmless: a module already covered by an active ``one_map`` (itself or through
    a parent) is left alone, so an inner ``one_map`` neither redraws masks nor refills the
    cache. A module without parametrizations or variational dropout makes this a no-op.
    :class:`~implicitlayers.DEQ` enters ``one_map(f)`` on every forward when ``f`` is an
    ``nn.Module``.

    Args:
        module: The map :math:`f`, usually the cell given to :class:`~implicitlayers.DEQ`.

    Raises:
        TypeError: If ``module`` is not an ``nn.Module``.
        RuntimeError: If an enclosing :func:`~torch.nn.utils.parametrize.cached` context
            already holds a tensor of ``module`` computed without autograd history while its
            parameters require gradients (they would get none).

    Note:
        Only the parametrizations of :mod:`torch.nn.utils.parametrizations` (and any
        :func:`~torch.nn.utils.parametrize.register_parametrization`) are cached. The legacy
        hook-based ``torch.nn.utils.spectral_norm`` and ``torch.nn.utils.weight_norm``
        recompute the weight in a forward pre-hook at every call and are not affected; use
        the parametrization versions. ``nn.Dropout`` still draws a new mask at every call:
        use :class:`~implicitlayers.nn.VariationalDropout` inside ``f``.

    Example:
        >>> import torch
        >>> from torch.nn.utils.parametrizations import spectral_norm
        >>> from implicitlayers.nn import one_map
        >>> lin = spectral_norm(torch.nn.Linear(4, 4))
        >>> x = torch.randn(2, 4)
        >>> with one_map(lin):
        ...     with torch.no_grad():  # the solve: many calls, one weight
        ...         w = lin.weight
        ...         z = torch.zeros(2, 4)
        ...         for _ in range(20):
        ...             z = torch.tanh(0.5 * lin(z) + x)
        ...         same = lin.weight is w
        ...     out = torch.tanh(0.5 * lin(z) + x)  # the differentiable application
        >>> same
        True
        >>> out.sum().backward()
        >>> lin.parametrizations.weight.original.grad is not None
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"module must be an nn.Module, got {module!r} of type {type(module).__name__}; "
            "a plain callable has no parametrizations or dropout masks for one_map to freeze"
        )
    fresh = {name: m for name, m in module.named_modules() if id(m) not in _ACTIVE}
    if not fresh:
        yield
        return
    ids = {id(m) for m in fresh.values()}
    _ACTIVE.update(ids)
    try:
        with contextlib.ExitStack() as stack:
            parametrized = {name: m for name, m in fresh.items() if parametrize.is_parametrized(m)}
            if parametrized:
                stack.enter_context(parametrize.cached())
                _fill_cache(parametrized)
            for m in fresh.values():
                if isinstance(m, _VariationalDropoutBase):
                    m.reset_mask()
            for m in fresh.values():
                # Layers with a per-forward state of their own (NormalizedConv2d's power
                # vector): one update on entry, none until the context exits.
                enter, leave = getattr(m, "_enter_one_map", None), getattr(m, "_exit_one_map", None)
                if callable(enter) and callable(leave):
                    stack.callback(leave)
                    enter()
            yield
    finally:
        _ACTIVE.difference_update(ids)


def _fill_cache(modules: dict[str, nn.Module]) -> None:
    """Compute each parametrized tensor once, with autograd on, into the active cache."""
    with torch.enable_grad():
        for prefix, m in modules.items():
            parametrizations = cast(nn.ModuleDict, m.parametrizations)
            for name in parametrizations:
                tensor = getattr(m, name)
                qualname = f"{prefix}.{name}" if prefix else name
                if (
                    not tensor.requires_grad
                    and not torch.is_inference_mode_enabled()
                    and any(p.requires_grad for p in parametrizations[name].parameters())
                ):
                    raise RuntimeError(
                        f"the parametrized tensor {qualname!r} ({type(m).__name__}) was already "
                        "cached without autograd history by an enclosing "
                        "torch.nn.utils.parametrize.cached() context (it was first computed "
                        "under torch.no_grad()), so its parameters would get no gradient. "
                        "Enter one_map (or call the DEQ) before computing it under no_grad, "
                        "or enter parametrize.cached() inside one_map rather than around it."
                    )
