"""A run's state on disk: atomic ``weights_only`` checkpoints, the JSON-lines log, and the
stop flag that Ctrl-C and SIGTERM raise.

A checkpoint is a plain ``dict`` of tensors, containers, numbers and strings, written to a
temporary file and moved into place: an interruption never leaves a truncated file. A signal
only sets the flag; the training loop checks it after every step, saves ``last.pt`` and
returns, and ``--resume`` continues from exactly that step. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from implicitlayers import SolverResult

from .cli import SettingsError

FORMAT = "implicitlayers-deblur/2"
logger = logging.getLogger("deblur")


@dataclass
class Progress:
    """Where a run stands; in every checkpoint, so that ``--resume`` continues exactly."""

    phase: str = "pretrain"  # then "deq", then "done"
    pretrain_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_val_psnr: float | None = None
    best_epoch: int | None = None
    log_lines: int = 0
    seconds: float = 0.0


def resumed(
    out: Path, resume: bool, overrides: dict[str, Any], resumable: tuple[str, ...]
) -> dict[str, Any] | None:
    """With ``resume``: the checkpoint ``out/last.pt`` to continue from; of the explicit
    ``overrides``, those outside ``resumable`` must equal its settings (a different ``--depth``
    would not fit the weights). Without: ``None``, refusing to overwrite an unfinished run."""
    saved = load(out / "last.pt") if (out / "last.pt").exists() else None
    if saved is None or not resume:
        if saved is not None and saved["progress"]["phase"] != "done":
            raise SettingsError(
                f"--output-dir {out} holds an unfinished run (last.pt); pass "
                "--resume to continue it, or choose another --output-dir"
            )
        return None
    for key, value in overrides.items():
        if key not in resumable and saved["settings"][key] != value:
            flag, old = "--" + key.replace("_", "-"), saved["settings"][key]
            raise SettingsError(
                f"{flag} {value!r} differs from the checkpoint being resumed ({old!r}); "
                f"drop {flag} or start a new --output-dir"
            )
    return saved


def save(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` ``state`` to ``path`` atomically (temporary file, fsync, replace)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint of this example with ``weights_only=True``."""
    if not Path(path).is_file():
        raise SettingsError(
            f"--checkpoint {str(path)!r} does not exist; train first (train writes best.pt "
            "and last.pt into --output-dir)"
        )
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SettingsError(f"--checkpoint {str(path)!r} is not a {FORMAT} checkpoint")
    state["settings"].setdefault("anchor", 0.0)  # written before the anchor term existed
    return state


def read_log(path: Path, keep: int | None = None) -> list[dict[str, Any]]:
    """The log's records; with ``keep``, cut the file to its first ``keep`` lines first (what
    an interrupted run wrote after its last checkpoint)."""
    lines = path.read_text().splitlines() if path.exists() else []
    if keep is not None:
        lines = lines[:keep]
        path.write_text("".join(line + "\n" for line in lines))
    return [json.loads(line) for line in lines]


@dataclass
class Run:
    """A training run's folder, written by the main process alone: ``log.jsonl`` (first cut to
    the lines the last checkpoint had seen) and checkpoints of the ``objects``' state dicts with
    :class:`Progress` and ``meta``. ``start``: a checkpoint, or part of one, to load."""

    out: Path
    objects: dict[str, Any]
    meta: dict[str, Any]
    main: bool
    start: dict[str, Any]

    def __post_init__(self) -> None:
        for key in self.objects.keys() & self.start.keys():
            self.objects[key].load_state_dict(self.start[key])
        self.progress = Progress(**self.start.get("progress", {}))
        self.began = time.perf_counter() - self.progress.seconds  # resumed runs keep counting
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            read_log(self.out / "log.jsonl", keep=self.progress.log_lines)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` with a ``time`` stamp (NaN and infinities as ``null``)."""
        self.progress.log_lines += 1
        if self.main:
            finite = {
                k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in record.items()
            }
            with (self.out / "log.jsonl").open("a") as handle:
                handle.write(json.dumps({**finite, "time": time.time()}) + "\n")

    def save(self, name: str, metrics: dict[str, Any] | None = None) -> None:
        """Write the checkpoint ``out / name`` (``metrics``: the last validation's)."""
        self.progress.seconds = time.perf_counter() - self.began
        if self.main:
            saved = {k: obj.state_dict() for k, obj in self.objects.items()} | self.meta
            saved |= {"progress": asdict(self.progress), "metrics": metrics or {}}
            save(saved, self.out / name)

    def log_step(
        self, forward: SolverResult, backward: SolverResult | None, scalars: dict[str, Any]
    ) -> None:
        """Log a DEQ training step: its ``scalars``, the forward solve's iterations (mean, max)
        and converged fraction, and the adjoint solve's (``None``: the rule solves none)."""
        p, steps = self.progress, forward.n_steps.float()
        record = {"event": "train", "epoch": p.epoch, "step": p.global_step, **scalars}
        record |= {"fwd_iters_mean": steps.mean().item(), "fwd_iters_max": int(steps.max())}
        record["converged"] = forward.converged.float().mean().item()
        record["backward_iters"] = backward and backward.n_steps.float().mean().item()
        record["backward_converged"] = backward and backward.converged.float().mean().item()
        self.log(record)

    def validated(self, metrics: dict[str, Any]) -> None:
        """Log a validation's ``metrics`` (to ``log.jsonl`` and the console) and save ``last.pt``,
        and ``best.pt`` too when its DE-GRAD PSNR is the best yet."""
        p, psnr = self.progress, metrics["degrad/psnr_standard"]
        best = p.best_val_psnr is None or psnr > p.best_val_psnr
        if best:
            p.best_val_psnr, p.best_epoch = psnr, p.epoch
        self.log({"event": "val", "epoch": p.epoch, "step": p.global_step, **metrics})
        cg, iterations = metrics["tikhonov_cg/psnr_standard"], metrics["iterations"]
        logger.info(
            f"epoch {p.epoch} validation: PSNR {psnr:.2f} dB (Tikhonov-CG {cg:.2f}), "
            f"{iterations:.1f} forward iterations per image{' [best]' * best}"
        )
        for name in ("best.pt", "last.pt") if best else ("last.pt",):
            self.save(name, metrics)

    def after_step(
        self, stop: StopFlag, any_process: Callable[[bool], bool], max_steps: int | None, every: int
    ) -> bool:
        """After a step: ``True``, with ``last.pt`` saved, when a stop was asked for on any
        process or ``max_steps`` DEQ steps are done; else save ``last.pt`` every ``every`` steps."""
        p = self.progress
        if max_steps is not None and p.global_step >= max_steps and not stop.reason:
            stop.reason = f"--max-steps {max_steps} reached"
        step = p.pretrain_step if p.phase == "pretrain" else p.global_step
        if any_process(bool(stop.reason)):
            self.save("last.pt")
            why = stop.reason or "by another process"
            logger.info(f"stopped ({why}) at step {step}; continue with the same command, --resume")
            return True
        if step % every == 0:
            self.save("last.pt")
        return False


@dataclass
class StopFlag:
    """Why to stop (empty: keep going): set by a signal, ``--max-steps`` or code (tests, a
    time budget); the training loop then saves ``last.pt`` after the current step and returns."""

    reason: str = ""


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Route SIGINT and SIGTERM to ``flag`` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.reason:
            raise KeyboardInterrupt  # a second signal: stop waiting for the checkpoint
        flag.reason = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
