"""Deblur a user's image file with a trained checkpoint.

The DE-GRAD cell is convolutional, so an image of any size works with a model trained on
small crops. Without ``--simulate`` the input is taken to be a measurement blurred by the
checkpoint's operator (same kernel and standard deviation). With ``--simulate`` the input
is taken to be sharp: it is blurred with the checkpoint's operator, noise of the
checkpoint's level is added, and the PSNR of the measurement, of Tikhonov-CG and of the
restoration against the sharp image are reported.

A contractive checkpoint (``--cell contractive``) is calibrated for the image's size first:
its :class:`~implicitlayers.imaging.ContractiveDnCNN` normalises each convolution by a
power-iteration estimate of its norm at the input size, and the certified Lipschitz bound
reported (``lipschitz_bound``) is the one at that size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from implicitlayers.imaging import psnr_paper, psnr_standard, ssim_standard

from .checkpoint import load_model
from .config import ConfigError
from .data import load_image, save_image
from .measure import measure, noise_seed
from .model import cg_baseline

__all__ = ["restore_file"]

logger = logging.getLogger("deblur")


def restore_file(
    checkpoint: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    *,
    simulate: bool = False,
    seed: int = 0,
    max_iter: int | None = None,
    device: str = "cpu",
    measurement_path: str | Path | None = None,
) -> dict[str, Any]:
    """Restore ``input_path`` into ``output_path``.

    Args:
        checkpoint: A ``best.pt`` / ``last.pt`` written by training.
        input_path: An image file Pillow can read (converted to RGB).
        output_path: Where to write the restored image (format from the suffix).
        simulate: Treat the input as sharp: blur and add noise first, then report PSNR.
        seed: Seed of the simulated noise.
        max_iter: Solver budget; defaults to the checkpoint's ``eval_max_iter``.
        device: ``"cpu"`` or ``"cuda"``.
        measurement_path: Also save the (simulated or given) measurement here.

    Returns:
        A summary: sizes, iterations, convergence, seconds and, with ``simulate``, PSNR/SSIM.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise ConfigError(f"--input {str(input_path)!r} does not exist; pass an image file")
    if output_path.suffix.lower() not in (
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".tif",
        ".tiff",
        ".webp",
    ):
        raise ConfigError(
            f"--output {str(output_path)!r} needs an image suffix such as .png (lossless)"
        )
    model, config, _ = load_model(checkpoint, device)
    image = load_image(input_path).to(device)[None]
    min_side = config.kernel_size
    if min(image.shape[-2:]) < min_side:
        raise ConfigError(
            f"--input is {tuple(image.shape[-2:])} pixels; it must be at least "
            f"{min_side}x{min_side}"
        )
    if simulate:
        d = measure(model.operator, image, config.noise_std, [noise_seed(seed, "restore", 0, 0)])
    else:
        d = image
    # A contractive denoiser normalises its layers for the input size: calibrate it for this
    # image (deterministically) before solving; its certificate then holds at this size.
    model.calibrate((int(d.shape[-2]), int(d.shape[-1])))
    tic = time.perf_counter()
    with torch.no_grad():
        x_hat, result = model(d, max_iter=max_iter or config.eval_max_iter)
    seconds = time.perf_counter() - tic
    output_path.parent.mkdir(parents=True, exist_ok=True)
    save_image(x_hat[0], output_path)
    if measurement_path is not None:
        save_image(d[0].clamp(-1, 1), measurement_path)
    summary: dict[str, Any] = {
        "input": str(input_path),
        "output": str(output_path),
        "size": list(image.shape[-2:]),
        "iterations": int(result.n_steps[0]),
        "converged": bool(result.converged[0]),
        "residual": float(result.residual[0]),
        "seconds": seconds,
        "cell": config.cell,
        "lipschitz_bound": model.lipschitz_report()["lipschitz_bound"],
    }
    if simulate:
        cg = cg_baseline(model.operator, d, config)
        for name, value in (
            ("measurement", d.clamp(-1, 1)),
            ("tikhonov_cg", cg),
            ("degrad", x_hat),
        ):
            summary[name] = {
                "psnr_standard": psnr_standard(value, image).item(),
                "psnr_paper": psnr_paper(value, image).item(),
                "ssim": ssim_standard(value, image).item(),
            }
    return summary
