r"""Training DE-GRAD once per backward rule for the comparison, with measured costs.

Every rule starts from the same pretrained denoiser (one pretraining run, its checkpoint
loaded into each rule's :class:`~deblur.training.Trainer`), the same seed, the same batches and
noise, the same Adam optimiser and learning-rate schedule and the same number of epochs; only
the backward rule differs. The rules are trained *interleaved*, one epoch of each in turn
(each session resumes the rule's ``last.pt`` and stops at the end of its epoch through
``max_steps``, a path the example's resume tests prove exact), so that a change in machine
load during the run (the CPU is shared) falls on every rule alike.

Per training step, :class:`CompareTrainer` records in ``costs.jsonl``:

* ``vjps``: vector-Jacobian products through the DE-GRAD map ``f``, counted by wrapping the
  rule (:class:`CountingBackward`) plus the one VJP that carries the gradient to the
  parameters (JFB: 1; Neumann with ``k`` terms: ``k + 1``; implicit: ``1 +`` the adjoint
  solve's ``n_f_evals``, which is recorded alongside as a cross-check);
* ``saved_tensor_bytes``: bytes of the distinct storages autograd saved for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks``), the part of memory that grows with the graph;
* ``peak_mib`` and ``step_mib``: the step's memory high-water mark and its excess over the
  memory in use when the step began. On the CPU this is the resident set size, with the
  kernel's high-water mark reset before every step (``/proc/self/clear_refs``, Linux) so that
  each step is measured alone; on CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import implicitlayers as il

from . import distributed
from .checkpoint import load_checkpoint
from .config import RunConfig
from .data import DataSplits
from .stopping import StopFlag
from .training import Trainer

__all__ = [
    "CallCount",
    "CompareTrainer",
    "CountingBackward",
    "Rule",
    "StepMemory",
    "parse_rules",
    "pretrain_denoiser",
    "saved_tensor_bytes",
    "train_rules",
]

RULE_NAMES = ("implicit", "neumann", "jfb")

logger = logging.getLogger("deblur")


class _HideResumeMessages(logging.Filter):
    """Drop the trainer's stop/resume notices: here every epoch ends in one by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("stopped (", "resumed "))


@dataclass(frozen=True)
class Rule:
    """One backward rule of the comparison.

    Attributes:
        key: Short identifier, also the rule's folder name (``implicit``, ``neumann5``, ``jfb``).
        label: The row name in tables and figures.
        backward: The example's ``--backward`` value.
        terms: Neumann terms ``k`` (ignored by the other rules).
    """

    key: str
    label: str
    backward: str
    terms: int = 0

    def config(self, base: RunConfig, max_steps: int | None) -> RunConfig:
        """``base`` with this rule's backward settings and the given step limit."""
        config = dataclasses.replace(base, backward=self.backward, max_steps=max_steps)
        if self.backward == "neumann":
            config.neumann_terms = self.terms
        return config


def parse_rules(names: list[str], neumann_terms: list[int]) -> list[Rule]:
    """The rules to train, in the given order; ``neumann`` expands to one rule per ``k``.

    Raises:
        ValueError: For an unknown name, or ``neumann`` without terms.
    """
    rules: list[Rule] = []
    for name in names:
        if name == "implicit":
            rules.append(Rule("implicit", "DEQ, implicit differentiation", "implicit"))
        elif name == "jfb":
            rules.append(Rule("jfb", "DEQ, JFB", "jfb"))
        elif name == "neumann":
            if not neumann_terms:
                raise ValueError("--rules neumann needs --neumann-terms, e.g. --neumann-terms 1 5")
            for k in neumann_terms:
                if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                    raise ValueError(f"--neumann-terms must be integers >= 0, got {k!r}")
                rules.append(Rule(f"neumann{k}", f"DEQ, Neumann (k={k})", "neumann", k))
        else:
            raise ValueError(f"--rules must name some of {', '.join(RULE_NAMES)}; got {name!r}")
    keys = [r.key for r in rules]
    if len(set(keys)) != len(keys):
        raise ValueError(f"each rule may be named once, got {keys}")
    return rules


class CallCount:
    """A mutable counter shared by a :class:`CountingBackward` and its owner.

    Attributes:
        n: Calls counted so far (reset it by assignment).
    """

    def __init__(self) -> None:
        self.n = 0


@dataclass(frozen=True, kw_only=True, repr=False)
class CountingBackward(il.AbstractBackward):
    r"""Any backward rule, with its vector-Jacobian products counted.

    The adjoint map :math:`g \mapsto u` is the wrapped rule's; every call of the ``vjp`` it
    receives adds one to ``counter.n``.

    Args:
        inner: The rule being measured.
        counter: Where the count goes.
    """

    inner: il.AbstractBackward
    counter: CallCount

    @property
    def uses_vjp(self) -> bool:
        return self.inner.uses_vjp

    def adjoint(self, vjp: Any, grad: Tensor) -> tuple[Tensor, il.SolverResult | None]:
        def counted(v: Tensor) -> Tensor:
            self.counter.n += 1
            out: Tensor = vjp(v)
            return out

        return self.inner.adjoint(counted, grad)


@contextmanager
def saved_tensor_bytes() -> Iterator[list[int]]:
    """Count the bytes of the distinct storages autograd saves inside the block.

    Yields:
        A one-element list whose entry is the running total.
    """
    total = [0]
    seen: set[tuple[int, str]] = set()

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), str(t.device))
            if key not in seen:
                seen.add(key)
                total[0] += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
            total[0] += t.element_size() * t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        return None
    return None  # pragma: no cover


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # pragma: no cover - not Linux, or not permitted
        return False
    return True


class StepMemory:
    """The memory high-water mark of one training step (see the module docstring).

    Args:
        device: The training device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base_mib = 0.0
        self.resettable = True

    @property
    def method(self) -> str:
        """What is measured, in words."""
        if self.device.type == "cuda":
            return "CUDA max_memory_allocated per step (reset before each step)"
        if self.resettable:
            return "process RSS high-water mark per step (VmHWM, reset before each step)"
        return "process RSS high-water mark (ru_maxrss; could not be reset per step)"

    def start(self) -> None:
        """Mark the beginning of a step."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mib = torch.cuda.memory_allocated(self.device) / 2**20
            return
        self.resettable = self.resettable and _reset_rss_peak()
        self.base_mib = (_proc_status_kib("VmRSS") or 0) / 1024

    def stop(self) -> tuple[float, float]:
        """``(peak, peak above the start)`` in MiB since :meth:`start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            hwm = _proc_status_kib("VmHWM")
            if hwm is None:  # pragma: no cover - not Linux
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = hwm / 1024
        return peak, max(peak - self.base_mib, 0.0)


class CompareTrainer(Trainer):
    """The example's trainer, recording each DEQ step's backward cost and memory.

    Args:
        config: The run configuration (its ``backward`` is the rule being trained).
        data: The splits (the test split is never read here).
        out_dir: The rule's folder (``log.jsonl``, ``costs.jsonl``, ``last.pt``, ``best.pt``).
        ctx: The process context.
        checkpoint: The checkpoint to continue from (the shared pretrained one at first).
        progress_bars: Show tqdm bars.
    """

    def __init__(
        self,
        config: RunConfig,
        data: DataSplits,
        out_dir: Path,
        ctx: distributed.Context,
        checkpoint: dict[str, Any] | None,
        *,
        progress_bars: bool,
    ) -> None:
        super().__init__(config, data, out_dir, ctx, checkpoint, StopFlag(), progress_bars)
        self.vjp_count = CallCount()
        deq = self.model.deq
        deq.backward = CountingBackward(inner=deq.backward, counter=self.vjp_count)
        self.memory = StepMemory(ctx.device)
        self.costs_path = out_dir / "costs.jsonl"

    def pretrain_only(self, name: str) -> Path:
        """Run phase 1 (denoiser pretraining) alone and save it as ``out_dir/name``."""
        if not self._pretrain():
            raise RuntimeError(f"pretraining stopped early: {self.stop.reason}")
        self.progress.phase = "deq"
        self.save(name)
        return self.out_dir / name

    def _deq_step(
        self, net: nn.Module, index: Tensor, x: Tensor, epoch: int, total: int
    ) -> dict[str, Any]:
        self.vjp_count.n = 0
        self.model.deq.last_backward_result = None
        self.memory.start()
        with saved_tensor_bytes() as saved:
            record = super()._deq_step(net, index, x, epoch, total)
        peak, above = self.memory.stop()
        adjoint = self.model.deq.last_backward_result
        vjps = self.vjp_count.n + 1  # + the VJP that carries u to the parameters
        cost = {
            "epoch": epoch,
            "step": record["step"],
            "sec_per_step": record["sec_per_step"],
            "fwd_iters_mean": record["fwd_iters_mean"],
            "vjps": vjps,
            "adjoint_n_f_evals": None if adjoint is None else int(adjoint.n_f_evals),
            "adjoint_converged": None
            if adjoint is None
            else float(adjoint.converged.float().mean()),
            "saved_tensor_bytes": saved[0],
            "peak_mib": peak,
            "step_mib": above,
        }
        with self.costs_path.open("a") as handle:
            handle.write(json.dumps(cost) + "\n")
        return record


def pretrain_denoiser(
    config: RunConfig,
    data: DataSplits,
    out_dir: Path,
    ctx: distributed.Context,
    *,
    progress_bars: bool,
) -> tuple[dict[str, Any], nn.Module]:
    """Pretrain the residual denoiser once (the flagship's phase 1).

    Returns:
        ``(checkpoint, denoiser)``: the checkpoint every rule starts from, and the pretrained
        denoiser :math:`D` in eval mode (the Plug-and-Play prior).
    """
    trainer = CompareTrainer(config, data, out_dir, ctx, None, progress_bars=progress_bars)
    path = trainer.pretrain_only("pretrained.pt")
    checkpoint = load_checkpoint(path, map_location=ctx.device)
    checkpoint["progress"]["log_lines"] = 0  # each rule's log starts empty
    checkpoint["progress"]["seconds"] = 0.0
    denoiser = trainer.model.denoiser.eval()
    for p in denoiser.parameters():
        p.requires_grad_(False)
    return checkpoint, denoiser


def steps_per_epoch(config: RunConfig, data: DataSplits) -> int:
    """Optimiser steps in one epoch (one process: every image, last batch possibly short)."""
    n = len(data.train)  # type: ignore[arg-type]
    return math.ceil(n / config.batch_size)


def train_rules(
    config: RunConfig,
    data: DataSplits,
    rules: list[Rule],
    out_dir: Path,
    ctx: distributed.Context,
    pretrained: dict[str, Any],
    *,
    progress_bars: bool,
) -> dict[str, Path]:
    """Train every rule from ``pretrained`` for ``config.epochs`` epochs, interleaved.

    Args:
        config: The shared configuration.
        data: The splits.
        rules: The rules to train.
        out_dir: Each rule gets ``out_dir/<rule.key>``.
        ctx: The process context.
        pretrained: The checkpoint from :func:`pretrain_denoiser`.
        progress_bars: Show tqdm bars.

    Returns:
        Each rule's folder, by key.
    """
    steps = steps_per_epoch(config, data)
    folders = {rule.key: out_dir / rule.key for rule in rules}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        for stale in ("log.jsonl", "costs.jsonl", "last.pt", "best.pt"):
            (folder / stale).unlink(missing_ok=True)
    sessions = max(config.epochs, 1)
    hide = _HideResumeMessages()
    logger.addFilter(hide)
    try:
        for session in range(1, sessions + 1):
            limit = session * steps if session < sessions else None
            for rule in rules:
                logger.info("training %s: epoch %d of %d", rule.label, session, config.epochs)
                folder = folders[rule.key]
                checkpoint = pretrained if session == 1 else load_checkpoint(folder / "last.pt")
                trainer = CompareTrainer(
                    rule.config(config, limit),
                    data,
                    folder,
                    ctx,
                    checkpoint,
                    progress_bars=progress_bars,
                )
                trainer.run()
    finally:
        logger.removeFilter(hide)
    return folders
