"""Console messages that coexist with tqdm bars, and the JSON-lines training log."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = ["JsonlLog", "TqdmHandler", "configure_console", "read_jsonl"]

logger = logging.getLogger("deblur")


class TqdmHandler(logging.Handler):
    """Write log records through ``tqdm.write`` so progress bars are not torn apart."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def configure_console(quiet: bool = False) -> None:
    """Send the example's ``deblur`` logger to the console (once)."""
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class JsonlLog:
    """An append-only JSON-lines log (one object per line), written by rank 0 only.

    Args:
        path: The log file.
        enabled: ``False`` on ranks other than 0: every method is then a no-op.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.lines = 0
        if enabled and path.exists():
            self.lines = len(path.read_text().splitlines())

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` with a wall-clock ``time`` stamp."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(_clean({**record, "time": time.time()})) + "\n")
        self.lines += 1

    def truncate(self, lines: int) -> None:
        """Keep only the first ``lines`` records (drop what a crash wrote after a checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = self.path.read_text().splitlines()[:lines]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.lines = len(kept)

    def reset(self) -> None:
        """Start an empty log (a new run in the same folder)."""
        if self.enabled and self.path.exists():
            self.path.unlink()
        self.lines = 0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (an empty list when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
