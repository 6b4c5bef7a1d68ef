"""The three subcommands: ``train``, ``evaluate`` and ``restore``."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpoint import load_model
from .cli import config_overrides
from .config import resolve_config
from .data import make_splits
from .evaluation import evaluate_model, write_results
from .figures import budget_curve, loss_curves, reconstruction_grid
from .model import DeGrad
from .restore import restore_file
from .resume import resolve_resume
from .runlog import configure_console, read_jsonl
from .stopping import StopFlag, stop_on_signals
from .training import Trainer

__all__ = ["evaluate_checkpoint", "run_evaluate", "run_restore", "run_train"]

logger = logging.getLogger("deblur")

#: Settings the ``evaluate`` command may change relative to the checkpoint's configuration.
_EVAL_OVERRIDES = (
    "data_dir",
    "test_limit",
    "test_offset",
    "eval_max_iter",
    "eval_batch_size",
    "budgets",
)
_EVAL_OVERRIDES += ("figure_samples", "device", "rtol", "atol")


def run_train(args: argparse.Namespace, stop: StopFlag | None = None) -> int:
    """``train``: pretrain, train the DEQ, then evaluate the best checkpoint (rank 0).

    Args:
        args: Parsed command line.
        stop: A stop flag to use instead of a fresh one (tests raise it to interrupt).

    Returns:
        The process exit code: 0 when training finished or stopped cleanly.
    """
    overrides = config_overrides(args)
    config = resolve_config(args.preset, overrides)
    ctx = distributed.setup(config.device)
    configure_console(quiet=args.quiet or not ctx.is_main)
    out_dir = Path(args.output_dir)
    try:
        config, checkpoint = resolve_resume(config, overrides, out_dir, args.resume)
        if config.uses_builtin_data:
            logger.info(
                "No CelebA folder given (--data-dir), so falling back to the built-in "
                "photographs shipped with scikit-image."
            )
        data = make_splits(config)
        logger.info("output directory: %s", out_dir.resolve())
        logger.info("data: %s", data.description)
        if config.cell == "contractive":
            network = (
                f"contractive cell (ContractiveDnCNN {config.depth}x{config.width}, "
                f"Lip(D) scale {config.lipschitz:g}, eta < 2/3)"
            )
        else:
            network = (
                f"DnCNN {config.depth}x{config.width} (batch norm {config.batch_norm}, "
                f"spectral norm {config.spectral_norm})"
            )
        logger.info(
            "model: DE-GRAD, %s, eta0 %g, blur %dx%d std %g, noise %g; solver %s (rtol %g, "
            "max_iter %d); backward %s; %d process(es) on %s",
            network, config.step_size, config.kernel_size, config.kernel_size, config.blur_std,
            config.noise_std, config.solver, config.rtol, config.max_iter, config.backward,
            ctx.world_size, ctx.device,
        )  # fmt: skip
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            if data.files is not None:
                (out_dir / "split.json").write_text(json.dumps(data.files) + "\n")
        tic = time.perf_counter()
        with stop_on_signals(stop or StopFlag()) as flag:
            trainer = Trainer(
                config, data, out_dir, ctx, checkpoint, flag, progress_bars=not args.no_progress
            )
            result = trainer.run()
        logger.info("training time this session: %.1f s", time.perf_counter() - tic)
        distributed.barrier(ctx)
    finally:
        distributed.teardown(ctx)
    if result.finished and ctx.is_main:
        logger.info("checkpoints: %s (best validation PSNR), %s", result.best, result.last)
        if not args.no_evaluate:
            evaluate_checkpoint(
                result.best,
                out_dir,
                {},
                progress_bars=not args.no_progress,
                quiet=args.quiet,
            )
    return 0


def evaluate_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    overrides: dict[str, Any],
    *,
    progress_bars: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on its test split; write results and figures to ``out_dir``.

    Args:
        checkpoint: A checkpoint written by training.
        out_dir: Where ``results.json``, ``results.md`` and the PNG figures go.
        overrides: Evaluation settings that replace the checkpoint's (``test_limit``, ...).
        progress_bars: Show a tqdm bar.
        quiet: Do not print the results table.

    Returns:
        The results summary (as written to ``results.json``).
    """
    choice = overrides.get("device", "auto")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    model, config, saved = load_model(checkpoint, device)
    for key in _EVAL_OVERRIDES:
        if key in overrides:
            setattr(config, key, overrides[key])
    config.validate()
    data = make_splits(config)
    evaluation = evaluate_model(model, config, data.test, device, progress_bars=progress_bars)
    lipschitz = _lipschitz_report(model, evaluation.samples, device)
    report = write_results(
        evaluation,
        config,
        out_dir,
        checkpoint=str(checkpoint),
        data_description=data.description,
        extra={
            "trained_epochs": saved["progress"]["epoch"],
            "trained_steps": saved["progress"]["global_step"],
            "training_seconds": saved["progress"]["seconds"],
            "step_size": model.step_size(),
            **lipschitz,
        },
    )
    reconstruction_grid(evaluation.samples, out_dir / "reconstructions.png", config.backward)
    budget_curve(
        report["budget_psnr_standard"],
        report["table"]["tikhonov_cg"]["psnr_standard"],
        out_dir / "psnr_vs_iterations.png",
    )
    records = read_jsonl(Path(checkpoint).parent / "log.jsonl")
    if records:
        loss_curves(records, out_dir / "loss_curves.png")
    if not quiet:
        print((out_dir / "results.md").read_text(), flush=True)
        print(f"results and figures written to {out_dir.resolve()}", flush=True)
    return report


def _lipschitz_report(
    model: DeGrad, samples: dict[str, list[torch.Tensor]], device: torch.device
) -> dict[str, Any]:
    """The cell's certified Lipschitz bound (contractive cell) and a power-iteration
    estimate at the fixed points of the figure's test images (a handful: cheap)."""
    if not samples["d"]:
        return model.lipschitz_report()
    d = torch.stack(samples["d"]).to(device)
    x_hat = torch.stack(samples["x_hat"]).to(device)
    return model.lipschitz_report(d, x_hat)


def run_evaluate(args: argparse.Namespace) -> int:
    """``evaluate``: metrics, budget sweep, tables and figures for a checkpoint."""
    configure_console(quiet=args.quiet)
    checkpoint = Path(args.checkpoint)
    out_dir = Path(args.output_dir) if args.output_dir else checkpoint.parent
    evaluate_checkpoint(
        checkpoint,
        out_dir,
        config_overrides(args),
        progress_bars=not args.no_progress,
        quiet=args.quiet,
    )
    return 0


def run_restore(args: argparse.Namespace) -> int:
    """``restore``: deblur one image file and print a summary."""
    configure_console()
    summary = restore_file(
        args.checkpoint,
        args.input,
        args.output,
        simulate=args.simulate,
        seed=args.seed,
        max_iter=args.max_iter,
        device=args.device,
        measurement_path=args.save_measurement,
    )
    size = "x".join(map(str, summary["size"]))
    print(
        f"restored {summary['input']} ({size}) -> {summary['output']} in "
        f"{summary['seconds']:.2f} s, {summary['iterations']} iterations "
        f"({'converged' if summary['converged'] else 'NOT converged: raise --max-iter'})"
    )
    if summary.get("lipschitz_bound") is not None:
        print(
            f"  contractive cell: certified Lip(T) <= {summary['lipschitz_bound']:.4f} "
            f"(denoiser calibrated for {size})"
        )
    if args.simulate:
        for name in ("measurement", "tikhonov_cg", "degrad"):
            row = summary[name]
            print(
                f"  {name:12s} PSNR {row['psnr_standard']:.2f} dB "
                f"(paper convention {row['psnr_paper']:.2f}), SSIM {row['ssim']:.3f}"
            )
    return 0
