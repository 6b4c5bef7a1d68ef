"""Atomic checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint is a plain ``dict`` of tensors, dicts, lists, numbers and strings:

* ``format``: :data:`FORMAT`.
* ``config``: the run's :class:`~deblur.config.RunConfig` as a plain dict.
* ``model``: the :class:`~deblur.model.DeGrad` ``state_dict``.
* ``optimizer`` / ``pretrain_optimizer``: optimizer ``state_dict`` s (``None`` in exports).
* ``progress``: where training stands (phase, steps, epoch, best validation PSNR, ...).
* ``metrics``: the latest validation metrics.

It is written to a temporary file in the same folder and moved into place with
:func:`os.replace`, so a crash or Ctrl-C mid-write never leaves a truncated checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, RunConfig
from .model import DeGrad

__all__ = ["FORMAT", "load_checkpoint", "load_model", "save_atomic"]

FORMAT = "implicitlayers-deblur/1"


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by this example (safely: ``weights_only=True``).

    Raises:
        ConfigError: When the file is missing or is not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--checkpoint {str(path)!r} does not exist; train first (the train command "
            "writes best.pt and last.pt into --output-dir)"
        )
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ConfigError(
            f"--checkpoint {str(path)!r} is not a checkpoint of this example "
            f"(expected format {FORMAT!r})"
        )
    return checkpoint


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[DeGrad, RunConfig, dict[str, Any]]:
    """Rebuild the trained model of a checkpoint, in eval mode.

    Returns:
        ``(model, config, checkpoint)``.
    """
    checkpoint = load_checkpoint(path, map_location=device)
    config = RunConfig.from_dict(checkpoint["config"])
    model = DeGrad(config).to(device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, config, checkpoint
