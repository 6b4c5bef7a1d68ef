r"""Keeping a denoiser's weight normalisations right while a DEQ trains in ``eval()`` mode."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._validate import check_int
from ._contractive import ContractiveDnCNN

__all__ = ["refresh_norms"]


def refresh_norms(
    denoiser: nn.Module,
    size: tuple[int, int],
    *,
    training: bool,
    step: int = 0,
    exact_every: int = 20,
) -> None:
    r"""Prepare the normalisations of ``denoiser`` for the next training step, or for test.

    A DEQ is best trained with its cell in ``eval()`` mode, so that batch norm uses running
    statistics and :math:`T` is one map per sample, the map of test time. Its normalisations
    then need a hand:

    - torch's :func:`~torch.nn.utils.parametrizations.spectral_norm` parametrizations (in
      :class:`DnCNN` with ``spectral_norm=True``) go back to training mode before a training
      step (``training=True``), so that they take their power step; a
      :class:`~implicitlayers.DEQ` computes each weight once per call (one power step per
      training step), and the caller returns the module to ``eval()`` after the forward.
    - a :class:`ContractiveDnCNN` takes one power step before a training step, and exact norms
      (:meth:`ContractiveDnCNN.calibrate_exact`) every ``exact_every``-th ``step`` and whenever
      the image size changes: power steps lag behind an optimiser (a certified bound of 0.95
      drifted to 5.5 in 350 steps without them). Before validation or test
      (``training=False``) it gets exact norms, so that its certificate holds as computed.

    Args:
        denoiser: The module holding the normalised layers (e.g. ``cell.regularizer``).
        size: ``(H, W)`` of the images the next step or evaluation sees.
        training: Whether a training step comes next (else validation or test).
        step: The training step's index (for ``exact_every``).
        exact_every: Exact norms for contractive layers every this many steps (>= 1).

    Example:
        >>> from implicitlayers.imaging import ContractiveDnCNN, refresh_norms
        >>> D = ContractiveDnCNN(channels=1, depth=3, width=4, input_size=(8, 8))
        >>> refresh_norms(D, (8, 8), training=False)
        >>> round(D.lipschitz_bound() / D.lipschitz, 6)
        1.0
    """
    check_int("exact_every", exact_every, minimum=1)
    with torch.no_grad():
        if isinstance(denoiser, ContractiveDnCNN):
            new_size = denoiser.convs()[0].input_size != tuple(size)
            if not training or new_size or step % exact_every == 0:
                denoiser.calibrate_exact(size)
            if training:
                denoiser.calibrate(size)
        elif training:
            for m in denoiser.modules():
                if parametrize.is_parametrized(m, "weight"):
                    cast(Any, m).parametrizations["weight"].train()
