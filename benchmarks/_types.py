"""The records every suite returns and the context every suite receives."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from ._env import now

T = TypeVar("T")


@dataclass
class Acceptance:
    """One acceptance figure: a measured value held against a target.

    Attributes:
        name: Short identifier, e.g. ``"solver_overhead_64px"``.
        description: What was measured, in words.
        value: The measured value.
        target: The target, written as a comparison (``"<= 1.15"``).
        passed: Whether the value meets the target.
        detail: How it was measured, and why it failed when it did.
    """

    name: str
    description: str
    value: float | None
    target: str
    passed: bool | None
    detail: str = ""


@dataclass
class SuiteResult:
    """What a suite returns.

    Attributes:
        name: The suite's command-line name.
        title: Human-readable title for the report.
        status: ``"ok"``, ``"skipped"`` or ``"error"``.
        reason: Why it was skipped or failed.
        config: The sizes, repeats and settings that were used.
        records: One flat dict per measurement (each carries ``recorded_at``).
        acceptance: Acceptance figures this suite measures.
        plots: File names of the PNG plots written to the output folder.
        notes: Free-text observations for the report (method, caveats, findings).
        tables: Markdown tables for the report, as ``(caption, header, rows)``.
    """

    name: str
    title: str
    status: str = "ok"
    reason: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    acceptance: list[Acceptance] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)

    def add(self, **record: Any) -> dict[str, Any]:
        """Append one measurement, stamped with the time it was recorded."""
        record = {**record, "recorded_at": now()}
        self.records.append(record)
        return record

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the whole result."""
        data = dataclasses.asdict(self)
        data["tables"] = [{"caption": c, "header": h, "rows": r} for c, h, r in self.tables]
        return data


def skipped(name: str, title: str, reason: str, **config: Any) -> SuiteResult:
    """A result for a suite that could not run here, with the reason recorded."""
    return SuiteResult(name=name, title=title, status="skipped", reason=reason, config=config)


@dataclass
class SuiteContext:
    """Everything a suite needs to know about the run.

    Attributes:
        device: Where tensors live.
        quick: Tiny sizes and few repeats (the smoke test).
        out: The output folder (plots are written here).
        progress: Whether to draw tqdm progress bars.
    """

    device: torch.device
    quick: bool
    out: Path
    progress: bool = True

    @property
    def is_cuda(self) -> bool:
        """Whether the run is on a CUDA device."""
        return self.device.type == "cuda"

    def repeats(self, full: int, quick: int = 1) -> int:
        """The number of timed repeats for this run."""
        return quick if self.quick else full

    def bar(self, items: Iterable[T], desc: str) -> Iterable[T]:
        """Iterate ``items`` under a tqdm progress bar (unless progress is off)."""
        seq = list(items)
        return tqdm(seq, desc=desc, leave=False, disable=not self.progress, dynamic_ncols=True)
