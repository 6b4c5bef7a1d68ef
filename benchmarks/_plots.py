"""matplotlib helpers (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # (after choosing the backend)


def figure(ncols: int = 1, *, width: float = 5.0, height: float = 3.6) -> tuple[Any, Any]:
    """A figure with ``ncols`` axes side by side, sized for a report."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def save(fig: Any, out: Path, name: str) -> str:
    """Write ``fig`` to ``out/name`` as a PNG, close it, and return ``name``."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name
