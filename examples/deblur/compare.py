r"""The paper's comparison, reproduced and extended: baselines and backward rules side by side.

On the same data, the same measurements, the same network initialisation (one pretrained
denoiser, copied into every model), the same optimiser and the same number of epochs:

* classical baselines, each tuned on *validation* images (:mod:`deblur.compare_baselines`):
  direct inverse, gradient descent with early stopping (and with a Tikhonov term),
  Tikhonov-CG, TV and Plug-and-Play with the pretrained denoiser as the prior;
* DE-GRAD trained with implicit differentiation (the paper's "Deep Equilibrium" row), with
  Neumann series of ``k`` terms, and with JFB (:mod:`deblur.compare_training`);

then one evaluation on the held-out test split, which stays sealed until then. Written to
``--out``: ``results.json`` and ``results.md`` (the paper's Table 2 layout in both PSNR
conventions and SSIM, the paper's numbers beside ours, each learned method's training time,
memory, forward iterations and VJPs per step, and the checks), ``table1.png`` (the paper's
Table 1: reconstructions of a few test images), ``val_psnr_vs_time.png`` (validation PSNR
against training time, one curve per rule), ``split.json`` and each rule's logs.

Run it as ``python -m examples.deblur.compare --data-dir DIR --out DIR`` from the repository
root, ``python examples/deblur/compare.py ...``, or, once wired in with
:func:`add_compare_parser`, ``python examples/deblur_celeba.py compare ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # run as a script: run the package's
    import runpy  # module instead, so that its relative imports work

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
    runpy.run_module("deblur.compare", run_name="__main__", alter_sys=True)
    sys.exit(0)

import argparse
import dataclasses
import json
import logging
import shlex
import time
from typing import Any

import torch

from implicitlayers.imaging import GaussianBlur

from . import distributed
from .compare_baselines import (
    BaselineSettings,
    SealedDataset,
    tune_baselines,
)
from .compare_evaluation import CachedDataset, evaluate_all, split_info, stack_images
from .compare_report import (
    curve_figure,
    results_markdown,
    run_checks,
    summarize_rule,
    table1_figure,
)
from .compare_training import (
    Rule,
    StepMemory,
    parse_rules,
    pretrain_denoiser,
    steps_per_epoch,
    train_rules,
)
from .config import CELLS, PRESETS, SOLVERS, ConfigError, RunConfig, resolve_config
from .data import DataSplits, make_splits
from .evaluation import PAPER_TABLE
from .measure import measure, noise_seed
from .runlog import configure_console, read_jsonl

__all__ = ["add_compare_arguments", "add_compare_parser", "build_parser", "main", "run_compare"]

logger = logging.getLogger("deblur")

DEFAULT_OUT = "runs/compare"

DESCRIPTION = """\
The JFB paper's comparison (Liu, Tong & Zhao, Table 2), reproduced and extended: classical
baselines tuned on validation images (direct inverse, gradient descent, Tikhonov-CG, TV,
Plug-and-Play) and DE-GRAD trained with implicit differentiation, Neumann series and JFB
from the same pretrained denoiser, evaluated once on a sealed test split.

examples:
  python -m examples.deblur.compare --data-dir ../shared/data/celeba --out runs/compare \\
      --image-size 32 --limit 1500 --epochs 3
  python -m examples.deblur.compare --out runs/compare-demo   # built-in photographs
"""


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``compare`` options to ``p``."""
    S = argparse.SUPPRESS
    d = BaselineSettings()
    run = p.add_argument_group("run")
    run.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    run.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="starting point for the settings (default: demo without --data-dir, small with it)",
    )
    run.add_argument("--seed", type=int, default=S, help="random seed (default: 0)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default=S, help="device")
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice); 1 is much faster on a CPU "
        "shared with other busy processes",
    )
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--quiet", action="store_true", help="print only warnings and the results")
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=S, help="CelebA folder; built-in photographs without")
    data.add_argument("--split-seed", type=int, default=S, help="seed of the train/test split")
    data.add_argument("--image-size", type=int, default=S, help="image side")
    data.add_argument("--limit", type=int, default=S, help="at most this many training images")
    data.add_argument("--val-size", type=int, default=S, help="validation images carved out")
    data.add_argument("--val-limit", type=int, default=S, help="validation images per epoch")
    data.add_argument("--test-limit", type=int, default=S, help="at most this many test images")
    for split in ("train", "val", "test"):
        data.add_argument(f"--builtin-{split}-crops", type=int, default=S, help=S)
    meas = p.add_argument_group("measurement model")
    meas.add_argument("--kernel-size", type=int, default=S, help="blur kernel side (default: 5)")
    meas.add_argument("--blur-std", type=float, default=S, help="blur std (default: 5.0)")
    meas.add_argument("--noise-std", type=float, default=S, help="noise std (default: 0.01)")
    net = p.add_argument_group("network and training (shared by every backward rule)")
    net.add_argument(
        "--cell",
        choices=CELLS,
        default=S,
        help="DE-GRAD cell: standard, or contractive (ContractiveDnCNN, eta < 2/3)",
    )
    net.add_argument(
        "--lipschitz", type=float, default=S, help="contractive denoiser's Lipschitz scale"
    )
    net.add_argument("--depth", type=int, default=S, help="DnCNN convolutions")
    net.add_argument("--width", type=int, default=S, help="DnCNN channels")
    for flag, what in (("batch-norm", "batch norm"), ("spectral-norm", "spectral norm")):
        net.add_argument(
            f"--{flag}", action=argparse.BooleanOptionalAction, default=S, help=f"{what} in DnCNN"
        )
    net.add_argument("--step-size", type=float, default=S, help="initial eta")
    net.add_argument("--solver", choices=SOLVERS, default=S, help="forward fixed-point solver")
    net.add_argument("--rtol", type=float, default=S, help="forward solver relative tolerance")
    net.add_argument("--max-iter", type=int, default=S, help="training forward-solver budget")
    net.add_argument("--eval-max-iter", type=int, default=S, help="validation/test budget")
    net.add_argument("--batch-size", type=int, default=S, help="images per step")
    net.add_argument("--epochs", type=int, default=S, help="DEQ training epochs (every rule)")
    net.add_argument("--lr", type=float, default=S, help="Adam learning rate (cosine decay)")
    net.add_argument("--min-lr-ratio", type=float, default=S, help="final lr / initial lr")
    net.add_argument("--grad-clip", type=float, default=S, help="gradient-norm clip (0: off)")
    net.add_argument("--pretrain-steps", type=int, default=S, help="denoiser pretraining steps")
    net.add_argument("--pretrain-lr", type=float, default=S, help="denoiser pretraining lr")
    net.add_argument(
        "--pretrain-sigma-max", type=float, default=S, help="largest pretraining noise std"
    )
    net.add_argument("--eval-batch-size", type=int, default=S, help="images per evaluation batch")
    net.add_argument("--figure-samples", type=int, default=S, help="test images in table1.png")
    rules = p.add_argument_group("backward rules")
    rules.add_argument(
        "--rules",
        nargs="+",
        choices=("implicit", "neumann", "jfb"),
        default=["implicit", "neumann", "jfb"],
        help="rules to train (default: implicit neumann jfb)",
    )
    rules.add_argument(
        "--neumann-terms",
        dest="neumann_terms_list",
        type=int,
        nargs="+",
        default=[1, 5],
        help="one Neumann rule per k (default: 1 5)",
    )
    rules.add_argument(
        "--implicit-max-iter", type=int, default=S, help="adjoint solver budget (default: 30)"
    )
    base = p.add_argument_group("baselines (each tuned on validation images)")
    base.add_argument(
        "--tune-limit", type=int, default=64, help="validation images used for tuning (64)"
    )
    base.add_argument("--wiener-eps", type=float, nargs="+", default=d.wiener_eps, help="grid")
    base.add_argument("--gd-max-steps", type=int, default=d.gd_max_steps, help="longest GD run")
    base.add_argument(
        "--gd-tikhonov", type=float, nargs="+", default=d.gd_tikhonov, help="GD Tikhonov grid"
    )
    base.add_argument("--tv-lambdas", type=float, nargs="+", default=d.tv_lambdas, help="grid")
    base.add_argument("--tv-iters", type=int, default=d.tv_iters, help="Chambolle-Pock steps")
    base.add_argument(
        "--pnp-strengths", type=float, nargs="+", default=d.pnp_strengths, help="PnP grid"
    )
    base.add_argument("--pnp-steps", type=float, nargs="+", default=d.pnp_steps, help="PnP steps")
    base.add_argument("--pnp-max-iters", type=int, default=d.pnp_max_iters, help="longest PnP run")


def add_compare_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``subparsers`` (from ``add_subparsers``).

    Dispatch it with ``run_compare(args)`` when ``args.command == "compare"``.

    Returns:
        The subcommand's parser.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "compare",
        help="baselines and backward rules side by side (the paper's Table 2)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_compare_arguments(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser (``python -m examples.deblur.compare``)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.deblur.compare",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_compare_arguments(parser)
    return parser


def _settings(args: argparse.Namespace) -> tuple[RunConfig, BaselineSettings, list[Rule]]:
    known = {f.name for f in dataclasses.fields(RunConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in known}
    config = resolve_config(args.preset, overrides)
    settings = BaselineSettings(
        wiener_eps=list(args.wiener_eps),
        gd_max_steps=args.gd_max_steps,
        gd_tikhonov=list(args.gd_tikhonov),
        cg_steps=config.cg_steps,
        cg_lambda=config.cg_lambda,
        tv_lambdas=list(args.tv_lambdas),
        tv_iters=args.tv_iters,
        pnp_strengths=list(args.pnp_strengths),
        pnp_steps=list(args.pnp_steps),
        pnp_max_iters=args.pnp_max_iters,
    )
    for flag, value in (
        ("--tune-limit", args.tune_limit),
        ("--gd-max-steps", args.gd_max_steps),
        ("--tv-iters", args.tv_iters),
        ("--pnp-max-iters", args.pnp_max_iters),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be an integer >= 1, got {value}")
    try:
        rules = parse_rules(list(dict.fromkeys(args.rules)), list(args.neumann_terms_list))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return config, settings, rules


def _device(config: RunConfig) -> torch.device:
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but no CUDA device is available; use cpu")
    return torch.device("cuda" if use_cuda else "cpu")


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole comparison and write its outputs to ``args.out``.

    Args:
        args: Parsed by a parser built with :func:`add_compare_arguments`.

    Returns:
        The report (as written to ``results.json``).

    Raises:
        ConfigError: For an invalid setting.
    """
    t_start = time.perf_counter()
    configure_console(quiet=args.quiet)
    config, settings, rules = _settings(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be an integer >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = _device(config)
    ctx = distributed.Context(rank=0, world_size=1, device=device, distributed=False)
    bars = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = make_splits(config)
    test = SealedDataset(CachedDataset(raw.test))
    data = DataSplits(
        CachedDataset(raw.train), CachedDataset(raw.val), test, raw.description, raw.files
    )
    tune = min(args.tune_limit, len(data.val))  # type: ignore[arg-type]
    splits = split_info(data, tune)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if data.files is not None:
        (out / "split.json").write_text(
            json.dumps({**data.files, "tuning": splits["tuning_files"]})
        )
    logger.info("data: %s", data.description)

    tic = time.perf_counter()
    pretrained, denoiser = pretrain_denoiser(
        config, data, out / "pretrain", ctx, progress_bars=bars
    )
    t_pretrain = time.perf_counter() - tic

    operator = GaussianBlur(kernel_size=config.kernel_size, std=config.blur_std).to(device)
    tic = time.perf_counter()
    x_val = stack_images(data.val, list(range(tune)), device)
    seeds = [noise_seed(config.seed, "val", 0, i) for i in range(tune)]
    d_val = measure(operator, x_val, config.noise_std, seeds)
    tuned = tune_baselines(operator, x_val, d_val, denoiser, settings)
    t_tuning = time.perf_counter() - tic
    for key, t in tuned.items():
        logger.info("tuned %s: %s (validation PSNR %.2f dB)", key, t.params, t.val_psnr_standard)

    tic = time.perf_counter()
    folders = train_rules(config, data, rules, out, ctx, pretrained, progress_bars=bars)
    t_training = time.perf_counter() - tic

    tic = time.perf_counter()
    test.unseal()
    rows, learned, images = evaluate_all(config, data, operator, denoiser, tuned, rules, folders)
    t_eval = time.perf_counter() - tic

    steps = steps_per_epoch(config, data)
    labels = {key: row["method"] for key, row in rows.items()} | {"ground_truth": "Ground truth"}
    curves = {}
    for rule in rules:
        key = f"deq_{rule.key}"
        summary = summarize_rule(
            read_jsonl(folders[rule.key] / "log.jsonl"),
            read_jsonl(folders[rule.key] / "costs.jsonl"),
            steps,
        )
        learned[key].update(summary)
        curves[key] = summary["curve"]
    checks = run_checks(rows, learned)
    anchors = {
        f"{rows['tikhonov_cg']['method']} (validation)": tuned["tikhonov_cg"].val_psnr_standard
    }
    for key in ("tv", "pnp"):
        anchors[f"{rows[key]['method']} (tuned on validation)"] = tuned[key].val_psnr_standard
    table1_figure(images, labels, out / "table1.png")
    curve_figure(curves, labels, anchors, out / "val_psnr_vs_time.png")

    report: dict[str, Any] = {
        "command": getattr(args, "argv", None) or shlex.join(["python", *sys.argv]),
        "data": data.description,
        "splits": splits,
        "measurement_model": f"{config.kernel_size}x{config.kernel_size} Gaussian blur, std "
        f"{config.blur_std:g} (zero padding); noise std {config.noise_std:g} on [-1, 1] pixels",
        "training": (
            f"contractive cell, ContractiveDnCNN {config.depth}x{config.width} "
            f"(Lip(D) scale {config.lipschitz:g}), eta0 {config.step_size:g}"
            if config.cell == "contractive"
            else f"DnCNN {config.depth}x{config.width} (batch norm "
            f"{'on' if config.batch_norm else 'off'}, spectral norm "
            f"{'on' if config.spectral_norm else 'off'})"
        )
        + ", pretraining noise std up to "
        f"{config.pretrain_sigma_max:g}, "
        f"{config.pretrain_steps} pretraining steps, then {config.epochs} epochs x {steps} "
        f"steps of {config.batch_size} images, Adam lr {config.lr:g} (cosine), {config.solver} "
        f"forward solver (rtol {config.rtol:g}, max_iter {config.max_iter} training, "
        f"{config.eval_max_iter} evaluation); implicit adjoint budget {config.implicit_max_iter}",
        "device": f"{device.type} ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "table": list(rows.values()),
        "learned": learned,
        "checks": checks,
        "memory_method": StepMemory(device).method,
        "paper_table_psnr_paper_convention": {k: list(v) for k, v in PAPER_TABLE.items()},
        "baseline_search": {key: dataclasses.asdict(t) for key, t in tuned.items()},
        "config": config.to_dict(),
        "seconds": {
            "pretrain": t_pretrain,
            "tuning": t_tuning,
            "training": t_training,
            "evaluation": t_eval,
            "total": time.perf_counter() - t_start,
        },
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(report))
    if not args.quiet:
        print((out / "results.md").read_text(), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``), run the comparison, return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = shlex.join(["python", "-m", "examples.deblur.compare", *argv])
    try:
        run_compare(args)
    except ConfigError as err:
        print(f"compare: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
