"""Where a run stands, and how a run is resumed from its ``last.pt``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .config import ConfigError, RunConfig

__all__ = ["RESUMABLE", "Progress", "resolve_resume"]

logger = logging.getLogger("deblur")


#: Settings that may change when a run is resumed; anything else must match the checkpoint.
RESUMABLE = frozenset(
    {"epochs", "max_steps", "checkpoint_every", "workers", "device", "eval_batch_size"}
    | {"budgets", "figure_samples", "test_limit", "test_offset"}
)


@dataclass
class Progress:
    """Where a run stands; stored in every checkpoint."""

    phase: str = "pretrain"
    pretrain_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_val_psnr: float | None = None
    best_epoch: int | None = None
    log_lines: int = 0
    seconds: float = 0.0


def resolve_resume(
    config: RunConfig, overrides: dict[str, Any], out_dir: Path, resume: bool
) -> tuple[RunConfig, dict[str, Any] | None]:
    """Decide between a fresh run and resuming ``out_dir/last.pt``.

    On resume the checkpoint's configuration is used; explicit flags may change only the
    :data:`RESUMABLE` settings (a different ``--depth`` would not match the weights).

    Returns:
        ``(config, checkpoint)``; ``checkpoint`` is ``None`` for a fresh run.

    Raises:
        ConfigError: For a conflicting flag, or an unfinished run without ``--resume``.
    """
    last = out_dir / "last.pt"
    if not last.exists():
        if resume:
            logger.info("no checkpoint to resume in %s; starting a new run", out_dir)
        return config, None
    checkpoint = load_checkpoint(last)
    if not resume:
        if checkpoint["progress"]["phase"] != "done":
            raise ConfigError(
                f"--output-dir {out_dir} holds an unfinished run (last.pt); pass --resume to "
                "continue it, or choose another --output-dir"
            )
        logger.info("starting a new run in %s (replacing the finished run there)", out_dir)
        return config, None
    saved = RunConfig.from_dict(checkpoint["config"])
    saved.max_steps = None  # a limit of the interrupted invocation, not of the run
    for key, value in overrides.items():
        if key in RESUMABLE:
            setattr(saved, key, value)
        elif getattr(saved, key, value) != value:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"{flag} {value!r} differs from the checkpoint being resumed "
                f"({getattr(saved, key)!r}); drop {flag} or start a new --output-dir"
            )
    saved.validate()
    return saved, checkpoint
