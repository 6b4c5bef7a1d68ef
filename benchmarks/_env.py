"""The machine, library versions and date recorded with every result."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parent.parent


def now() -> str:
    """The current UTC time in ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    """Run a read-only git command in the repository (``None`` when git is unavailable)."""
    try:
        return subprocess.run(
            ["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    out = _git("rev-parse", "--short", "HEAD")
    return (out.stdout.strip() or None) if out is not None else None


def _library_dirty() -> bool | None:
    """Whether ``implicitlayers/`` has uncommitted changes (read-only ``git status``)."""
    out = _git("status", "--porcelain", "--", "implicitlayers")
    if out is None or out.returncode != 0:
        return None
    return bool(out.stdout.strip())


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Describe the machine and software the results were measured on.

    Args:
        device: The device the benchmarks run on.

    Returns:
        A JSON-serialisable dict: date, host, CPU, core and thread counts, Python, torch,
        implicitlayers (version and git commit), torchdeq when installed, and the GPU when
        the device is CUDA.
    """
    import implicitlayers

    env: dict[str, Any] = {
        "date": now(),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "implicitlayers": implicitlayers.__version__,
        "git_commit": _git_commit(),
        "implicitlayers_uncommitted_changes": _library_dirty(),
        "torchdeq": _version("torchdeq"),
        "numpy": _version("numpy"),
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    return env
