"""Wall-clock timing: warm-up, then the median of repeats (CUDA events on a GPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Repeated timings of one piece of work, in seconds.

    Attributes:
        samples: Every timed repeat.
    """

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median over repeats (robust to a shared machine's hiccups)."""
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        """Fastest repeat."""
        return min(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (max(self.samples) - min(self.samples)) / max(self.median, 1e-12)

    def as_dict(self, prefix: str = "time") -> dict[str, Any]:
        """Flat fields for a record: median, min, spread and the raw samples."""
        return {
            f"{prefix}_s": self.median,
            f"{prefix}_min_s": self.min,
            f"{prefix}_spread": self.spread,
            f"{prefix}_samples_s": list(self.samples),
        }


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-repeat ratios of two alternately timed pieces of work.

    More robust on a shared machine than a ratio of medians: each pair was measured moments
    apart, under the same load.
    """
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[Any], Any],
    *,
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn(setup())``, excluding ``setup``.

    Args:
        fn: The work to time; receives what ``setup`` returned (``None`` without setup).
        device: CUDA devices are timed with CUDA events around ``fn``; the CPU with
            ``time.perf_counter``.
        repeats: Timed repeats.
        warmup: Untimed calls first (allocator, kernels and caches warm up).
        setup: Untimed preparation run before every call (e.g. the forward pass before a
            timed backward).

    Returns:
        The :class:`Timing` of the repeats.
    """
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn(setup() if setup else None)
    synchronize(device)
    samples = []
    for _ in range(repeats):
        arg = setup() if setup else None
        synchronize(device)
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(arg)
            samples.append(time.perf_counter() - t0)
    return Timing(tuple(samples))


class CallTimer:
    """Accumulates the wall time spent inside a callable (CPU only: calls are synchronous).

    Used to time ``f`` *inside* a solve, so the solver's overhead is a ratio measured in the
    same run rather than against an ``f`` timed at a different moment on a shared machine.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0
        self.seconds = 0.0

    def reset(self) -> None:
        """Forget the calls counted so far."""
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = self.fn(*args)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out
