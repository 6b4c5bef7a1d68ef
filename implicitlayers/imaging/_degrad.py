r"""The DE-GRAD cell (Gilton, Ongie & Willett, 2021): a gradient step on a learned objective."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_choice, check_float, check_int
from ._contractive import ContractiveDnCNN
from ._linear_operator import LinearOperator, check_operator
from ._tikhonov import tikhonov_cg

__all__ = ["DEGRADCell"]

#: The largest step for which the contractive DE-GRAD cell is provably a contraction.
CONTRACTIVE_MAX_STEP = 2.0 / 3.0
# the sigmoid saturates to exactly 1 in float32; this keeps eta strictly below the cap even after
# rounding (float32 resolves relative differences of 6e-8)
_CAP_MARGIN = 1.0 - 1e-6


class DEGRADCell(nn.Module):
    r"""One DE-GRAD iteration: a gradient step on data fit plus a learned regulariser.

    .. math::

        T(x; d, x_0) = \Pi\Big(x - \eta \big(A^\top (A x - d) + R_\theta(x)
            + \lambda (x - x_0)\big)\Big),

    with :math:`A` = ``operator``, :math:`\eta` = :attr:`step_size` (learnable, kept positive),
    :math:`\Pi` the clamp to the data range (identity when ``clamp=None``),
    :math:`R_\theta` = ``regularizer``, or :math:`R_\theta(x) = x - D_\theta(x)` for a denoiser
    :math:`D_\theta` when ``residual_regularizer=True``, and an optional anchor term of weight
    :math:`\lambda` = ``anchor_weight`` (0 by default) towards :math:`x_0` = ``anchor``, a
    starting reconstruction such as :meth:`initial_point` (zeros when not given: Tikhonov).
    Wrapped in :class:`~implicitlayers.DEQ`, its fixed point is the reconstruction; Gilton et
    al. train it with Jacobian-free backpropagation (:class:`~implicitlayers.JFB`).

    **Why an anchor.** :math:`J_T = \Pi' (I - \eta (A^\top A + J_R + \lambda I))`. Where the
    blur sees nothing (:math:`A^\top A \approx 0`, fine detail) and a learned regulariser is
    flat (:math:`J_R \approx 0`), :math:`J_T` has eigenvalues at 1: the fixed point is barely
    determined there, a solver creeps along those directions, and the answer depends on where
    it stops. The anchor shifts every eigenvalue of the unclamped Jacobian by
    :math:`-\eta\lambda`, and in those directions the fixed point stays near :math:`x_0`, where
    the solve starts. It does not keep a trained cell a contraction: trained with JFB for 300
    steps on CelebA 64 x 64 with :math:`\lambda = 0.1`, the cell's spectral radius at its
    test fixed points was 3.1, and solving on from rtol :math:`10^{-3}` to :math:`10^{-5}`
    changed the PSNR by -1.4 dB (none converged); for a guarantee use :meth:`contractive`.

    The step is parametrised as :math:`\eta = \operatorname{softplus}(\rho)` (any positive
    value), or :math:`\eta = \eta_{\max}\, \operatorname{sigmoid}(\rho)` (times
    :math:`1 - 10^{-6}`, so rounding cannot reach :math:`\eta_{\max}`) when
    ``max_step_size`` is given, so no optimiser step can leave :math:`(0, \eta_{\max})`.

    **Provable contraction** (:meth:`contractive`). With ``residual_regularizer=True``,

    .. math::

        T(x) = \Pi\big((I - \eta (A^\top A + (1 + \lambda) I))\, x + \eta D(x)
            + \eta (A^\top d + \lambda x_0)\big).

    If :math:`\|A\| \le 1` (a nonnegative blur kernel summing to 1), the spectrum of
    :math:`A^\top A` lies in :math:`[0, 1]`, so the symmetric
    :math:`I - \eta (A^\top A + (1 + \lambda) I)` has spectrum in
    :math:`[1 - \eta (2 + \lambda), 1 - \eta (1 + \lambda)]`, and norm
    :math:`c = \max(|1 - \eta (2 + \lambda)|, |1 - \eta (1 + \lambda)|)`, which is
    :math:`1 - \eta` for :math:`\lambda = 0` and :math:`0 < \eta \le 2/3`. The clamp is a
    projection onto a box, hence 1-Lipschitz, so

    .. math::

        \operatorname{Lip}(T) \le c + \eta \operatorname{Lip}(D)
            \overset{\lambda = 0}{=} 1 - \eta \big(1 - \operatorname{Lip}(D)\big) < 1

    whenever :math:`\operatorname{Lip}(D) < 1` (:class:`ContractiveDnCNN`). By Banach's
    theorem :math:`T(\cdot\,; d)` then has a unique fixed point for every :math:`d`, which
    Picard iteration reaches from any start, and JFB's gradient is a descent direction
    (Fung et al., 2022). :meth:`lipschitz_bound` evaluates the bound.

    Args:
        operator: The forward operator :math:`A`, a :class:`LinearOperator` (e.g.
            :class:`GaussianBlur`); it is registered as a submodule, so it follows ``.to()``.
        regularizer: :math:`R_\theta` (or the denoiser :math:`D_\theta`, e.g.
            ``DnCNN(residual=True)``, with ``residual_regularizer=True``), ``(B, C, H, W)`` to
            the same shape.
        step_size: Initial :math:`\eta > 0` (below ``max_step_size`` if that is given).
        clamp: ``(low, high)`` data range the output is clamped to, or ``None``. Only
            :math:`T`'s outputs are clamped: Anderson's and Broyden's iterates combine them
            and may leave the range, so clamp a DEQ's output where the range matters.
        residual_regularizer: Use :math:`R(x) = x - D(x)` with ``regularizer`` as :math:`D`.
        max_step_size: Upper bound :math:`\eta_{\max}` of the step's parametrisation, or
            ``None`` for none.
        learn_step_size: Train :math:`\eta` with the network (a parameter), or keep it fixed
            at ``step_size`` (a buffer, not in ``parameters()``).
        anchor_weight: :math:`\lambda \ge 0`, the weight of the anchor term (a constant).

    Example:
        >>> import torch, implicitlayers as il
        >>> from implicitlayers.imaging import DEGRADCell, DnCNN, GaussianBlur, add_noise
        >>> A = GaussianBlur(kernel_size=5, std=5.0, channels=1)
        >>> D = DnCNN(channels=1, depth=3, width=8)  # R = the noise D predicts
        >>> cell = DEGRADCell(A, D, step_size=0.1, residual_regularizer=True)
        >>> _ = cell.eval()  # batch norm on running statistics: one map per sample
        >>> d = add_noise(A(torch.rand(2, 1, 16, 16) * 2 - 1), 0.01)
        >>> deq = il.DEQ(cell, solver=il.Anderson(max_iter=30), backward=il.JFB())
        >>> x, result = deq(d, z0=cell.initial_point(d))
        >>> x.shape, bool(result.converged.all())
        (torch.Size([2, 1, 16, 16]), True)
        >>> x.mean().backward()  # gradients reach the DnCNN and the step size
    """

    def __init__(
        self,
        operator: LinearOperator,
        regularizer: nn.Module,
        *,
        step_size: float = 0.1,
        clamp: tuple[float, float] | None = (-1.0, 1.0),
        residual_regularizer: bool = False,
        max_step_size: float | None = None,
        learn_step_size: bool = True,
        anchor_weight: float = 0.0,
    ) -> None:
        super().__init__()
        operator = check_operator("operator", operator)
        check_float("anchor_weight", anchor_weight, low=0.0)
        if not callable(regularizer):
            raise TypeError(f"regularizer must be an nn.Module or callable, got {regularizer!r}")
        if not isinstance(residual_regularizer, bool):
            raise TypeError(f"residual_regularizer must be a bool, got {residual_regularizer!r}")
        if not isinstance(learn_step_size, bool):
            raise TypeError(f"learn_step_size must be a bool, got {learn_step_size!r}")
        if max_step_size is not None:
            check_float("max_step_size", max_step_size, low=0.0, low_open=True)
            check_float(
                "step_size", step_size, low=0.0, high=max_step_size, low_open=True, high_open=True
            )
            cap = max_step_size * _CAP_MARGIN
            step = min(step_size, cap * (1 - 1e-6))
            raw = math.log(step / (cap - step))  # logit(step / cap)
        else:
            check_float("step_size", step_size, low=0.0, low_open=True)
            raw = step_size + math.log(-math.expm1(-step_size))  # softplus^{-1}
        self.clamp = _check_clamp(clamp)
        self.operator = operator
        self.regularizer = regularizer
        self.residual_regularizer = residual_regularizer
        self.max_step_size = None if max_step_size is None else float(max_step_size)
        self.anchor_weight = float(anchor_weight)
        self.raw_step_size: Tensor
        if learn_step_size:
            self.raw_step_size = nn.Parameter(torch.tensor(float(raw)))
        else:  # a buffer: saved in the state_dict and moved by .to(), never trained
            self.register_buffer("raw_step_size", torch.tensor(float(raw)))

    @classmethod
    def contractive(
        cls,
        operator: LinearOperator,
        denoiser: ContractiveDnCNN,
        *,
        step_size: float = 0.1,
        clamp: tuple[float, float] | None = (-1.0, 1.0),
        learn_step_size: bool = True,
        anchor_weight: float = 0.0,
    ) -> DEGRADCell:
        r"""The provably contractive cell: :math:`R(x) = x - D(x)`,
        :math:`\operatorname{Lip}(D) < 1`, and :math:`\eta \in (0, 2/3)`.

        See the class docstring for the argument; :meth:`lipschitz_bound` evaluates
        :math:`c + \eta \operatorname{Lip}(D)`, :math:`1 - \eta(1 - \operatorname{Lip}(D))`
        without an anchor.

        Args:
            operator: A :class:`LinearOperator` whose
                :meth:`~LinearOperator.norm_bound` is at most 1 (as :class:`GaussianBlur`'s
                is); the default bound, ``inf``, is refused.
            denoiser: A :class:`ContractiveDnCNN`.
            step_size: Initial :math:`\eta \in (0, 2/3)`.
            clamp: As in the constructor.
            learn_step_size: As in the constructor.
            anchor_weight: As in the constructor.

        Example:
            >>> import torch
            >>> from implicitlayers.imaging import ContractiveDnCNN, DEGRADCell, GaussianBlur
            >>> D = ContractiveDnCNN(channels=1, depth=3, width=8, input_size=(16, 16))
            >>> cell = DEGRADCell.contractive(GaussianBlur(5, 5.0, 1), D, step_size=0.5)
            >>> cell.lipschitz_bound() < 1
            True
        """
        if not isinstance(denoiser, ContractiveDnCNN):
            raise TypeError(
                "denoiser must be a ContractiveDnCNN (its Lipschitz bound is what makes the "
                f"cell contractive), got {type(denoiser).__name__}"
            )
        _operator_norm_bound(check_operator("operator", operator))
        return cls(
            operator,
            denoiser,
            step_size=step_size,
            clamp=clamp,
            residual_regularizer=True,
            max_step_size=CONTRACTIVE_MAX_STEP,
            learn_step_size=learn_step_size,
            anchor_weight=anchor_weight,
        )

    @property
    def step_size(self) -> Tensor:
        r"""The current :math:`\eta > 0` (a differentiable 0-d tensor)."""
        if self.max_step_size is None:
            return F.softplus(self.raw_step_size)
        return self.max_step_size * _CAP_MARGIN * torch.sigmoid(self.raw_step_size)

    def extra_repr(self) -> str:
        return (
            f"step_size={float(self.step_size.detach()):.4g}, clamp={self.clamp}, "
            f"residual_regularizer={self.residual_regularizer}"
        )

    def forward(self, x: Tensor, d: Tensor, anchor: Tensor | None = None) -> Tensor:
        r""":math:`T(x; d)` for iterate ``x`` and measurements ``d``, both ``(B, C, H, W)``;
        ``anchor``: :math:`x_0` of the anchor term (zeros when ``None``), shaped like ``x``."""
        data_grad = self.operator.adjoint(self.operator(x) - d)
        reg: Tensor = self.regularizer(x)
        if self.residual_regularizer:
            reg = x - reg
        if self.anchor_weight:
            reg = reg + self.anchor_weight * (x if anchor is None else x - anchor)
        out = x - self.step_size * (data_grad + reg)
        if self.clamp is not None:
            out = out.clamp(self.clamp[0], self.clamp[1])
        return out

    def initial_point(
        self,
        d: Tensor,
        *,
        method: Literal["adjoint", "cg"] = "adjoint",
        cg_max_iter: int = 11,
        tikhonov: float = 0.01,
    ) -> Tensor:
        r"""A starting iterate for the fixed-point solve (computed without autograd).

        ``"adjoint"`` returns :math:`A^\top d`; ``"cg"`` solves
        :math:`(A^\top A + \lambda I) x = A^\top d` from zero by :func:`tikhonov_cg`
        (:math:`\lambda` = ``tikhonov``, its default tolerances) within ``cg_max_iter``
        products, as Gilton et al. do: the default 11 is 10 CG steps and the product that
        measures the residual.

        Args:
            d: ``(B, C, H, W)`` measurements.
            method: ``"adjoint"`` or ``"cg"``.
            cg_max_iter: The budget of :func:`tikhonov_cg` for ``"cg"`` (its ``max_iter``).
            tikhonov: :math:`\lambda \ge 0` for ``"cg"``.

        Returns:
            ``(B, C, H, W)`` detached initial point.
        """
        check_choice("method", method, ("adjoint", "cg"))
        check_int("cg_max_iter", cg_max_iter, minimum=1)
        check_float("tikhonov", tikhonov, low=0.0)
        with torch.no_grad():
            if method == "adjoint":
                return self.operator.adjoint(d)
            return tikhonov_cg(self.operator, d, lam=tikhonov, max_iter=cg_max_iter)

    def lipschitz_bound(self) -> float:
        r"""The guaranteed :math:`c + \eta \operatorname{Lip}(D)` of a contractive cell (the
        class docstring's bound; :math:`1 - \eta (1 - \operatorname{Lip}(D))` without anchor).

        Raises:
            ValueError: When the cell is not configured as by :meth:`contractive`.
        """
        if not (
            self.residual_regularizer
            and isinstance(self.regularizer, ContractiveDnCNN)
            and self.max_step_size is not None
            and self.max_step_size <= CONTRACTIVE_MAX_STEP
        ):
            raise ValueError(
                "this DEGRADCell has no Lipschitz guarantee; build it with "
                "DEGRADCell.contractive(operator, ContractiveDnCNN(...))"
            )
        _operator_norm_bound(self.operator)
        eta, lam = float(self.step_size.detach()), self.anchor_weight
        linear = max(abs(1.0 - eta * (2.0 + lam)), abs(1.0 - eta * (1.0 + lam)))
        return linear + eta * self.regularizer.lipschitz_bound()


def _operator_norm_bound(operator: LinearOperator) -> float:
    value = float(operator.norm_bound())
    name = type(operator).__name__
    if math.isinf(value):
        raise ValueError(
            "the contraction argument needs a certified ||A|| <= 1, but "
            f"{name}.norm_bound() = inf (LinearOperator's default: no bound known); override "
            f"norm_bound() in {name} to return one"
        )
    if value > 1.0 + 1e-6:
        raise ValueError(
            f"the contraction argument needs ||A|| <= 1, but {name}.norm_bound() = {value}; "
            "rescale the operator (and the data) so its norm is at most 1"
        )
    return value


def _check_clamp(clamp: tuple[float, float] | None) -> tuple[float, float] | None:
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise TypeError(f"clamp must be a (low, high) pair or None, got {clamp!r}")
    low, high = clamp
    check_float("clamp[0]", low)
    check_float("clamp[1]", high)
    if not low < high:
        raise ValueError(f"clamp must satisfy low < high, got {clamp!r}; e.g. (-1.0, 1.0)")
    return (float(low), float(high))
