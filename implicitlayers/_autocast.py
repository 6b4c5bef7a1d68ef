"""Run ``f`` under the caller's autocast while the solver's bookkeeping stays in float32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _state(device_type: str) -> tuple[bool, torch.dtype]:
    # torch >= 2.4 takes the device type; older releases had per-device functions.
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # pragma: no cover - torch < 2.4
        if device_type == "cpu":
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        else:
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return enabled, dtype


class AutocastSplit:
    """Captures the autocast state at construction.

    ``bookkeeping()`` disables autocast (residuals, Anderson's Gram system in full precision);
    ``user()`` restores the captured state around calls of ``f``, with autocast's cache off.
    """

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type if device_type in ("cpu", "cuda") else "cpu"
        self.enabled, self.dtype = _state(self.device_type)

    @contextlib.contextmanager
    def bookkeeping(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with torch.autocast(self.device_type, enabled=False):
            yield

    @contextlib.contextmanager
    def user(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        # Without the weight-cast cache: ``f`` runs here under ``no_grad``, and torch releases
        # before the fix of pytorch/pytorch#112583 cache those casts without autograd history,
        # then hand them to the differentiable application of ``f`` that attaches z* to the
        # graph: its parameters silently got no gradient.
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=True, cache_enabled=False):
            yield
