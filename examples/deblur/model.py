r"""The DE-GRAD model: blur operator, residual DnCNN denoiser, and the DEQ around them.

The fixed-point map (Gilton et al.) is

.. math::

    T(x; d) = x - \eta \big(A^\top (A x - d) + R(x)\big), \qquad R = I - D,

where :math:`D` is a DnCNN *denoiser* with residual learning: the network :math:`N` predicts
the noise and :math:`D(x) = x - N(x)`, so :math:`R(x) = N(x)`. This matches :math:`R`'s role
in the iteration: at the fixed point :math:`R(x^\star) = -A^\top (A x^\star - d)`, a
data-consistency correction, and :math:`R` vanishes on clean images, which is exactly what a
denoiser's residual does. (The JFB paper's code pretrained :math:`R` itself to output clean
images, the opposite of its role.)

With ``--cell contractive`` :math:`D` is instead a
:class:`~implicitlayers.imaging.ContractiveDnCNN` (a plain denoiser with a certified
:math:`\operatorname{Lip}(D) < 1`) and the cell is
:meth:`DEGRADCell.contractive <implicitlayers.imaging.DEGRADCell.contractive>`, with
:math:`\eta < 2/3`, so that :math:`\operatorname{Lip}(T) \le 1 - \eta (1 -
\operatorname{Lip}(D)) < 1`: a unique fixed point for every measurement, reached by Picard
iteration from any start.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import implicitlayers as il
from implicitlayers.imaging import (
    ContractiveDnCNN,
    DEGRADCell,
    DnCNN,
    GaussianBlur,
    NormalizedConv2d,
    estimate_lipschitz,
    tikhonov_cg,
)

from .config import RunConfig

__all__ = [
    "DeGrad",
    "ResidualDenoiser",
    "cg_baseline",
    "make_backward",
    "make_solver",
]


class ResidualDenoiser(nn.Module):
    r"""A denoiser by residual learning: :math:`D(x) = x - N(x)`.

    Args:
        net: The noise predictor :math:`N` (a DnCNN without its own residual add).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        """Denoise ``x`` of shape ``(B, C, H, W)``."""
        out: Tensor = x - self.net(x)
        return out


def make_solver(
    config: RunConfig, max_iter: int | None = None, *, values: int = 1
) -> il.AbstractSolver:
    r"""The forward solver named by ``config.solver`` with the configured tolerances.

    A sample stops when :math:`\|T(x) - x\| \le a \sqrt{n} + r \|T(x)\|` with
    :math:`a` = ``config.atol``, :math:`r` = ``config.rtol`` and :math:`n` = ``values`` per
    image: ``atol`` bounds the per-pixel RMS residual. (A purely relative test is a poor fit for
    pixels in :math:`[-1, 1]`: a mid-grey image has a small norm, so its threshold would be
    far stricter than a bright or dark one's.)

    Args:
        config: Uses ``solver``, ``max_iter``, ``rtol``, ``atol`` and ``history_size``.
        max_iter: Overrides ``config.max_iter`` (test-time budgets).
        values: Number of values per image, ``C * H * W``.
    """
    budget = config.max_iter if max_iter is None else max_iter
    atol = config.atol * math.sqrt(values)
    common: dict[str, Any] = {"max_iter": budget, "rtol": config.rtol, "atol": atol}
    if config.solver == "anderson":
        return il.Anderson(history_size=config.history_size, **common)
    if config.solver == "broyden":
        return il.Broyden(**common)
    return il.Picard(**common)


def make_backward(config: RunConfig) -> il.AbstractBackward:
    """The backward rule named by ``config.backward``."""
    if config.backward == "neumann":
        return il.Neumann(terms=config.neumann_terms)
    if config.backward == "implicit":
        adjoint = il.Anderson(max_iter=config.implicit_max_iter, rtol=1e-4, atol=1e-7)
        # Training logs the adjoint's convergence itself (DEQ.last_backward_result).
        return il.ImplicitDifferentiation(solver=adjoint, on_unconverged="ignore")
    return il.JFB()


class DeGrad(nn.Module):
    r"""DE-GRAD for deblurring: the fixed point of :math:`T(\cdot\,; d)` as a DEQ.

    Args:
        config: Measurement model (``kernel_size``, ``blur_std``), network (``cell``,
            ``depth``, ``width``, ``batch_norm``, ``spectral_norm``, ``lipschitz``,
            ``step_size``, ``image_size``), initial point (``init``), solver and backward rule.

    Attributes:
        operator: The blur :math:`A`.
        denoiser: :math:`D`, pretrained as a denoiser: :math:`D = I - N` with the standard
            cell, a :class:`~implicitlayers.imaging.ContractiveDnCNN` with the contractive one.
        cell: The DE-GRAD map :math:`T`.
        deq: The :class:`implicitlayers.DEQ` around ``cell``.
    """

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        self.config = config
        self.init = config.init
        self.operator = GaussianBlur(kernel_size=config.kernel_size, std=config.blur_std)
        self.denoiser: nn.Module
        if config.cell == "contractive":
            contractive = ContractiveDnCNN(
                channels=3,
                depth=config.depth,
                width=config.width,
                lipschitz=config.lipschitz,
                input_size=(config.image_size, config.image_size),
            )
            self.denoiser = contractive
            self.cell = DEGRADCell.contractive(
                self.operator, contractive, step_size=config.step_size, clamp=(-1.0, 1.0)
            )
        else:
            net = DnCNN(
                channels=3,
                depth=config.depth,
                width=config.width,
                batch_norm=config.batch_norm,
                spectral_norm=config.spectral_norm,
            )
            self.denoiser = ResidualDenoiser(net)
            self.cell = DEGRADCell(
                self.operator,
                self.denoiser,
                step_size=config.step_size,
                clamp=(-1.0, 1.0),
                residual_regularizer=True,
            )
        # The DEQ always runs the cell in eval mode (see prepare_deq_step), so the cell
        # treats samples independently and converged samples can stop early.
        self.deq = il.DEQ(
            self.cell,
            solver=make_solver(config),
            backward=make_backward(config),
            independent_samples=True,
        )

    def initial_point(self, d: Tensor) -> Tensor:
        """The solver's starting point :math:`x_0` for measurements ``d``."""
        with torch.no_grad():
            x0: Tensor = self.cell.initial_point(d, method=self.init)
        return x0

    def forward(self, d: Tensor, max_iter: int | None = None) -> il.DEQOutput:
        """Reconstruct from measurements ``d`` of shape ``(B, 3, H, W)``.

        Args:
            d: Blurred, noisy images in :math:`[-1, 1]`, of any size.
            max_iter: The solver's budget for this call (default: ``config.max_iter``); the
                solver, with tolerances scaled to the image size, is passed to the DEQ per call.

        Returns:
            ``DEQOutput(z, result)``: the reconstruction and the per-sample solver result.
        """
        solver = make_solver(self.config, max_iter, values=d[0].numel())
        z, result = self.deq(d, z0=self.initial_point(d), solver=solver)
        # The solver returns its best iterate, an Anderson mixture that can leave the clamp
        # range by up to the residual; project it (gradients pass where it is inside).
        return il.DEQOutput(z.clamp(-1.0, 1.0), result)

    @property
    def contractive(self) -> bool:
        """Whether the cell is the provably contractive one (``--cell contractive``)."""
        return self.config.cell == "contractive"

    def prepare_deq_step(self) -> None:
        """Advance the denoiser's norm estimates by one power step for the next training step.

        DEQ training keeps the whole model in eval mode, so that batch norm uses its running
        statistics (a batch-statistics map would couple the samples and differ from the
        test-time map). torch's spectral-norm parametrizations are switched back to training
        mode here: inside the DEQ's forward, :func:`implicitlayers.nn.one_map` computes each
        weight once, so its power iteration advances exactly once per step while the solver
        iterates on one map. The contractive DnCNN's
        :class:`~implicitlayers.imaging.NormalizedConv2d` layers advance their power
        iterations only in training mode, so they get their step here.
        """
        with torch.no_grad():
            for module in self.denoiser.modules():
                if isinstance(module, NormalizedConv2d):
                    size = module.input_size
                    if size is not None and module.power_iterations > 0:
                        module.calibrate(size, module.power_iterations)
                elif parametrize.is_parametrized(module, "weight"):
                    module.parametrizations["weight"].train()

    def step_size(self) -> float:
        r"""The current :math:`\eta`."""
        value = self.cell.step_size
        return float(value.detach()) if isinstance(value, Tensor) else float(value)

    def calibrate(self, size: tuple[int, int]) -> None:
        """Calibrate a contractive denoiser for ``(H, W)`` images (no-op otherwise).

        :class:`~implicitlayers.imaging.ContractiveDnCNN` normalises each convolution by an
        estimate of its norm *at the input size*, and would re-calibrate on the first input
        of a new size by power iteration from a random vector. Here the layers get their
        exact norms instead (:meth:`calibrate_exact`): deterministic, and certified.
        """
        if not self.contractive:
            return
        denoiser = self.denoiser
        assert isinstance(denoiser, ContractiveDnCNN)
        if all(conv.input_size == tuple(size) for conv in denoiser.convs()):
            return
        denoiser.calibrate_exact((int(size[0]), int(size[1])))

    def calibrate_exact(self) -> None:
        """Give a contractive denoiser's layers their exact norms at the calibrated size, so
        the certified bound is the nominal ``--lipschitz`` (no-op for the standard cell)."""
        if self.contractive:
            denoiser = self.denoiser
            assert isinstance(denoiser, ContractiveDnCNN)
            denoiser.calibrate_exact()

    def lipschitz_report(
        self, d: Tensor | None = None, x: Tensor | None = None, iters: int = 50
    ) -> dict[str, Any]:
        r"""Lipschitz figures of :math:`T(\cdot\,; d)`, for ``results.json``.

        Args:
            d: A few measurements, ``(B, 3, H, W)``, for the power-iteration estimate.
            x: Where to estimate the local Lipschitz constant (their reconstructions, the
                fixed points); both or neither.
            iters: Power iterations of the estimate.

        Returns:
            ``lipschitz_bound`` (the certified :math:`1 - \eta (1 - \operatorname{Lip}(D))`
            of the contractive cell, at the denoiser's calibrated size ``lipschitz_size``;
            ``None`` for the standard cell, which has no guarantee),
            ``denoiser_lipschitz_bound``, and ``lipschitz_estimate``: the largest per-image
            :func:`~implicitlayers.imaging.estimate_lipschitz` of :math:`T` at ``x`` (a lower
            bound of :math:`\operatorname{Lip}(T)`, for both cells; ``None`` without ``d``).
        """
        report: dict[str, Any] = {
            "cell": self.config.cell,
            "lipschitz_bound": None,
            "denoiser_lipschitz_bound": None,
            "lipschitz_size": None,
            "lipschitz_estimate": None,
        }
        if self.contractive:
            denoiser = self.denoiser
            assert isinstance(denoiser, ContractiveDnCNN)
            report["lipschitz_bound"] = self.cell.lipschitz_bound()
            report["denoiser_lipschitz_bound"] = denoiser.lipschitz_bound()
            size = denoiser.convs()[0].input_size
            report["lipschitz_size"] = None if size is None else list(size)
        if d is not None and x is not None and len(d) > 0:
            was_training = self.training
            self.eval()
            generator = torch.Generator(device=d.device).manual_seed(self.config.seed)
            try:
                report["lipschitz_estimate"] = estimate_lipschitz(
                    lambda z: self.cell(z, d), x, iters=iters, generator=generator
                )
            finally:
                self.train(was_training)
            report["lipschitz_estimate_images"] = len(d)
        return report


def cg_baseline(operator: GaussianBlur, d: Tensor, config: RunConfig) -> Tensor:
    r"""The anchor: Tikhonov-regularised least squares by conjugate gradients.

    Solves :math:`(A^\top A + \lambda I) x = A^\top d` with ``config.cg_steps`` CG steps
    (60) and :math:`\lambda` = ``config.cg_lambda`` (0.01), clamped to :math:`[-1, 1]`.
    """
    with torch.no_grad():
        x: Tensor = tikhonov_cg(operator, d, lam=config.cg_lambda, steps=config.cg_steps)
    return x.clamp(-1.0, 1.0)
