"""The command line: ``train`` (the default), ``evaluate`` and ``restore``."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .config import BACKWARDS, CELLS, DEVICES, INITS, PRESETS, SOLVERS, SPLITS, RunConfig

__all__ = ["COMMANDS", "DEFAULT_OUTPUT_DIR", "build_parser", "config_overrides", "parse_args"]

COMMANDS = ("train", "evaluate", "restore", "compare")
DEFAULT_OUTPUT_DIR = "runs/deblur-demo"
_DEFAULTS = RunConfig()

DESCRIPTION = """\
DE-GRAD image deblurring (Gilton et al.) trained with Jacobian-free backpropagation
(Liu, Tong & Zhao), built on implicitlayers.

  T(x; d) = x - eta * (A^T (A x - d) + R(x)),   R = I - D,   D a DnCNN denoiser

With no arguments it runs the complete demo on photographs shipped with scikit-image:
pretrain D, train the DEQ with JFB, evaluate on held-out photographs, and write a table,
figures and checkpoints to runs/deblur-demo.

examples:
  python examples/deblur_celeba.py
  python examples/deblur_celeba.py train --data-dir ~/data/celeba --image-size 64 --limit 2000
  python examples/deblur_celeba.py train --data-dir ~/data/celeba --preset paper
  torchrun --nproc_per_node=4 examples/deblur_celeba.py train --data-dir ... --preset paper
  python examples/deblur_celeba.py evaluate --checkpoint runs/deblur-demo/best.pt
  python examples/deblur_celeba.py restore --checkpoint runs/deblur-demo/best.pt \\
      --input photo.png --output sharp.png --simulate
"""


def _g(default: Any) -> str:
    return f" (default: {default})"


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    run = p.add_argument_group("run")
    run.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        help="where logs, checkpoints, results and figures go" + _g(DEFAULT_OUTPUT_DIR),
    )
    run.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="starting point for "
        "every setting below: demo (built-in photographs), small (CelebA at a "
        "CPU-feasible size), paper (the paper's protocol); explicit flags override "
        "it (default: demo without --data-dir, small with it)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from last.pt, exactly where it stopped",
    )
    run.add_argument(
        "--no-evaluate", action="store_true", help="skip the test-set evaluation after training"
    )
    run.add_argument("--seed", type=int, default=S, help="random seed" + _g(_DEFAULTS.seed))
    run.add_argument("--device", choices=DEVICES, default=S, help="auto picks CUDA when present")
    run.add_argument("--workers", type=int, default=S, help="DataLoader worker processes")
    run.add_argument(
        "--max-steps",
        type=int,
        default=S,
        help="stop (checkpointing, resumable) after this many DEQ training steps in total",
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=S,
        help="also save last.pt every this many steps" + _g(_DEFAULTS.checkpoint_every),
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=S,
        help="CelebA folder (img_align_celeba JPEGs, or "
        "its parent); without it the built-in photographs are used",
    )
    data.add_argument(
        "--split",
        choices=SPLITS,
        default=S,
        help="official: "
        "list_eval_partition.txt; seed: first 10,000 files by name, shuffled with "
        "--split-seed, 80/20 train/test (the paper's protocol; default of --preset paper); "
        "auto: official when the file exists (default)",
    )
    data.add_argument("--split-seed", type=int, default=S, help="seed of the seed split")
    data.add_argument(
        "--image-size",
        type=int,
        default=S,
        help="CelebA resize side / built-in "
        "crop side" + _g(f"{_DEFAULTS.image_size} demo, 64 small, 128 paper"),
    )
    data.add_argument("--limit", type=int, default=S, help="use at most this many training images")
    data.add_argument(
        "--val-limit", type=int, default=S, help="at most this many validation images"
    )
    data.add_argument("--test-limit", type=int, default=S, help="at most this many test images")
    data.add_argument(
        "--test-offset",
        type=int,
        default=S,
        help="skip this many CelebA test images first (a fresh slice of the test split)",
    )
    data.add_argument(
        "--val-size",
        type=int,
        default=S,
        help="validation images carved from the training part of the seed split",
    )
    data.add_argument("--builtin-train-crops", type=int, default=S, help="built-in training crops")
    data.add_argument("--builtin-val-crops", type=int, default=S, help="built-in validation crops")
    data.add_argument("--builtin-test-crops", type=int, default=S, help="built-in test crops")
    data.add_argument(
        "--builtin-scale",
        type=float,
        default=S,
        help="downscale factor of the built-in photographs before cropping",
    )
    meas = p.add_argument_group("measurement model")
    meas.add_argument("--kernel-size", type=int, default=S, help="blur kernel side (odd)" + _g(5))
    meas.add_argument(
        "--blur-std",
        type=float,
        default=S,
        help="Gaussian blur standard deviation in pixels" + _g(5.0),
    )
    meas.add_argument(
        "--blur-variance-literal",
        action="store_true",
        help="read the paper's 'variance 5' literally: blur std sqrt(5)",
    )
    meas.add_argument(
        "--noise-std", type=float, default=S, help="noise std on [-1, 1] pixels" + _g(0.01)
    )
    net = p.add_argument_group("network")
    net.add_argument(
        "--cell",
        choices=CELLS,
        default=S,
        help="standard: D a residual DnCNN; contractive: D a ContractiveDnCNN with "
        "Lip(D) <= --lipschitz and eta < 2/3, so Lip(T) <= 1 - eta (1 - Lip(D)) < 1 (a preset "
        "step of 2/3 or more becomes 0.5 unless --step-size is given; no batch or spectral "
        "norm)" + _g(_DEFAULTS.cell),
    )
    net.add_argument(
        "--lipschitz",
        type=float,
        default=S,
        help="Lipschitz scale s in (0, 1) of the contractive denoiser, Lip(D) ~ s"
        + _g(_DEFAULTS.lipschitz),
    )
    net.add_argument(
        "--depth", type=int, default=S, help="DnCNN convolutions" + _g("6 demo, 8 small, 17 paper")
    )
    net.add_argument(
        "--width", type=int, default=S, help="DnCNN channels" + _g("32 demo, 48 small, 64 paper")
    )
    net.add_argument(
        "--batch-norm",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="batch norm in DnCNN (default: off, on for --preset paper)",
    )
    net.add_argument(
        "--spectral-norm",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="spectral norm on DnCNN convolutions (default: off, on for --preset paper)",
    )
    net.add_argument(
        "--step-size", type=float, default=S, help="initial eta" + _g(_DEFAULTS.step_size)
    )
    net.add_argument(
        "--init",
        choices=INITS,
        default=S,
        help="solver start: A^T d or 10 steps of Tikhonov CG" + _g(_DEFAULTS.init),
    )
    sol = p.add_argument_group("solver and backward rule")
    sol.add_argument(
        "--solver",
        choices=SOLVERS,
        default=S,
        help="forward fixed-point solver" + _g(_DEFAULTS.solver),
    )
    sol.add_argument(
        "--max-iter", type=int, default=S, help="training solver budget" + _g(_DEFAULTS.max_iter)
    )
    sol.add_argument(
        "--eval-max-iter",
        type=int,
        default=S,
        help="validation/test budget" + _g(_DEFAULTS.eval_max_iter),
    )
    sol.add_argument(
        "--rtol", type=float, default=S, help="relative tolerance" + _g(_DEFAULTS.rtol)
    )
    sol.add_argument(
        "--atol",
        type=float,
        default=S,
        help="absolute tolerance on the per-pixel RMS residual" + _g(_DEFAULTS.atol),
    )
    sol.add_argument(
        "--history-size", type=int, default=S, help="Anderson memory m" + _g(_DEFAULTS.history_size)
    )
    sol.add_argument(
        "--backward", choices=BACKWARDS, default=S, help="backward rule" + _g(_DEFAULTS.backward)
    )
    sol.add_argument("--neumann-terms", type=int, default=S, help="terms of --backward neumann")
    sol.add_argument(
        "--implicit-max-iter",
        type=int,
        default=S,
        help="adjoint solver budget of --backward implicit",
    )
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=S, help="images per step per process")
    opt.add_argument("--epochs", type=int, default=S, help="DEQ training epochs")
    opt.add_argument("--lr", type=float, default=S, help="Adam learning rate (cosine decay)")
    opt.add_argument("--min-lr-ratio", type=float, default=S, help="final lr / initial lr")
    opt.add_argument("--grad-clip", type=float, default=S, help="gradient-norm clip (0: off)")
    opt.add_argument("--pretrain-steps", type=int, default=S, help="denoiser pretraining steps")
    opt.add_argument("--pretrain-lr", type=float, default=S, help="denoiser pretraining lr")
    opt.add_argument(
        "--pretrain-sigma-max", type=float, default=S, help="largest pretraining noise std"
    )
    _add_eval_arguments(p, with_checkpoint=False)


def _add_eval_arguments(p: argparse.ArgumentParser, with_checkpoint: bool) -> None:
    S = argparse.SUPPRESS
    ev = p.add_argument_group("evaluation")
    if with_checkpoint:
        ev.add_argument(
            "--checkpoint",
            default=f"{DEFAULT_OUTPUT_DIR}/best.pt",
            help="checkpoint to evaluate" + _g(f"{DEFAULT_OUTPUT_DIR}/best.pt"),
        )
        ev.add_argument(
            "--output-dir",
            default=None,
            help="where results and figures go (default: the checkpoint's folder)",
        )
        ev.add_argument("--data-dir", default=S, help="CelebA folder, if it moved since training")
        ev.add_argument("--test-limit", type=int, default=S, help="at most this many test images")
        ev.add_argument(
            "--test-offset",
            type=int,
            default=S,
            help="skip this many CelebA test images first (a fresh slice of the test split)",
        )
        ev.add_argument("--eval-max-iter", type=int, default=S, help="solver budget")
        ev.add_argument("--rtol", type=float, default=S, help="test-time relative tolerance")
        ev.add_argument("--atol", type=float, default=S, help="test-time per-pixel RMS tolerance")
        ev.add_argument("--device", choices=DEVICES, default=S, help="auto picks CUDA when present")
    ev.add_argument("--eval-batch-size", type=int, default=S, help="images per evaluation batch")
    ev.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=S,
        help="test-time max_iter values "
        "for the PSNR-vs-budget curve" + _g(" ".join(map(str, _DEFAULTS.budgets))),
    )
    ev.add_argument("--figure-samples", type=int, default=S, help="rows of the image grid")
    ev.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev.add_argument("--quiet", action="store_true", help="print only warnings and errors")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with its four subcommands."""
    parser = argparse.ArgumentParser(
        prog="deblur_celeba.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,restore,compare}")
    train = sub.add_parser(
        "train",
        help="pretrain, train and evaluate (the default command)",
        description="Pretrain the denoiser, train the DEQ, evaluate.",
    )
    _add_train_arguments(train)
    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint on its test split",
        description="Metrics, iteration budgets, tables and figures.",
    )
    _add_eval_arguments(evaluate, with_checkpoint=True)
    restore = sub.add_parser(
        "restore",
        help="deblur an image file with a checkpoint",
        description="Deblur an image of any size with a trained checkpoint.",
    )
    restore.add_argument("--checkpoint", required=True, help="a best.pt or last.pt from training")
    restore.add_argument(
        "--input", required=True, help="image to deblur (any size, any format Pillow reads)"
    )
    restore.add_argument("--output", required=True, help="where to write the result (.png)")
    restore.add_argument(
        "--simulate",
        action="store_true",
        help="treat --input as sharp: blur "
        "it with the checkpoint's operator, add its noise, restore, report PSNR",
    )
    restore.add_argument("--save-measurement", default=None, help="also save the measurement")
    restore.add_argument("--seed", type=int, default=0, help="seed of the simulated noise")
    restore.add_argument(
        "--max-iter",
        type=int,
        default=None,
        help="solver budget (default: the checkpoint's eval budget)",
    )
    restore.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device")
    from .compare import add_compare_parser  # late: it imports the training machinery

    add_compare_parser(sub)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; no subcommand (or only flags) means ``train``."""
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and getattr(args, "blur_variance_literal", False):
        if hasattr(args, "blur_std"):
            parser.error("--blur-variance-literal sets the blur std to sqrt(5); drop --blur-std")
        args.blur_std = math.sqrt(5.0)
    return args


#: Namespace attributes that are not RunConfig settings.
_NOT_CONFIG = frozenset(
    {"command", "output_dir", "preset", "resume", "no_evaluate", "no_progress", "quiet"}
    | {"blur_variance_literal", "checkpoint"}
)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given explicitly on the command line, keyed by RunConfig field."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
