"""Peak-memory measurements that mean something for PyTorch.

``tracemalloc`` does not see torch's allocations, so three instruments are used instead:

* :func:`cuda_peak_bytes`: the CUDA caching allocator's ``max_memory_allocated`` (GPU only).
* :func:`profiler_peak_bytes`: the CPU allocator's peak, rebuilt from the allocation and free
  events that ``torch.profiler`` records with ``profile_memory=True`` (exact at the allocator
  level, but the profiler slows the run, so it is never used for timing).
* :func:`rss_peak_bytes`: the growth of the process's peak resident set (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``), Linux only and noisier: it includes the
  C allocator's slack.
* :class:`SavedTensors`: bytes of the tensors autograd saves for backward, through
  ``torch.autograd.graph.saved_tensors_hooks``: exact and device-independent.
* :class:`PeakMemory`: the CUDA or resident-set peak of a ``with`` block (a training step),
  the instrument behind :func:`cuda_peak_bytes` and :func:`rss_peak_bytes`.
* :class:`CallCounter`: forward calls of a module and the vector-Jacobian products through it,
  counted by hooks, without wrapping the module (its ``state_dict`` keys stay the same).

The DE-GRAD Table 2 benchmark (``benchmarks/deblur_table.py``) and the suites measure with
these same helpers.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

_CLEAR_REFS = "/proc/self/clear_refs"


class PeakMemory:
    """The memory high-water mark of a ``with`` block, above what was in use when it began.

    On CUDA: ``torch.cuda.max_memory_allocated`` (reset at entry). On the CPU: the resident
    set's peak ``VmHWM``, reset through ``/proc/self/clear_refs`` at entry (Linux; elsewhere
    ``peak_bytes`` stays ``None``), which includes the C allocator's slack.

    Attributes:
        peak_bytes: Set on exit.
        method: The instrument, in words.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self.method = "cuda_max_allocated" if device.type == "cuda" else "rss_hwm"
        self._base: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            with open(_CLEAR_REFS, "w", encoding="utf-8") as handle:
                handle.write("5")  # resets VmHWM to the current VmRSS
        except OSError:
            return self
        kib = _status_kib("VmRSS")
        self._base = None if kib is None else kib * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self._base is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        kib = _status_kib("VmHWM")
        self.peak_bytes = None if kib is None else max(0, kib * 1024 - self._base)


class CallCounter:
    """Count a module's forward calls and the reverse passes (VJPs) through its outputs.

    A reverse pass is counted each time a gradient flows back through an output of the module
    (one per vector-Jacobian product, whoever computes it: a backward rule's adjoint solve or
    the final ``loss.backward()``), by a forward hook that registers a tensor hook on every
    output that requires grad. The module itself is not wrapped.

    Args:
        module: The module to watch (``remove()`` the hook when done, or use the counter as a
            context manager).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.forward_calls = 0
        self.reverse_calls = 0
        self._handle = module.register_forward_hook(self._forward)

    def _forward(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        self.forward_calls += 1
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._reverse)  # type: ignore[no-untyped-call]

    def _reverse(self, grad: torch.Tensor) -> None:
        self.reverse_calls += 1

    def reset(self) -> None:
        """Zero both counters."""
        self.forward_calls = self.reverse_calls = 0

    def remove(self) -> None:
        """Remove the hook."""
        self._handle.remove()

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated on ``device`` while ``fn`` runs, above what was live before."""
    with PeakMemory(device) as peak:
        fn()
    return int(peak.peak_bytes or 0)


def profiler_peak_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak CPU bytes allocated while ``fn`` runs, above what was live before.

    Rebuilt from ``torch.profiler``'s allocator events (``profile_memory=True``): the running
    sum of allocations and frees in time order, maximised. Returns ``None`` when this torch
    build does not expose the events.
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    # Sorted on the time alone, a stable sort: events in the same tick keep their recorded
    # order (torch < 2.3 only gives microseconds).
    deltas = sorted(
        (
            (_start_ns(e), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type().name == "CPU"
        ),
        key=lambda pair: pair[0],
    )
    level = peak = 0
    for _, nbytes in deltas:
        level += nbytes
        peak = max(peak, level)
    return int(peak)


def _start_ns(event: Any) -> int:
    """An event's start in ns: ``start_ns()`` where torch has it, else ``start_us()`` (2.2)."""
    if hasattr(event, "start_ns"):
        return int(event.start_ns())
    return int(event.start_us()) * 1000


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_peak_bytes(fn: Callable[[], Any]) -> int | None:
    """Growth of the peak resident set size while ``fn`` runs (Linux), else ``None``."""
    with PeakMemory(torch.device("cpu")) as peak:
        fn()
    return peak.peak_bytes


class SavedTensors:
    """Count the bytes autograd saves for backward inside a ``with`` block.

    Storages are counted once however many tensors view them, and storages listed in
    ``exclude`` (the parameters, which exist anyway) are not counted.

    Args:
        exclude: Tensors whose storages should not be counted.

    Example::

        with SavedTensors(model.parameters()) as saved:
            loss = model(x).sum()
        saved.nbytes
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}
        self._ctx: contextlib.AbstractContextManager[Any] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct saved storages."""
        return sum(self._seen.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr not in self._seen:
            self._seen[ptr] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensors:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._ctx is not None
        self._ctx.__exit__(exc_type, exc, tb)


def peak_bytes(
    fn: Callable[[Any], Any],
    device: torch.device,
    setup: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """The allocator-level peak of ``fn(setup())`` on ``device``, with the instrument named.

    ``setup`` runs before each measurement and outside it (e.g. the forward pass before a
    measured backward), and what it returns is passed to ``fn``.

    Returns:
        ``{"peak_bytes": int | None, "peak_method": str}`` and, on the CPU, also
        ``"rss_peak_bytes"`` measured in a second run.
    """

    def bound() -> Callable[[], Any]:
        arg = setup() if setup is not None else None
        return lambda: fn(arg)

    if device.type == "cuda":
        return {
            "peak_bytes": cuda_peak_bytes(bound(), device),
            "peak_method": "cuda_max_allocated",
        }
    return {
        "peak_bytes": profiler_peak_bytes(bound()),
        "peak_method": "torch.profiler allocator events",
        "rss_peak_bytes": rss_peak_bytes(bound()),
    }
