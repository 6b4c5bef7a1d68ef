"""Writing results: one JSON file per suite, ``results.json`` and a Markdown report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ._types import SuiteResult


def _clean(value: Any) -> Any:
    """Make floats JSON-safe (NaN and Inf become strings) and tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(_clean(data), indent=2) + "\n", encoding="utf-8")


def fmt(value: Any, digits: int = 3) -> str:
    """Format a number for a table: significant digits, thousands kept readable."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def mib(nbytes: float | None) -> str:
    """Bytes as MiB for a table."""
    return "-" if nbytes is None else f"{nbytes / 2**20:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def acceptance_table(results: list[SuiteResult]) -> str:
    """All acceptance figures of a run in one table."""
    rows = []
    for result in results:
        for acc in result.acceptance:
            verdict = {True: "**met**", False: "**missed**", None: "n/a"}[acc.passed]
            rows.append(
                [result.name, acc.description, fmt(acc.value), acc.target, verdict, acc.detail]
            )
    if not rows:
        return "_No acceptance figures were measured in this run._"
    return table(["suite", "figure", "measured", "target", "verdict", "how"], rows)


def markdown(env: dict[str, Any], command: str, results: list[SuiteResult]) -> str:
    """The full Markdown report of one run.

    Args:
        env: The environment dict (machine, versions, date).
        command: The command line that produced the run.
        results: Every suite's result, in run order.
    """
    parts = [
        "# implicitlayers benchmark report",
        "",
        f"- Command: `{command}`",
        f"- Date (UTC): {env['date']}",
        f"- Device: {env['device']}"
        + (f" ({env['gpu']})" if "gpu" in env else f" ({env['cpu']}, {env['cpu_count']} cores)"),
        f"- torch {env['torch']}, implicitlayers {env['implicitlayers']}"
        f" (commit {env.get('git_commit') or 'unknown'}), torchdeq {env.get('torchdeq') or '-'}",
        f"- torch threads: {env['torch_threads']}",
        "",
        "Timings are medians of repeats after warm-up; ratios compare measurements taken in "
        "the same run. The CPU machine may be shared with other jobs, so absolute times are "
        "noisy; prefer the ratios.",
        "",
        "## Acceptance figures",
        "",
        acceptance_table(results),
        "",
    ]
    for result in results:
        parts += [f"## {result.title} (`{result.name}`)", ""]
        if result.status != "ok":
            parts += [f"**{result.status}**: {result.reason}", ""]
            continue
        for note in result.notes:
            parts += [note, ""]
        for caption, header, rows in result.tables:
            parts += [f"**{caption}**", "", table(header, rows), ""]
        for plot in result.plots:
            parts += [f"![{plot}]({plot})", ""]
    return "\n".join(parts)
