r"""Training: pretrain :math:`D` as a residual denoiser, then train the DEQ end to end.

Phase 1 (``pretrain``): :math:`D(x + \sigma e) \approx x` with :math:`\sigma` uniform in
``[0, pretrain_sigma_max]``, batch norm in training mode. :math:`D` is the denoiser of
:math:`R = I - D` in both cells: the residual DnCNN :math:`x - N(x)` (standard) or the
:class:`~implicitlayers.imaging.ContractiveDnCNN` itself (contractive; its power iterations
advance on every training-mode forward).

Phase 2 (``deq``): minimise :math:`\|x^\star(d) - x\|^2` where :math:`x^\star(d)` is the
DE-GRAD fixed point, found by the configured solver (per-sample stopping) and
differentiated by the configured backward rule (JFB by default). The model stays in eval
mode (running batch-norm statistics, frozen spectral-norm estimates while the solver
iterates; see :meth:`~deblur.model.DeGrad.prepare_deq_step`). Validation every epoch;
``best.pt`` (by validation PSNR) and ``last.pt`` are written atomically.

Everything random is a function of the seed and of the step or image, so a run is
deterministic on the CPU and ``--resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from implicitlayers.imaging import psnr_paper, psnr_standard

from . import distributed
from .checkpoint import FORMAT, save_atomic
from .config import RunConfig
from .data import DataSplits, batches_loader, chunks
from .measure import flip_batch, measure, noise_seed, randn_per_image
from .model import DeGrad, cg_baseline
from .resume import Progress
from .runlog import JsonlLog
from .stopping import StopFlag

__all__ = ["TrainResult", "Trainer", "cosine_lr"]

logger = logging.getLogger("deblur")


@dataclass
class TrainResult:
    """What :meth:`Trainer.run` returns.

    Attributes:
        finished: ``False`` when the run stopped early (signal or ``--max-steps``).
        progress: The final :class:`Progress`.
        best: Path of ``best.pt`` (may not exist if no epoch finished).
        last: Path of ``last.pt``.
    """

    finished: bool
    progress: Progress
    best: Path
    last: Path


def cosine_lr(config: RunConfig, step: int, total: int) -> float:
    """Cosine decay from ``lr`` to ``lr * min_lr_ratio`` over ``total`` steps."""
    ratio = min(step / max(total, 1), 1.0)
    scale = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * ratio))
    return config.lr * scale


class Trainer:
    """Runs both training phases, with validation, logging, checkpoints and resume.

    Args:
        config: The run configuration.
        data: Train/validation/test datasets.
        out_dir: Where ``log.jsonl``, ``best.pt`` and ``last.pt`` go (rank 0 writes).
        ctx: The process context from :func:`deblur.distributed.setup`.
        checkpoint: A checkpoint to resume from, or ``None``.
        stop: The flag that signals (or tests) raise to stop cleanly.
        progress_bars: Show tqdm bars (rank 0 only).
    """

    def __init__(
        self,
        config: RunConfig,
        data: DataSplits,
        out_dir: Path,
        ctx: distributed.Context,
        checkpoint: dict[str, Any] | None = None,
        stop: StopFlag | None = None,
        progress_bars: bool = True,
    ) -> None:
        self.config = config
        self.data = data
        self.out_dir = out_dir
        self.ctx = ctx
        self.stop = stop or StopFlag()
        self.bars = progress_bars and ctx.is_main
        torch.manual_seed(config.seed)
        self.model = DeGrad(config).to(ctx.device)
        self.pre_opt = torch.optim.Adam(self.model.denoiser.parameters(), lr=config.pretrain_lr)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.progress = Progress()
        self.log = JsonlLog(out_dir / "log.jsonl", enabled=ctx.is_main)
        self.val_cg_psnr: float | None = None
        if checkpoint is None:
            self.log.reset()
        else:
            self.model.load_state_dict(checkpoint["model"])
            self.pre_opt.load_state_dict(checkpoint["pretrain_optimizer"])
            self.opt.load_state_dict(checkpoint["optimizer"])
            self.progress = Progress(**checkpoint["progress"])
            self.val_cg_psnr = checkpoint.get("val_cg_psnr")
            self.log.truncate(self.progress.log_lines)
            logger.info(
                "resumed %s at phase %s, epoch %d, step %d",
                out_dir / "last.pt",
                self.progress.phase,
                self.progress.epoch,
                self.progress.global_step,
            )
        self.started = time.perf_counter()
        self.seconds_before = self.progress.seconds

    # ----------------------------------------------------------------- checkpoints
    def _state(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        self.progress.seconds = self.seconds_before + time.perf_counter() - self.started
        self.progress.log_lines = self.log.lines
        return {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "pretrain_optimizer": self.pre_opt.state_dict(),
            "optimizer": self.opt.state_dict(),
            "progress": dataclasses.asdict(self.progress),
            "metrics": metrics or {},
            "val_cg_psnr": self.val_cg_psnr,
            "data": self.data.description,
        }

    def save(self, name: str, metrics: dict[str, Any] | None = None) -> None:
        """Write ``out_dir/name`` atomically (rank 0 only)."""
        if self.ctx.is_main:
            save_atomic(self._state(metrics), self.out_dir / name)

    def _should_stop(self) -> bool:
        limit = self.config.max_steps
        reached = limit is not None and self.progress.global_step >= limit
        if reached and not self.stop.requested:
            self.stop.request(f"--max-steps {limit} reached")
        return distributed.any_rank(self.ctx, self.stop.requested)

    def _stopped(self) -> TrainResult:
        self.save("last.pt")
        logger.info(
            "stopped (%s) at phase %s, epoch %d, step %d; checkpoint %s. Continue with the "
            "same command plus --resume.",
            self.stop.reason or "another process asked",
            self.progress.phase,
            self.progress.epoch,
            self.progress.global_step,
            self.out_dir / "last.pt",
        )
        return self._result(finished=False)

    def _result(self, finished: bool) -> TrainResult:
        return TrainResult(
            finished, self.progress, self.out_dir / "best.pt", self.out_dir / "last.pt"
        )

    # ----------------------------------------------------------------- driver
    def run(self) -> TrainResult:
        """Train from wherever the run stands to the end (or to a stop request)."""
        if self.progress.phase == "pretrain":
            if not self._pretrain():
                return self._stopped()
            self.progress.phase = "deq"
            self.save("last.pt")
        if self.progress.phase == "deq":
            if not self._train_deq():
                return self._stopped()
            self.progress.phase = "done"
            self.save("last.pt")
        return self._result(finished=True)

    # ----------------------------------------------------------------- phase 1
    def _pretrain_batches(self) -> list[list[int]]:
        """Random index batches for every pretraining step (this rank's share)."""
        config, ctx = self.config, self.ctx
        n = len(self.data.train)  # type: ignore[arg-type]
        size = config.batch_size * ctx.world_size
        generator = torch.Generator().manual_seed(config.seed)
        batches = []
        for _ in range(config.pretrain_steps):
            draw = torch.randint(n, (size,), generator=generator).tolist()
            batches.append(draw[ctx.rank :: ctx.world_size])
        return batches

    def _pretrain(self) -> bool:
        config, ctx = self.config, self.ctx
        start = self.progress.pretrain_step
        if start >= config.pretrain_steps:
            return True
        denoiser: nn.Module = self.model.denoiser
        denoiser.train()
        net = (
            DistributedDataParallel(denoiser, device_ids=_ids(ctx)) if ctx.distributed else denoiser
        )
        loader = batches_loader(self.data.train, self._pretrain_batches()[start:], config.workers)
        bar = tqdm(
            total=config.pretrain_steps,
            initial=start,
            desc="pretrain denoiser",
            disable=not self.bars,
            dynamic_ncols=True,
        )
        for index, x in loader:
            step = self.progress.pretrain_step
            tic = time.perf_counter()
            seeds = [noise_seed(config.seed, "pretrain", step, int(i)) for i in index]
            x = flip_batch(x, seeds).to(ctx.device)
            noise = randn_per_image(x.shape[1:], [s ^ 0x9E3779B9 for s in seeds]).to(x)
            sigma = torch.tensor([config.pretrain_sigma_max * _unit(s) for s in seeds]).to(x)
            noisy = x + sigma[:, None, None, None] * noise
            loss = F.mse_loss(net(noisy), x)
            self.pre_opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(denoiser.parameters(), config.grad_clip)
            self.pre_opt.step()
            self.progress.pretrain_step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2e}")
            if self.progress.pretrain_step % 10 == 0 or self.progress.pretrain_step == 1:
                self.log.write(
                    {
                        "event": "pretrain",
                        "step": self.progress.pretrain_step,
                        "loss": loss.item(),
                        "sec_per_step": time.perf_counter() - tic,
                    }
                )
            if self._should_stop():
                bar.close()
                return False
            if self.progress.pretrain_step % config.checkpoint_every == 0:
                self.save("last.pt")
        bar.close()
        return True

    # ----------------------------------------------------------------- phase 2
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        sampler = DistributedSampler(
            self.data.train,
            num_replicas=self.ctx.world_size,
            rank=self.ctx.rank,
            shuffle=True,
            seed=self.config.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        return chunks(list(sampler), self.config.batch_size)

    def _train_deq(self) -> bool:
        config, ctx = self.config, self.ctx
        model = self.model
        model.eval()  # running BN statistics; spectral norm advanced once per step
        net = DistributedDataParallel(model, device_ids=_ids(ctx)) if ctx.distributed else model
        steps_per_epoch = len(self._epoch_batches(0))
        total = steps_per_epoch * config.epochs
        if self.progress.epoch == 0 and self.progress.best_epoch is None:
            self._validate_and_checkpoint()  # epoch 0: the pretrained denoiser in the DEQ
        while self.progress.epoch < config.epochs:
            epoch = self.progress.epoch
            batches = self._epoch_batches(epoch)[self.progress.step_in_epoch :]
            loader = batches_loader(self.data.train, batches, config.workers)
            bar = tqdm(
                total=steps_per_epoch,
                initial=self.progress.step_in_epoch,
                desc=f"epoch {epoch + 1}/{config.epochs} ({config.backward})",
                disable=not self.bars,
                dynamic_ncols=True,
            )
            for index, x in loader:
                record = self._deq_step(net, index, x, epoch, total)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.2e}",
                    psnr=f"{record['psnr_standard']:.2f}",
                    iters=f"{record['fwd_iters_mean']:.1f}",
                )
                if self._should_stop():
                    bar.close()
                    return False
                if self.progress.global_step % config.checkpoint_every == 0:
                    self.save("last.pt")
            bar.close()
            self.progress.epoch += 1
            self.progress.step_in_epoch = 0
            self._validate_and_checkpoint()
        return True

    def _deq_step(
        self, net: nn.Module, index: Tensor, x: Tensor, epoch: int, total: int
    ) -> dict[str, Any]:
        config, ctx, model = self.config, self.ctx, self.model
        tic = time.perf_counter()
        lr = cosine_lr(config, self.progress.global_step, total)
        for group in self.opt.param_groups:
            group["lr"] = lr
        seeds = [noise_seed(config.seed, "train", epoch, int(i)) for i in index]
        x = flip_batch(x, seeds).to(ctx.device)
        d = measure(model.operator, x, config.noise_std, seeds)
        model.prepare_deq_step()
        x_hat, result = net(d)
        model.eval()  # that forward took the spectral-norm power step; validation takes none
        loss = F.mse_loss(x_hat, x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float("nan")
        if config.grad_clip > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
        self.opt.step()
        self.progress.global_step += 1
        self.progress.step_in_epoch += 1
        with torch.no_grad():
            x_hat = x_hat.detach()
            record = {
                "event": "train",
                "epoch": epoch,
                "step": self.progress.global_step,
                "loss": loss.item(),
                "psnr_paper": psnr_paper(x_hat, x).mean().item(),
                "psnr_standard": psnr_standard(x_hat, x).mean().item(),
                "fwd_iters_mean": result.n_steps.float().mean().item(),
                "fwd_iters_max": int(result.n_steps.max()),
                "converged": result.converged.float().mean().item(),
                "backward_iters": _backward_iters(model),
                "grad_norm": grad_norm,
                "lr": lr,
                "step_size": model.step_size(),
                "sec_per_step": time.perf_counter() - tic,
            }
        self.log.write(record)
        return record

    # ----------------------------------------------------------------- validation
    def _validate_and_checkpoint(self) -> None:
        metrics = self.validate()
        epoch = self.progress.epoch
        best = self.progress.best_val_psnr
        improved = best is None or metrics["psnr_standard"] > best
        if improved:
            self.progress.best_val_psnr = metrics["psnr_standard"]
            self.progress.best_epoch = epoch
        self.log.write(
            {"event": "val", "epoch": epoch, "step": self.progress.global_step, **metrics}
        )
        bound = metrics.get("lipschitz_bound")
        logger.info(
            "epoch %d validation: loss %.3e, PSNR %.2f dB (paper convention %.2f), "
            "CG anchor %.2f dB, %.1f forward iterations/sample, %.0f%% converged%s%s",
            epoch,
            metrics["loss"],
            metrics["psnr_standard"],
            metrics["psnr_paper"],
            metrics["cg_psnr_standard"],
            metrics["fwd_iters_mean"],
            100 * metrics["converged"],
            "" if bound is None else f", certified Lip(T) <= {bound:.4f}",
            "  [best]" if improved else "",
        )
        if improved:
            self.save("best.pt", metrics)
        self.save("last.pt", metrics)

    def validate(self) -> dict[str, float]:
        """Loss, PSNR, iterations and the CG anchor on the validation set (all ranks)."""
        config, ctx, model = self.config, self.ctx, self.model
        if model.contractive:
            # One power step per update lags behind the optimiser; validate (and checkpoint)
            # the model with exact layer norms, whose certified bound is the nominal one.
            model.calibrate_exact()
        n = len(self.data.val)  # type: ignore[arg-type]
        mine = list(range(ctx.rank, n, ctx.world_size))
        loader = batches_loader(self.data.val, chunks(mine, config.eval_batch_size), 0)
        sums = [0.0] * 7  # count, mse, psnr paper, psnr standard, iters, converged, cg psnr
        for index, x in loader:
            x = x.to(ctx.device)
            seeds = [noise_seed(config.seed, "val", 0, int(i)) for i in index]
            d = measure(model.operator, x, config.noise_std, seeds)
            with torch.no_grad():
                x_hat, result = model(d, max_iter=config.eval_max_iter)
                mse = ((x_hat - x) ** 2).flatten(1).mean(1)
                cg = cg_baseline(model.operator, d, config) if self.val_cg_psnr is None else None
            values = [
                float(len(index)),
                mse.sum().item(),
                psnr_paper(x_hat, x).sum().item(),
                psnr_standard(x_hat, x).sum().item(),
                result.n_steps.float().sum().item(),
                result.converged.float().sum().item(),
                psnr_standard(cg, x).sum().item() if cg is not None else 0.0,
            ]
            sums = [a + b for a, b in zip(sums, values, strict=True)]
        sums = distributed.all_reduce_sum(ctx, sums)
        count = max(sums[0], 1.0)
        if self.val_cg_psnr is None:
            self.val_cg_psnr = sums[6] / count
        metrics = {
            "loss": sums[1] / count,
            "psnr_paper": sums[2] / count,
            "psnr_standard": sums[3] / count,
            "fwd_iters_mean": sums[4] / count,
            "converged": sums[5] / count,
            "cg_psnr_standard": self.val_cg_psnr,
            "images": sums[0],
        }
        if model.contractive:  # the certificate, 1 - eta (1 - Lip(D)) < 1, as trained so far
            metrics["lipschitz_bound"] = model.cell.lipschitz_bound()
        return metrics


def _unit(seed: int) -> float:
    """A number in [0, 1) determined by ``seed``."""
    return float(torch.rand(1, generator=torch.Generator().manual_seed(seed ^ 0x85EBCA6B)))


def _ids(ctx: distributed.Context) -> list[int] | None:
    return [ctx.device.index] if ctx.device.type == "cuda" else None


def _backward_iters(model: DeGrad) -> float | None:
    result = model.deq.last_backward_result
    return None if result is None else result.n_steps.float().mean().item()
