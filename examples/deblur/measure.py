"""Simulated measurements ``d = A x + e`` with reproducible, per-image noise.

Noise (and any augmentation) is drawn from a generator seeded by the image's identity
(run seed, purpose, epoch, dataset index), never from a global random stream. So a batch's
measurements do not depend on the batch size, the number of processes, or whether the run
was interrupted and resumed, and every method is evaluated on identical measurements.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["TAGS", "flip_batch", "measure", "noise_seed", "randn_per_image"]

#: Purposes that get independent noise streams.
TAGS = {"pretrain": 1, "train": 2, "val": 3, "test": 4, "restore": 5}


def noise_seed(seed: int, tag: str, epoch: int, index: int) -> int:
    """A 63-bit seed that is a stable hash of its arguments.

    Args:
        seed: The run's seed.
        tag: A purpose in :data:`TAGS`.
        epoch: Epoch or step (anything that should change the draw over time).
        index: The image's index in its dataset.
    """
    sequence = np.random.SeedSequence([seed, TAGS[tag], epoch, index])
    return int(sequence.generate_state(1, dtype=np.uint64)[0]) >> 1


def randn_per_image(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """Standard normal noise of ``shape`` per image, one CPU generator per seed.

    Drawing on the CPU makes the noise identical on every device.
    """
    return torch.stack(
        [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def measure(operator: nn.Module, x: Tensor, noise_std: float, seeds: Sequence[int]) -> Tensor:
    """Blur a batch and add Gaussian noise: :math:`d = A x + \\sigma e`.

    Args:
        operator: The forward operator :math:`A` (e.g. ``GaussianBlur``).
        x: ``(B, C, H, W)`` clean images in :math:`[-1, 1]`.
        noise_std: :math:`\\sigma`, on the :math:`[-1, 1]` pixel scale.
        seeds: One seed per image (see :func:`noise_seed`).

    Returns:
        ``(B, C, H, W)`` measurements.
    """
    if len(seeds) != x.shape[0]:
        raise ValueError(f"need one seed per image: {len(seeds)} seeds for {x.shape[0]} images")
    with torch.no_grad():
        blurred = operator(x)
        noise = randn_per_image(blurred.shape[1:], seeds).to(blurred)
        return blurred + noise_std * noise


def flip_batch(x: Tensor, seeds: Sequence[int]) -> Tensor:
    """Mirror each image left-right with probability 1/2, decided by its seed."""
    flips = [
        torch.randint(2, (1,), generator=torch.Generator().manual_seed(s ^ 0x5BD1E995))
        for s in seeds
    ]
    mask = torch.cat(flips).bool().to(x.device)[:, None, None, None]
    return torch.where(mask, x.flip(-1), x)
