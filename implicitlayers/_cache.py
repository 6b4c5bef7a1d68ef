r"""``FixedPointCache``: fixed points kept across solves, as the next solve's initial states.

A DEQ trained for several epochs solves the fixed point of the same sample once per epoch; a
video, a molecular-dynamics trajectory or a continuation in a parameter solves one fixed point
per frame, each close to the last. The cache stores :math:`z^\star` per key (a dataset index,
a sequence id) and gives it back as the initial state of the next solve with that key, so the
solve starts near its answer instead of at the default point.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from . import _tree
from ._flat import FlatMap
from ._result import Status
from ._validate import check_choice, check_int

__all__ = ["CacheStats", "FixedPointCache"]

logger = logging.getLogger(__name__)

_FAILED = (int(Status.NONFINITE), int(Status.DIVERGED))

#: What ``eviction`` accepts.
Eviction = Literal["lru", "none"]


@dataclass
class CacheStats:
    """Counts since the cache was made (or :meth:`FixedPointCache.reset_stats`).

    Attributes:
        lookups: Samples whose key was looked up.
        hits: Samples that started from their cached state.
        misses: Samples whose key the cache did not hold.
        stale: Entries dropped for age (older than ``max_age`` optimizer steps).
        worse: Entries not used because their residual at the current parameters was above
            the default initial state's.
        stored: Samples stored (new keys and updates).
        evicted: Entries evicted to make room.
        check_evaluations: Evaluations of ``f`` (on the whole batch) spent on the residual
            check.
    """

    lookups: int = 0
    hits: int = 0
    misses: int = 0
    stale: int = 0
    worse: int = 0
    stored: int = 0
    evicted: int = 0
    check_evaluations: int = 0

    @property
    def hit_rate(self) -> float:
        """``hits / lookups`` (0 before any lookup)."""
        return self.hits / self.lookups if self.lookups else 0.0


class FixedPointCache:
    r"""Fixed points stored per key, given back as initial states of later solves.

    Pass it to :class:`~implicitlayers.DEQ` (``DEQ(f, cache=cache)``) or
    :func:`~implicitlayers.fixed_point` (``cache=cache``) and give each call the batch's keys
    (``deq(x, keys=idx)``): a sample whose key the cache holds starts from its stored state,
    the others from the default initial state (``z0``, or zeros), and every sample's solution
    is stored under its key afterwards (not those whose solve failed: ``NONFINITE``,
    ``DIVERGED``). A key is any hashable: a dataset index for the same samples every epoch,
    a sequence id for a time-stepping or continuation problem (each frame starts from the
    last frame's solution of that sequence), a ``(video, frame)`` pair.

    **Staleness.** A stored state is the fixed point of the map at the parameters of the step
    that stored it. An entry older than ``max_age`` optimizer steps (counted by :meth:`step`,
    or by the optimizer with :meth:`count_steps`) is dropped. With ``check=True`` (default)
    every looked-up entry is also checked at the current parameters: ``f`` is evaluated once
    at the default initial states and once at the cached ones (two evaluations on the whole
    batch, only when some key hits), and a sample whose cached residual
    :math:`\|f(z) - z\|` is above its default one starts from the default. So a stale entry
    costs at most the check, and a cached start never changes the answer beyond the solver's
    tolerance (it is only the start).

    **Memory.** At most ``max_entries`` states, each one flat row of the state's features,
    on ``device`` in ``dtype`` (default: those of the first state stored; e.g. ``"cpu"`` and
    ``torch.bfloat16`` keep a large cache off the accelerator in half the memory: states come
    back in the solve's dtype and device). When full, a new key evicts the least recently
    used entry (``eviction="lru"``, the right choice for sequences), or is not stored
    (``"none"``: for epochs over a dataset larger than the cache, where LRU would evict every
    entry before its next use and keep none that is ever hit).

    **Distributed training.** Keep one cache per process (rank), holding the states of the
    samples that rank solves: a sampler that gives each rank the same shard every epoch
    (``DistributedSampler(..., shuffle=True)`` reshuffles the shards between epochs, so a
    rank mostly meets keys another rank stored) and each rank's :meth:`state_dict` saved
    on its own. The cache is no ``nn.Module``: DDP does not broadcast it.

    Args:
        max_entries: The most states kept.
        max_age: Drop entries stored more than this many optimizer steps ago (``None``: no
            limit by age).
        device: Where states are stored (``None``: the first state's device).
        dtype: The dtype they are stored in (``None``: the first state's).
        eviction: ``"lru"`` or ``"none"`` (above).
        check: Check each hit's residual against the default start's (above).

    Example:
        >>> import torch, implicitlayers as il
        >>> cache = il.FixedPointCache(max_entries=1000)
        >>> deq = il.DEQ(lambda z, x: 0.5 * torch.tanh(z) + x, cache=cache,
        ...              solver=il.Anderson(rtol=1e-8))
        >>> x, idx = torch.randn(4, 3), torch.arange(4)
        >>> _, first = deq(x, keys=idx)     # nothing cached yet: from zeros
        >>> _, again = deq(x, keys=idx)     # the same samples: from their fixed points
        >>> int(first.n_steps.max()) > 1, int(again.n_steps.max())
        (True, 1)
        >>> cache.stats.hits, len(cache)
        (4, 4)
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        *,
        max_age: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        eviction: Eviction = "lru",
        check: bool = True,
    ) -> None:
        check_int("max_entries", max_entries, minimum=1)
        if max_age is not None:
            check_int("max_age", max_age, minimum=0)
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        check_choice("eviction", eviction, ("lru", "none"))
        if not isinstance(check, bool):
            raise TypeError(f"check must be a bool, got {check!r}")
        self.max_entries = max_entries
        self.max_age = max_age
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self.eviction = eviction
        self.check = check
        self.stats = CacheStats()
        self._step = 0
        self._features: int | None = None
        self._data: Tensor | None = None  # (allocated slots, features), grown by doubling
        self._slots: collections.OrderedDict[Hashable, int] = collections.OrderedDict()
        self._free: list[int] = []
        self._stored_at: list[int] = []  # per slot

    def __repr__(self) -> str:
        return (
            f"FixedPointCache({len(self)}/{self.max_entries} entries, step {self._step}, "
            f"max_age={self.max_age}, eviction={self.eviction!r}, check={self.check})"
        )

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return _as_key(key) in self._slots

    def keys(self) -> list[Hashable]:
        """The keys held, least recently used first."""
        return list(self._slots)

    @property
    def nbytes(self) -> int:
        """Bytes of the storage allocated so far (it grows by doubling up to
        ``max_entries`` states)."""
        return 0 if self._data is None else self._data.numel() * self._data.element_size()

    # --- Steps and statistics ------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Optimizer steps counted so far (the age of an entry is counted in these)."""
        return self._step

    def step(self, count: int = 1) -> None:
        """Count ``count`` optimizer steps: entries age by as many."""
        check_int("count", count, minimum=0)
        self._step += count

    def count_steps(self, optimizer: torch.optim.Optimizer) -> Any:
        """Count every ``optimizer.step()`` (a step post-hook); returns the hook's handle
        (``handle.remove()`` stops it)."""
        return optimizer.register_step_post_hook(lambda *args: self.step())

    def reset_stats(self) -> None:
        """Zero the counts in ``stats``."""
        self.stats = CacheStats()

    def clear(self) -> None:
        """Drop every entry (the step count and statistics stay)."""
        self._slots.clear()
        self._free.clear()
        self._stored_at.clear()
        self._data = None

    # --- Public lookups on states of any structure -----------------------------------------

    def initial(self, keys: Any, default: Any) -> tuple[Any, Tensor]:
        """The initial state for a batch: each sample's cached state where the cache holds
        its key (and the entry is not too old), ``default``'s row elsewhere; no residual check
        (:class:`~implicitlayers.DEQ` and :func:`~implicitlayers.fixed_point` with
        ``cache=`` do it for you).

        Args:
            keys: One key per sample (a sequence, or a 1-D tensor of ints).
            default: The default initial state, a tensor ``(B, *S)`` or a tuple/list/dict of
                them.

        Returns:
            ``(z0, hit)``: the state with ``default``'s structure, dtype and device, and the
            ``(B,)`` bool tensor of the samples that start from the cache.
        """
        spec = _tree.spec_of(default)
        flat = _tree.flatten(default)
        start, hit = self._lookup(_as_keys(keys, flat.shape[0]), flat)
        return _tree.unflatten(start, spec), hit

    def store(self, keys: Any, z: Any, mask: Tensor | None = None) -> None:
        """Store each sample's state of ``z`` (a tensor ``(B, *S)`` or a tuple/list/dict of
        them) under its key, the samples where ``mask`` (``(B,)`` bool) is false excepted."""
        flat = _tree.flatten(z).detach()
        self._store(_as_keys(keys, flat.shape[0]), flat, mask)

    # --- The flat path of a solve --------------------------------------------------------------

    def start(self, f_flat: FlatMap, flat0: Tensor, keys: Any) -> tuple[Tensor, Tensor]:
        """The flat start of a solve of ``f_flat`` from the default ``flat0``: the cached
        rows that pass the checks; and the ``(B,)`` bool tensor of the rows taken from the
        cache."""
        key_list = _as_keys(keys, flat0.shape[0])
        start, hit = self._lookup(key_list, flat0)
        if not self.check or not bool(hit.any()):
            return start, hit
        with torch.no_grad():
            res_default = _residual(f_flat, flat0)
            res_cached = _residual(f_flat, start)
        self.stats.check_evaluations += 2
        # NaN compares false: a cached state whose residual is not a number is not used.
        keep = hit & (res_cached <= res_default)
        worse = int((hit & ~keep).sum())
        if worse:
            self.stats.worse += worse
            self.stats.hits -= worse
            logger.debug("FixedPointCache: %d entries worse than the default start", worse)
            start = torch.where(keep[:, None], start, flat0)
        return start, keep

    def finish(self, keys: Any, z_flat: Tensor, status: Tensor) -> None:
        """Store the solution rows of a solve (not those of failed samples)."""
        failed = torch.zeros_like(status, dtype=torch.bool)
        for code in _FAILED:
            failed |= status == code
        self._store(_as_keys(keys, z_flat.shape[0]), z_flat.detach(), ~failed)

    # --- Storage -----------------------------------------------------------------------------

    def _lookup(self, keys: list[Hashable], flat0: Tensor) -> tuple[Tensor, Tensor]:
        batch, features = flat0.shape
        self.stats.lookups += batch
        rows: list[int] = []
        slots: list[int] = []
        if self._data is not None:
            self._check_features(features)
            oldest = None if self.max_age is None else self._step - self.max_age
            for row, key in enumerate(keys):
                slot = self._slots.get(key)
                if slot is None:
                    continue
                if oldest is not None and self._stored_at[slot] < oldest:
                    self._drop(key)
                    self.stats.stale += 1
                    continue
                self._slots.move_to_end(key)  # recently used
                rows.append(row)
                slots.append(slot)
        self.stats.hits += len(rows)
        self.stats.misses += batch - len(rows)
        hit = torch.zeros(batch, dtype=torch.bool, device=flat0.device)
        if not rows:
            return flat0, hit
        assert self._data is not None
        index = torch.tensor(slots, dtype=torch.long, device=self._data.device)
        cached = self._data.index_select(0, index).to(device=flat0.device, dtype=flat0.dtype)
        at = torch.tensor(rows, dtype=torch.long, device=flat0.device)
        hit[at] = True
        return flat0.index_copy(0, at, cached), hit

    def _store(self, keys: list[Hashable], flat: Tensor, mask: Tensor | None) -> None:
        batch, features = flat.shape
        if self._data is None:
            self._features = features
        self._check_features(features)
        chosen = range(batch) if mask is None else mask.nonzero().squeeze(1).tolist()
        rows: list[int] = []
        slots: list[int] = []
        for row in chosen:
            slot = self._slot_for(keys[row])
            if slot is None:
                continue
            rows.append(row)
            slots.append(slot)
        if not rows:
            return
        data = self._allocate(max(slots) + 1, flat)
        at = torch.tensor(rows, dtype=torch.long, device=flat.device)
        values = flat.index_select(0, at).to(device=data.device, dtype=data.dtype)
        data.index_copy_(0, torch.tensor(slots, dtype=torch.long, device=data.device), values)
        for slot in slots:
            self._stored_at[slot] = self._step
        self.stats.stored += len(rows)

    def _slot_for(self, key: Hashable) -> int | None:
        """The slot of ``key`` (made recently used), a new one, or ``None`` (full, no
        eviction)."""
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        if len(self._slots) >= self.max_entries:
            self._purge_stale()
        if len(self._slots) >= self.max_entries:
            if self.eviction == "none":
                return None
            _, slot = self._slots.popitem(last=False)  # the least recently used
            self.stats.evicted += 1
        elif self._free:
            slot = self._free.pop()
        else:
            slot = len(self._stored_at)
            self._stored_at.append(self._step)
        self._slots[key] = slot
        return slot

    def _purge_stale(self) -> None:
        if self.max_age is None:
            return
        oldest = self._step - self.max_age
        for key in [k for k, s in self._slots.items() if self._stored_at[s] < oldest]:
            self._drop(key)
            self.stats.stale += 1

    def _drop(self, key: Hashable) -> None:
        self._free.append(self._slots.pop(key))

    def _allocate(self, slots: int, like: Tensor) -> Tensor:
        """The storage, grown (doubling, up to ``max_entries`` rows) to hold ``slots`` rows."""
        data = self._data
        if data is not None and data.shape[0] >= slots:
            return data
        have = 0 if data is None else data.shape[0]
        rows = min(self.max_entries, max(slots, 2 * have, 16))
        device = self.device if self.device is not None else like.device
        dtype = self.dtype if self.dtype is not None else like.dtype
        grown = torch.empty(rows, like.shape[1], device=device, dtype=dtype)
        if data is not None:
            grown[:have] = data
        self._data = grown
        return grown

    def _check_features(self, features: int) -> None:
        if self._features is not None and features != self._features:
            raise ValueError(
                f"this FixedPointCache holds states of {self._features} features per sample, "
                f"got a state of {features}: one cache serves one state shape (use a cache per "
                "DEQ, or clear() it when the state's shape changes)"
            )

    # --- Saving ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The entries (in recency order, least recent first), their ages and the step count,
        for ``torch.save`` (loadable with ``weights_only=True`` when the keys are ints,
        floats, strings or tuples of them)."""
        slots = list(self._slots.values())
        data = None
        if self._data is not None and slots:
            data = self._data.index_select(
                0, torch.tensor(slots, dtype=torch.long, device=self._data.device)
            ).clone()
        return {
            "keys": list(self._slots.keys()),
            "states": data,
            "stored_at": [self._stored_at[s] for s in slots],
            "step": self._step,
            "features": self._features,
            "stats": asdict(self.stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the newest ``max_entries`` entries if it
        holds more; the storage ``device`` and ``dtype`` are this cache's)."""
        missing = {"keys", "states", "stored_at", "step", "features"} - set(state)
        if missing:
            raise KeyError(f"not a FixedPointCache state_dict: missing {sorted(missing)}")
        self.clear()
        self._step = int(state["step"])
        self._features = state["features"]
        self.stats = CacheStats(**state.get("stats", {}))
        keys = [_as_key(k) for k in state["keys"]]
        states, stored_at = state["states"], list(state["stored_at"])
        if not keys or states is None:
            return
        keep = slice(max(0, len(keys) - self.max_entries), len(keys))
        keys, stored_at, states = keys[keep], stored_at[keep], states[keep]
        data = self._allocate(len(keys), states)
        data[: len(keys)] = states.to(device=data.device, dtype=data.dtype)
        self._stored_at = stored_at
        self._slots = collections.OrderedDict((k, i) for i, k in enumerate(keys))


def _residual(f_flat: FlatMap, flat: Tensor) -> Tensor:
    """``(B,)`` :math:`\\|f(z) - z\\|` at ``flat``."""
    fz = f_flat(flat)
    out: Tensor = torch.linalg.vector_norm(fz.to(flat.dtype) - flat, dim=1)
    return out


def _as_key(key: Any) -> Hashable:
    """A key as the cache holds it: a tensor element as a Python number, a list as a tuple."""
    if isinstance(key, Tensor):
        return _as_key(key.item()) if key.dim() == 0 else tuple(_as_key(k) for k in key.tolist())
    if isinstance(key, list):
        return tuple(_as_key(k) for k in key)
    try:
        hash(key)
    except TypeError:
        raise TypeError(
            f"a FixedPointCache key must be hashable (an int, a str, a tuple), got {key!r}"
        ) from None
    return key  # type: ignore[no-any-return]


def _as_keys(keys: Any, batch: int) -> list[Hashable]:
    """One key per sample of a batch of ``batch``."""
    if isinstance(keys, Tensor):
        if keys.dim() == 0:
            raise ValueError("keys must hold one key per sample, got a 0-d tensor")
        values: list[Any] = keys.tolist()
    elif isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
        raise TypeError(
            f"keys must be a sequence with one key per sample (or a 1-D tensor of ints), got "
            f"{keys!r}"
        )
    else:
        values = list(keys)
    if len(values) != batch:
        raise ValueError(
            f"keys holds {len(values)} keys for a batch of {batch} samples; pass one key per "
            "sample (e.g. the dataset indices of the batch)"
        )
    return [_as_key(k) for k in values]
