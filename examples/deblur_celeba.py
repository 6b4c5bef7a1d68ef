r"""DE-GRAD deblurring, trained through its fixed point with Jacobian-free backpropagation.

A sharp image :math:`x \in [-1, 1]^{3 \times H \times W}` is measured as :math:`d = A x + e`:
:math:`A` a 5x5 Gaussian blur of standard deviation 5 with zero padding, :math:`e` Gaussian
noise of standard deviation 0.01. DE-GRAD (Gilton, Ongie & Willett, 2021) reconstructs
:math:`x` as the fixed point of one gradient step on a learned objective,

.. math::

    x^\star = T(x^\star; d), \qquad
    T(x; d) = \Pi\big(x - \eta\,(A^\top (A x - d) + x - D_\theta(x) + \lambda (x - x_0))\big),

with :math:`D_\theta` a DnCNN denoiser (the regulariser is :math:`R = I - D`), :math:`\eta`
learned, an anchor to the start :math:`x_0` (``--anchor`` :math:`\lambda`)
and :math:`\Pi` the clamp to :math:`[-1, 1]`. As in Liu, Tong & Zhao (2024) the
network is trained with JFB: the loss's gradient flows through one application of :math:`T`
at the detached fixed point (``--backward`` picks another of the library's rules).

``python examples/deblur_celeba.py`` is the CPU demo on scikit-image's photographs (minutes on
two cores); ``train --data-dir DIR [--preset small|cpu128|paper]`` trains on CelebA (``torchrun``
for several processes); ``evaluate`` and ``restore`` use a checkpoint; ``--help`` lists them all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# On a shared CPU, OpenMP threads that spin while waiting make every convolution many times
# slower (measured: 10 ms -> 550 ms per DnCNN call on 2 busy cores). Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if __package__ in (None, ""):  # run as a script: make the helper package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from deblur import cli, data, ddp, report, state
from deblur.cli import Command, Options, SettingsError, arg
from deblur.data import TEST_SEED, Images, Splits, image_seeds, load, make_splits, noise, shard
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Adam
from torch.optim.lr_scheduler import CosineAnnealingLR
from tqdm.auto import tqdm

import implicitlayers as il
from implicitlayers import imaging
from implicitlayers.backward import BACKWARDS
from implicitlayers.imaging import ContractiveDnCNN, DEGRADCell, LinearOperator
from implicitlayers.solvers import SOLVERS

logger = logging.getLogger("deblur")


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines a run, stored in its checkpoints. Each field is a flag
    (``image_size`` is ``--image-size``); the library checks what it owns (solver and rule
    names and bounds, the network's sizes, the step) when the objects are built."""

    # Data.
    data_dir: str | None = arg(None, "CelebA folder; the built-in photographs without it")
    split_seed: int = arg(0, "seed of the CelebA train/test split")
    image_size: int = arg(32, "image side (CelebA resize, built-in crop)", low=8)
    train_crop: int | None = arg(None, "train on random crops of this side", low=8)
    limit: int | None = arg(None, "at most this many CelebA training images", low=1)
    val_size: int = arg(500, "CelebA validation images, taken from training", low=1)
    test_limit: int | None = arg(None, "at most this many CelebA test images", low=1)
    test_offset: int = arg(0, "skip this many CelebA test images first (a fresh slice)", low=0)
    builtin_crops: tuple[int, ...] = arg((2048, 64, 96), "built-in train, val, test crops", low=1)
    # Measurement d = A x + e.
    kernel_size: int = arg(5, "blur kernel side (odd)")
    blur_std: float = arg(5.0, "blur standard deviation in pixels")
    noise_std: float = arg(0.01, "noise standard deviation on [-1, 1] pixels", low=0.0)
    # Network.
    cell: str = arg("standard", "contractive: Lip(T) < 1", choices=("standard", "contractive"))
    lipschitz: float = arg(0.999, "Lip(D) of the contractive denoiser")
    skip: float = arg(0.1, "contractive: D = s((1-t)x + t N(x)), initial t (0: D = s N)", low=0)
    depth: int = arg(6, "DnCNN convolutions")
    width: int = arg(32, "DnCNN channels")
    batch_norm: bool = arg(False, "batch norm in DnCNN", negatable=True)
    spectral_norm: bool = arg(False, "spectral norm on DnCNN's convolutions", negatable=True)
    step_size: float = arg(0.8, "initial step eta")
    anchor: float = arg(0.1, "weight lambda of lambda (x - x0) in T, x0 the start", low=0.0)
    # Solver and backward rule.
    solver: str = arg("anderson", "forward fixed-point solver", choices=tuple(SOLVERS))
    max_iter: int = arg(50, "training solver budget")
    eval_max_iter: int = arg(100, "validation and test solver budget")
    rtol: float = arg(1e-3, "relative tolerance")
    tight_rtol: float = arg(1e-5, "evaluation also solves to this rtol (0: skip)", low=0.0)
    atol: float = arg(5e-4, "absolute tolerance on the per-pixel RMS residual")
    backward: str = arg("jfb", "backward rule", choices=tuple(BACKWARDS))
    neumann_terms: int = arg(5, "k of --backward neumann (terms) and phantom (steps)")
    implicit_max_iter: int = arg(30, "adjoint GMRES budget of --backward implicit")
    # Training.
    seed: int = arg(0, "random seed")
    batch_size: int = arg(8, "images per step per process", low=1)
    epochs: int = arg(4, "DEQ training epochs", low=0)
    lr: float = arg(1e-3, "Adam learning rate, cosine decay to a tenth")
    grad_clip: float = arg(1.0, "gradient-norm clip (0: off)", low=0.0)
    pretrain_steps: int = arg(1500, "denoiser pretraining steps", low=0)
    pretrain_lr: float = arg(2e-3, "denoiser pretraining learning rate")
    checkpoint_every: int = arg(100, "also save last.pt every this many steps", low=1)
    workers: int = arg(0, "DataLoader worker processes", low=0)
    device: str = arg("auto", "auto: CUDA when present", choices=("auto", "cpu", "cuda"))
    autocast: str = arg("auto", "bf16 for f (auto: where native)", choices=("auto", "bf16", "off"))
    # Evaluation.
    eval_batch_size: int = arg(32, "images per evaluation batch", low=1)
    budgets: tuple[int, ...] = arg((1, 2, 5, 10, 20, 50), "test-time budgets to sweep", low=1)
    figure_samples: int = arg(6, "test images in the figure", low=1)
    radius_images: int = arg(8, "test images whose rho(J_T) is estimated", low=1)

    def __post_init__(self) -> None:
        cli.check(self)  # choices and lower bounds declared with arg()
        if len(self.builtin_crops) != 3:
            raise SettingsError(f"--builtin-crops takes 3 counts, got {self.builtin_crops}")
        if (self.train_crop or 0) > self.image_size:
            raise SettingsError(f"--train-crop {self.train_crop} exceeds --image-size")
        if self.cell == "contractive" and (self.batch_norm or self.spectral_norm):
            raise SettingsError("--[spectral|batch]-norm do not apply to --cell contractive")
        try:  # what the library owns, the library checks
            make_solver(self), make_solver(self, self.eval_max_iter), make_backward(self)
            imaging.GaussianBlur(self.kernel_size, self.blur_std)
        except (ValueError, TypeError) as err:
            flags = "--solver, --[eval-]max-iter, --rtol, --atol, --backward, --neumann-terms, "
            flags += "--kernel-size, --blur-std"
            raise SettingsError(f"{flags}: {err}") from None


#: Named starting points: override dicts of Settings (explicit flags override them in turn).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},  # built-in photographs, 32x32, DnCNN 6x32: minutes on a CPU; cpu128: 64x64 crops
    "small": {"image_size": 64, "depth": 8, "width": 48, "step_size": 1.0, "pretrain_steps": 1000}
    | {"limit": 3000, "val_size": 128, "test_limit": 256},
    "cpu128": {"image_size": 128, "train_crop": 64, "depth": 8, "width": 48, "step_size": 1.0}
    | {"pretrain_steps": 1500, "limit": 3000, "val_size": 64, "test_limit": 256, "epochs": 3},
    "paper": {"image_size": 128, "train_crop": 64, "depth": 17, "width": 64, "batch_norm": True}
    | {"spectral_norm": True, "step_size": 1.0, "epochs": 2, "lr": 5e-4, "checkpoint_every": 25}
    | {"pretrain_steps": 1000, "pretrain_lr": 1e-3, "val_size": 64, "test_limit": 256},
}
#: What ``--cell contractive`` changes unless given (the library's bound: a step below 2/3).
CONTRACTIVE = {"step_size": 0.5, "batch_norm": False, "spectral_norm": False}


def resolve(preset: str | None, overrides: dict[str, Any]) -> Settings:
    """Settings from a preset (``demo``, or ``small`` with ``--data-dir``) and explicit values."""
    preset = preset or ("demo" if overrides.get("data_dir") is None else "small")
    cell = CONTRACTIVE if overrides.get("cell") == "contractive" else {}
    return Settings(**{**PRESETS[preset], **cell, **overrides})


# ---------------------------------------------------------------------- the measurement
@torch.no_grad()
def measure(A: LinearOperator, x: Tensor, seeds: list[int], std: float) -> Tensor:
    r""":math:`d = A x + \sigma e`: each image is blurred with zero padding at its own border."""
    return cast(Tensor, A(x) + std * noise(seeds, x.shape[1:]).to(x))


# ------------------------------------------------------------------------ model and DEQ
def make_solver(
    s: Settings, max_iter: int | None = None, rtol: float | None = None
) -> il.AbstractSolver:
    """The forward solver ``--solver``; ``atol`` bounds the per-pixel RMS, scaled with ``rtol``."""
    budget, scale = s.max_iter if max_iter is None else max_iter, (rtol or s.rtol) / (s.rtol or 1)
    return SOLVERS[s.solver](max_iter=budget, rtol=scale * s.rtol, atol=scale * s.atol, norm="rms")


def make_backward(s: Settings) -> il.AbstractBackward:
    """The backward rule ``--backward``; implicit: a GMRES adjoint (I - J^T invertible)."""
    adjoint = il.GMRES(max_iter=s.implicit_max_iter, rtol=1e-4, atol=1e-9, restart=30)
    extra: dict[str, dict[str, Any]] = {
        "neumann": {"terms": s.neumann_terms},
        "phantom": {"steps": s.neumann_terms},
        "implicit": {"solver": adjoint, "on_unconverged": "ignore"},  # convergence is logged
    }
    return BACKWARDS[s.backward](**extra.get(s.backward, {}))


def build_model(s: Settings) -> il.DEQ:
    r"""The DE-GRAD cell :math:`T` in a :class:`~implicitlayers.DEQ`; samples stop one by one.

    ``standard``: :math:`D(x) = x - N(x)` (``DnCNN(residual=True)``, :math:`N` predicting the
    noise), so :math:`R = N` vanishes on clean images. ``contractive``: :math:`D` a
    ``ContractiveDnCNN`` in ``DEGRADCell.contractive``: :math:`\operatorname{Lip}(T) < 1`.
    """
    torch.manual_seed(s.seed)
    A, size = imaging.GaussianBlur(s.kernel_size, s.blur_std), (s.train_crop or s.image_size,) * 2
    anchor: dict[str, Any] = {"anchor_weight": s.anchor}  # lambda of lambda (x - x0)
    try:  # the library checks the network's settings
        if s.cell == "contractive":
            D = ContractiveDnCNN(3, s.depth, s.width, lipschitz=s.lipschitz, skip=s.skip or None)
            D.calibrate(size)
            cell = DEGRADCell.contractive(A, D, step_size=s.step_size, **anchor)
        else:
            norms = {"batch_norm": s.batch_norm, "spectral_norm": s.spectral_norm}
            N = imaging.DnCNN(3, s.depth, s.width, residual=True, **norms)
            cell = DEGRADCell(A, N, step_size=s.step_size, residual_regularizer=True, **anchor)
    except (ValueError, TypeError) as err:
        raise SettingsError(f"--depth, --width, --lipschitz, --step-size: {err}") from None
    return il.DEQ(cell, solver=make_solver(s), backward=make_backward(s), independent_samples=True)


def cell_of(model: il.DEQ) -> DEGRADCell:
    """The DE-GRAD cell of ``model``: its ``operator`` is :math:`A`, its ``regularizer`` D."""
    return cast(DEGRADCell, model.f)


def reconstruct(
    model: il.DEQ,
    d: Tensor,
    solver: il.AbstractSolver | None = None,
    net: nn.Module | None = None,
    **options: Any,
) -> il.DEQOutput:
    """Solve :math:`x = T(x; d, x_0)` from :math:`x_0`, 10 Tikhonov-CG steps (``net``: ``model``
    under DDP); ``options`` go to the DEQ (``z0``: another start, ``states``, ...)."""
    x0 = cell_of(model).initial_point(d, method="cg")
    out = (net or model)(d, x0, solver=solver, **{"z0": x0, **options})
    # Anderson's best iterate mixes clamped outputs and can leave [-1, 1] by up to its residual;
    # under bf16, f's output is bf16: the images go on in float32.
    z, *states = (z.float().clamp(-1.0, 1.0) for z in (out.z, *out.states))
    return il.DEQOutput(z, out.result, states=tuple(states), spectral_radius=out.spectral_radius)


def fit_norms(model: il.DEQ, size: tuple[int, int], *, training: bool, step: int = 0) -> None:
    """The denoiser's norm estimates, right for the next training step or for a test."""
    imaging.refresh_norms(cell_of(model).regularizer, size, training=training, step=step)


# ------------------------------------------------------------------------------ training
def train(
    s: Settings,
    splits: Splits,
    out: Path,
    ctx: ddp.Context,
    opts: Options | None = None,
    *,
    start: dict[str, Any] | None = None,
    stop: state.StopFlag | None = None,
) -> tuple[il.DEQ, state.Progress]:
    r"""Pretrain :math:`D`, then train the DEQ end to end, validating after every epoch.

    Phase 1: :math:`D(x + \sigma e) \approx x`, :math:`\sigma` uniform in ``[0, 0.1]``.
    Phase 2: minimise :math:`\|x^\star(d) - x\|^2` through the fixed point with the backward
    rule (Adam, cosine schedule). ``best.pt`` (by validation PSNR) and ``last.pt`` go to ``out``;
    a stop request (Ctrl-C, SIGTERM, ``--max-steps``) saves ``last.pt`` and returns. ``start``:
    a checkpoint, or part of one, to continue from (``--init``: another run's weights).
    """
    stop, start = stop or state.StopFlag(), start or {}
    opts = opts or Options()
    model = build_model(s).to(ctx.device)
    A, denoiser = cell_of(model).operator, cell_of(model).regularizer
    pre_opt, opt = Adam(denoiser.parameters(), s.pretrain_lr), Adam(model.parameters(), s.lr)
    total = len(shard(splits.train, s.batch_size, ctx, s.seed)) * s.epochs
    schedule = CosineAnnealingLR(opt, max(total, 1), eta_min=s.lr / 10)
    objects = dict(model=model, pretrain_optimizer=pre_opt, optimizer=opt, scheduler=schedule)
    meta = {"settings": asdict(s), "data": splits.description}
    run = state.Run(out, objects, meta, ctx.main, start)  # loads the states and progress
    progress, show = run.progress, ctx.main and not opts.no_progress
    precision, low = ddp.autocast(s.autocast, ctx.device), ddp.bf16(s.autocast, ctx.device)
    solver = make_solver(s, rtol=max(s.rtol, ddp.BF16_RTOL)) if low else None

    def validate() -> None:
        fit_norms(model, (s.image_size,) * 2, training=False)
        rows = evaluate(model, s, splits.val, ctx, tag="val", seed=s.seed)
        means = {k: v for k, v in rows.items() if not k.startswith(("image/", "seconds"))}
        m: dict[str, Any] = ctx.mean(means)  # over every process's images
        m["lipschitz_bound"] = cell_of(model).lipschitz_bound() if s.cell == "contractive" else None
        run.validated(m)  # logs m; saves last.pt, and best.pt when its PSNR is the best yet

    if progress.phase == "pretrain":  # Phase 1: the denoiser alone, on random batches
        net: nn.Module = DistributedDataParallel(denoiser) if ctx.world > 1 else denoiser
        denoiser.train()
        todo = data.draws(splits.train, s.batch_size, ctx, s.seed, s.pretrain_steps)
        batches = load(splits.train, todo[progress.pretrain_step :], s.workers)
        bar = tqdm(batches, "pretrain", len(todo), initial=progress.pretrain_step, disable=not show)
        for index, x in bar:
            seeds = image_seeds(s.seed, "pretrain", progress.pretrain_step, index)
            x = data.augment(x, seeds, s.train_crop).to(ctx.device)
            fit_norms(model, (x.shape[2], x.shape[3]), training=True, step=progress.pretrain_step)
            sigma = 0.1 * torch.tensor([seed / 2**63 for seed in seeds]).to(x)  # U[0, 0.1]
            e = noise([seed ^ 1 for seed in seeds], x.shape[1:]).to(x)
            with precision:
                loss = F.mse_loss(net(x + sigma[:, None, None, None] * e).float(), x)
            pre_opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            nn.utils.clip_grad_norm_(denoiser.parameters(), s.grad_clip or float("inf"))
            pre_opt.step()
            progress.pretrain_step += 1
            if run.after_step(stop, ctx.any, opts.max_steps, s.checkpoint_every):
                return model, progress  # stopped, last.pt saved
        progress.phase = "deq"
        run.save("last.pt")

    # Phase 2: the DEQ, end to end through its fixed point (the model stays in eval mode).
    net = DistributedDataParallel(model) if ctx.world > 1 else model
    model.eval()
    if progress.phase == "deq" and progress.epoch == 0 and progress.best_epoch is None:
        validate()  # epoch 0: the pretrained denoiser inside the DEQ
    while progress.phase == "deq" and progress.epoch < s.epochs:
        todo = shard(splits.train, s.batch_size, ctx, s.seed, progress.epoch)
        what = f"epoch {progress.epoch + 1}/{s.epochs} ({s.backward})"
        batches = load(splits.train, todo[progress.step_in_epoch :], s.workers)
        bar = tqdm(batches, what, len(todo), initial=progress.step_in_epoch, disable=not show)
        for index, x in bar:
            tic = time.perf_counter()
            seeds = image_seeds(s.seed, "train", progress.epoch, index)
            x = data.augment(x, seeds, s.train_crop).to(ctx.device)  # crop first, then measure
            d = measure(A, x, seeds, s.noise_std)
            fit_norms(model, (x.shape[2], x.shape[3]), training=True, step=progress.global_step)
            with precision:
                x_hat, result = reconstruct(model, d, solver, net=net)
            model.eval()  # that forward took its spectral-norm power step
            loss = F.mse_loss(x_hat, x)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            norm = nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip or float("inf"))
            lr = schedule.get_last_lr()[0]
            opt.step()
            schedule.step()
            progress.global_step += 1
            progress.step_in_epoch += 1
            scalars = {"loss": loss.item(), "grad_norm": float(norm), "lr": lr}
            scalars |= {"step_size": cell_of(model).step_size.item()}
            scalars |= {"sec_per_step": time.perf_counter() - tic}
            run.log_step(result, model.last_backward_result, scalars)
            bar.set_postfix(loss=f"{loss.item():.2e}", iters=f"{result.n_steps.float().mean():.1f}")
            if run.after_step(stop, ctx.any, opts.max_steps, s.checkpoint_every):
                return model, progress  # stopped, last.pt saved
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
        validate()
    progress.phase = "done"
    run.save("last.pt")
    return model, progress


# ---------------------------------------------------------------------------- evaluation
def evaluate(
    model: il.DEQ,
    s: Settings,
    images: Images,
    ctx: ddp.Context,
    *,
    tag: str = "test",
    seed: int = TEST_SEED,
    budgets: tuple[int, ...] = (),
    keep: int = 0,
    bars: bool = False,
    measured: bool = False,
    radius: int = 0,
) -> dict[str, list[Any]]:
    """Per-image results on whole images (this process's share): PSNR and SSIM of the
    measurement, Tikhonov-CG and DE-GRAD, loss, forward iterations, convergence, PSNR at each
    test-time budget ``k`` (0: the start), seconds, and the first ``keep`` images. Test noise
    is seeded by :data:`TEST_SEED`: every method and run sees the same measurements.
    ``measured``: the images are measurements already (``restore``; scores compare with them).
    ``radius``: :math:`\rho(J_T)` at the fixed points of that many first images (Arnoldi, at
    most 50 VJPs; low when unsettled): below 1, the exact rule's adjoint is well posed."""
    A, rows, ks = cell_of(model).operator, defaultdict(list), tuple(sorted(budgets))
    rtol = max(s.rtol, ddp.BF16_RTOL) if ddp.bf16(s.autocast, ctx.device) else s.rtol
    todo = shard(images, s.eval_batch_size, ctx)
    model.eval()
    for index, x in tqdm(load(images, todo), total=len(todo), desc=tag, disable=not bars):
        x = x.to(ctx.device)
        d = x if measured else measure(A, x, image_seeds(seed, tag, 0, index), s.noise_std)
        with torch.no_grad():
            tic = time.perf_counter()
            with ddp.autocast(s.autocast, ctx.device):  # f in bf16 where asked
                solver = make_solver(s, s.eval_max_iter, rtol)
                x_hat, result = out = reconstruct(model, d, solver, states=ks)
            rows["seconds"].append(time.perf_counter() - tic)
            room = max(keep - len(rows["image/x"]), 0)
            rows["image/x"] += list(x[:room].cpu())
            # The classical anchor, Tikhonov: (A^T A + 0.01 I) x = A^T d by 60 CG steps (61
            # products, the last measuring the residual; rtol=0: the budget decides).
            cg = imaging.tikhonov_cg(A, d, lam=0.01, max_iter=61, rtol=0.0).clamp(-1, 1)
            methods = {"measurement": d.clamp(-1, 1), "tikhonov_cg": cg}
            for name, v in (methods | {"degrad": x_hat}).items():
                for metric, values in report.scores(v, x).items():
                    rows[f"{name}/{metric}"] += values.tolist()
                rows[f"image/{name}"] += list(v[:room].cpu())
            rows["loss"] += ((x_hat - x) ** 2).flatten(1).mean(1).tolist()
            rows["iterations"] += result.n_steps.tolist()
            rows["converged"] += result.converged.float().tolist()
            for k, x_k in zip(ks, out.states, strict=True):  # the k-th iterate of that solve
                rows[f"budget/{k}"] += imaging.psnr_standard(x_k, x).tolist()
            more = result  # a true equilibrium: solving on (in float32) changes nothing
            if s.tight_rtol:
                tight = make_solver(s, s.eval_max_iter, s.tight_rtol)
                x_t, more = reconstruct(model, d, tight, z0=result.z.float())
                rows["tight/psnr_standard"] += imaging.psnr_standard(x_t, x).tolist()
                rows["tight/converged"] += more.converged.float().tolist()
                rows["tight/iterations"] += (result.n_steps + more.n_steps).tolist()
            if radius > len(rows["radius"]):  # at the tightest fixed points
                z, one = more.z[: radius - len(rows["radius"])], make_solver(s, 1)
                probe = reconstruct(model, d[: len(z)], one, z0=z, spectral_radius=True)
                rho = cast(il.diagnostics.SpectralRadius, probe.spectral_radius)
                rows["radius"] += rho.radius.tolist()
                rows["radius_settled"] += rho.converged.float().tolist()
    return dict(rows)


def load_model(
    path: str | Path, overrides: dict[str, Any]
) -> tuple[dict[str, Any], Settings, il.DEQ]:
    """A checkpoint, its settings (with ``overrides``) and its trained model, in eval mode."""
    saved = state.load(path)
    s = replace(Settings(**saved["settings"]), **overrides)
    model = build_model(s).to(ddp.pick_device(s.device))
    model.load_state_dict(saved["model"])
    return saved, s, model.eval()


# ------------------------------------------------------------------------------ commands
def cmd_train(opts: Options, overrides: dict[str, Any]) -> int:
    """``train``: pretrain, train, then evaluate the best checkpoint on the test split."""
    out = Path(opts.output_dir)
    start = state.resumed(out, opts.resume, overrides, cli.RESUMABLE)  # its settings, as resumed
    s = Settings(**{**start["settings"], **overrides}) if start else resolve(opts.preset, overrides)
    with ddp.setup(s.device) as ctx:  # leaves the process group at the end
        splits = make_splits(s)
        logger.info("data: %s", splits.description)
        what = f"{s.cell} cell, DnCNN {s.depth}x{s.width}, {s.solver}, {s.backward}"
        logger.info("model: DE-GRAD, %s; %d process(es) on %s", what, ctx.world, ctx.device)
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "settings.json").write_text(json.dumps(asdict(s), indent=2))
            (out / "split.json").write_text(json.dumps(splits.files(), indent=2))
        with state.stop_on_signals(state.StopFlag()) as stop:
            if opts.init and not start:  # another run's weights; the DEQ phase from its start
                start = {"model": state.load(opts.init)["model"], "progress": {"phase": "deq"}}
            progress = train(s, splits, out, ctx, opts, start=start, stop=stop)[1]
    if progress.phase == "done" and ctx.main and not opts.no_evaluate:
        cmd_evaluate(replace(opts, checkpoint=str(out / "best.pt")), {})
    return 0


def cmd_evaluate(opts: Options, overrides: dict[str, Any]) -> int:
    """``evaluate``: a checkpoint on its test split; results.json, results.md and figures."""
    path = Path(opts.checkpoint)
    out = path.parent if opts.output_dir == Options.output_dir else Path(opts.output_dir)
    saved, s, model = load_model(path, overrides)
    splits, ctx = make_splits(s), ddp.Context(0, 1, next(model.parameters()).device)
    fit_norms(model, (s.image_size,) * 2, training=False)
    options: dict[str, Any] = {"keep": s.figure_samples, "radius": s.radius_images}
    options |= {"bars": not opts.no_progress, "budgets": (0, *s.budgets)}
    rows = evaluate(model, s, splits.test, ctx, **options)
    about: dict[str, Any] = {"checkpoint": str(path), "data": splits.description}
    about["lipschitz_bound"] = cell_of(model).lipschitz_bound() if s.cell != "standard" else None
    report.write(rows, out, saved, about | {"settings": asdict(s)})
    if not opts.quiet:
        print((out / "results.md").read_text() + f"\nresults and figures in {out.resolve()}")
    return 0


def cmd_restore(opts: Options, overrides: dict[str, Any]) -> int:
    """``restore``: deblur an image file of any size (the cell is convolutional); with
    ``--simulate`` measure it first, then score the measurement, Tikhonov-CG and DE-GRAD."""
    image = data.check_paths(opts.input, opts.output)  # the file to restore, read
    _, s, model = load_model(opts.checkpoint, overrides)
    ctx = ddp.Context(0, 1, next(model.parameters()).device)
    fit_norms(model, (image.shape[1], image.shape[2]), training=False)
    one = data.Images(image[None])
    rows = evaluate(model, s, one, ctx, tag="restore", keep=1, measured=not opts.simulate)
    data.save_image(rows["image/degrad"][0], opts.output)
    size, seconds = "x".join(map(str, image.shape[1:])), rows["seconds"][0]
    done = "converged" if rows["converged"][0] else "NOT converged: raise --eval-max-iter"
    print(f"restored {opts.input} ({size}) -> {opts.output} in {seconds:.2f} s, ", end="")
    print(f"{rows['iterations'][0]} iterations ({done})")
    for name in report.METHODS if opts.simulate else ():  # scored against the sharp --input
        psnr, paper, ssim = (rows[f"{name}/{k}"][0] for k in report.METRICS)
        print(f"  {name:12s} PSNR {psnr:.2f} dB (paper convention {paper:.2f}), SSIM {ssim:.3f}")
    return 0


#: Each command: its function, its help, its options, the settings it may change (all: None).
COMMANDS = {
    "train": Command(cmd_train, "pretrain, train and evaluate (the default)", cli.TRAIN),
    "evaluate": Command(cmd_evaluate, "evaluate a checkpoint", cli.EVALUATE, cli.EVALUATED),
    "restore": Command(cmd_restore, "deblur an image file", cli.RESTORE, cli.RESTORED),
}


def main(argv: list[str] | None = None) -> int:
    """Run a command (``train`` when none is named); returns 2 for an invalid setting."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.main(argv, COMMANDS, Options, Settings, PRESETS, __doc__)


if __name__ == "__main__":
    sys.exit(main())
