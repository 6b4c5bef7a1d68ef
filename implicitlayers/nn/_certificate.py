r"""Certificates of monotone equilibrium layers: exact spectral constants, rates, error bounds.

Everything here runs in float64 without autograd, on the matrices of :math:`M = I - W` in a
basis that block-diagonalises it (one block for a dense layer, one per spatial frequency for a
periodic convolution). Blocks of an orthogonal (unitary) block-diagonalisation have the same
eigenvalues and singular values as :math:`M` restricted to their subspaces, so every constant
below is exact for the operator, up to float64 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["MonotoneCertificate"]

Splitting = Literal["forward-backward", "peaceman-rachford"]
SPLITTINGS: tuple[Splitting, ...] = ("forward-backward", "peaceman-rachford")

#: Blocks processed at once (a 64x64 image with 64 channels has 2,112 blocks of 64x64).
_CHUNK = 512


@dataclass(frozen=True)
class Spectrum:
    r"""Exact constants of :math:`M = I - W` (float64).

    Attributes:
        monotonicity: :math:`\mu = \lambda_{\min}\big((M + M^\top)/2\big)`, the strong
            monotonicity of :math:`M`.
        lipschitz: :math:`L = \|M\|_2 = \|I - W\|_2`.
        weight_norm: :math:`\|W\|_2`.
    """

    monotonicity: float
    lipschitz: float
    weight_norm: float


def _chunks(blocks: Tensor) -> list[Tensor]:
    """``blocks`` in slices of at most ``_CHUNK`` matrices (bounded temporary memory)."""
    return [blocks[i : i + _CHUNK] for i in range(0, blocks.shape[0], _CHUNK)]


def _max_norm(blocks: Tensor) -> float:
    r"""Largest spectral norm of a batch of blocks, in chunks: :math:`\sqrt{\lambda_{\max}
    (B^H B)}`, as accurate as a singular-value decomposition for the largest singular value
    (relative error of order the float64 epsilon) and two to three times faster on a CPU."""
    return max(
        math.sqrt(max(0.0, float(torch.linalg.eigvalsh(c.mH @ c)[..., -1].max())))
        for c in _chunks(blocks)
    )


def spectrum(blocks: Tensor) -> Spectrum:
    """The constants of :class:`Spectrum` from the ``(K, n, n)`` blocks of :math:`M`."""
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    mu = min(float(torch.linalg.eigvalsh((c + c.mH) / 2)[..., 0].min()) for c in _chunks(blocks))
    return Spectrum(
        monotonicity=mu, lipschitz=_max_norm(blocks), weight_norm=_max_norm(eye - blocks)
    )


def default_alpha(splitting: Splitting, spec: Spectrum) -> float:
    r"""The step that minimises the textbook rate: :math:`\mu / L^2` (forward-backward),
    :math:`1 / L` (Peaceman-Rachford)."""
    if splitting == "forward-backward":
        return spec.monotonicity / spec.lipschitz**2
    return 1.0 / spec.lipschitz


def certified_alpha(splitting: Splitting, blocks: Tensor) -> float:
    r""":func:`default_alpha` computing only the constants it needs (:math:`L`, and
    :math:`\mu` for forward-backward)."""
    lipschitz = _max_norm(blocks)
    if splitting == "peaceman-rachford":
        return 1.0 / lipschitz
    mu = min(float(torch.linalg.eigvalsh((c + c.mH) / 2)[..., 0].min()) for c in _chunks(blocks))
    return mu / lipschitz**2


def textbook_rate(splitting: Splitting, alpha: float, m: float, lipschitz: float) -> float:
    r"""The contraction factor that follows from strong monotonicity :math:`m` and
    :math:`L = \|I - W\|_2` alone (any operator with these two constants).

    Forward-backward: :math:`\sqrt{1 - 2\alpha m + \alpha^2 L^2}`; Peaceman-Rachford:
    :math:`\sqrt{1 - 4\alpha m / (1 + 2\alpha m + \alpha^2 L^2)}` (Giselsson, 2017).
    """
    a, L = alpha, lipschitz
    if splitting == "forward-backward":
        return math.sqrt(max(0.0, 1.0 - 2.0 * a * m + a * a * L * L))
    return math.sqrt(max(0.0, 1.0 - 4.0 * a * m / (1.0 + 2.0 * a * m + a * a * L * L)))


def exact_rate(splitting: Splitting, alpha: float, blocks: Tensor) -> float:
    r"""The Lipschitz constant of the linear part of the splitting operator, exactly.

    Forward-backward: :math:`\|I - \alpha M\|_2`; Peaceman-Rachford: the norm of the reflected
    resolvent :math:`\|(I - \alpha M)(I + \alpha M)^{-1}\|_2`. The proximal part (a
    projection, or the reflection :math:`2\,\mathrm{prox} - I`) is non-expansive, so each is
    a contraction factor of the whole iteration, at most :func:`textbook_rate`.
    """
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    best = 0.0
    for c in _chunks(blocks):
        step = eye - alpha * c
        if splitting == "peaceman-rachford":
            # (I - aM)(I + aM)^{-1} = solve((I + aM)^T, (I - aM)^T)^T; the two factors commute.
            step = torch.linalg.solve(eye + alpha * c, step)
        best = max(best, _max_norm(step))
    return best


@dataclass(frozen=True, kw_only=True)
class MonotoneCertificate:
    r"""What a monotone equilibrium layer guarantees, as numbers (all exact for the weights at
    the forward that produced it, computed in float64).

    For the equilibrium :math:`z^\star = \sigma(W z^\star + U x + b)` with
    :math:`I - W` strongly monotone (:math:`\tfrac12 (M + M^\top) \succeq \mu I`,
    :math:`M = I - W`) and :math:`\sigma` a proximal operator (ReLU), :math:`z^\star` exists
    and is unique for every input [Winston2020]_. The splitting iteration

    - forward-backward: :math:`z_{k+1} = \sigma\big(z_k - \alpha (M z_k - U x - b)\big)`,
    - Peaceman-Rachford, on an auxiliary :math:`u` with :math:`z = \sigma(u)`:
      :math:`u_{k+1} = C_F\, C_G\, u_k`, :math:`C = 2R - I` the reflected resolvents of
      :math:`F(z) = Mz - Ux - b` and of the nonlinearity,

    is a contraction with factor :attr:`rate` :math:`\gamma`, so with :math:`r_k` the
    residual :math:`\|T(v_k) - v_k\|` of the iterated variable :math:`v` (:math:`z` or
    :math:`u`), every iterate satisfies

    .. math::

        r_{k+1} \le \gamma\, r_k, \qquad
        \|z_k - z^\star\| \le c\, r_k \le c\, \gamma^k r_0,

    with :math:`c` = :attr:`error_factor`. :meth:`error_bound` evaluates :math:`c\, r` for a
    :class:`~implicitlayers.SolverResult`'s ``residual`` (a posteriori); :meth:`error_after`
    the a-priori bound after :math:`k` iterations and :meth:`iterations` the a-priori number
    of iterations for a target error.

    Attributes:
        splitting: ``"forward-backward"`` or ``"peaceman-rachford"``.
        alpha: The step :math:`\alpha` used.
        margin: :math:`m`, the margin of the parametrisation: :math:`\mu \ge m` for any weights.
        monotonicity: :math:`\mu`, the exact strong monotonicity of :math:`I - W`
            (:math:`\ge m`).
        lipschitz: :math:`L = \|I - W\|_2`, exact.
        weight_norm: :math:`\|W\|_2`, exact (it may exceed 1: monotone layers need no
            contraction of :math:`z \mapsto Wz`).
        rate: :math:`\gamma`, the contraction factor of the iteration: the exact norm of the
            linear part of the splitting operator (:math:`\|I - \alpha M\|_2`, or
            :math:`\|(I - \alpha M)(I + \alpha M)^{-1}\|_2`); the iteration is certified when
            it is below 1 (:attr:`certified`).
        rate_from_margin: The textbook factor in terms of :math:`m` and :math:`L` alone,
            :math:`\sqrt{1 - 2\alpha m + \alpha^2 L^2}` (forward-backward) or
            :math:`\sqrt{1 - 4\alpha m / (1 + 2\alpha m + \alpha^2 L^2)}`
            (Peaceman-Rachford); never below :attr:`rate`.
        error_factor: :math:`c` with :math:`\|z - z^\star\| \le c\, r` for the returned
            :math:`z` and its residual :math:`r`: :math:`1 / (1 - \gamma)`, and for
            forward-backward also :math:`1 + \gamma / (\alpha\mu)` (strong monotonicity; it
            holds for any :math:`\alpha > 0`), whichever is smaller; ``inf`` when nothing is
            certified.
        natural_factor: :math:`1 + \|W\|_2 / \mu`: for *any* :math:`z`,
            :math:`\|z - z^\star\| \le (1 + \|W\|_2/\mu)\, \|\sigma(Wz + Ux + b) - z\|`,
            whatever solver produced it (see ``MonotoneCell.certify``).
        state_shape: The per-sample shape of :math:`z` the constants are for (a periodic
            convolution's constants depend on the image size).
        output_lipschitz: For a Lipschitz-bounded cell (:class:`~implicitlayers.nn.LBEN`),
            the certified :math:`\gamma_{io}` with
            :math:`\|y(x) - y(x')\| \le \gamma_{io} \|x - x'\|` for the output map
            :math:`y = W_o z^\star + b_o`; ``None`` otherwise.
        lmi_margin: For :class:`~implicitlayers.nn.LBEN`: :math:`\lambda_{\min}` of
            :math:`2\,\mathrm{sym}(I - W) - \gamma_{io}^{-1}(W_o^\top W_o + U U^\top)`,
            the slack of the matrix inequality that proves the bound (positive: the bound
            holds; at least :math:`2m` by construction); ``None`` otherwise.

    Example:
        >>> import torch, implicitlayers as il
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> cell = il.nn.MonotoneLinear(4, 16, margin=0.5)
        >>> cert = cell.certificate((16,), il.nn.PeacemanRachford())
        >>> cert.monotonicity >= cert.margin, cert.rate <= cert.rate_from_margin < 1
        (True, True)
    """

    splitting: Splitting
    alpha: float
    margin: float
    monotonicity: float
    lipschitz: float
    weight_norm: float
    rate: float
    rate_from_margin: float
    error_factor: float
    natural_factor: float
    state_shape: tuple[int, ...]
    output_lipschitz: float | None = None
    lmi_margin: float | None = None

    @property
    def certified(self) -> bool:
        """Whether the iteration is a certified contraction (:attr:`rate` below 1)."""
        return self.rate < 1.0

    def error_bound(self, residual: Tensor) -> Tensor:
        r"""``(B,)`` bounds on :math:`\|z - z^\star\|`: :attr:`error_factor` times ``residual``.

        Args:
            residual: The splitting residuals :math:`\|T(v) - v\|` at the returned iterates,
                ``result.residual`` of the solve (in the solver's norm: an RMS residual gives
                an RMS error bound).
        """
        return residual * self.error_factor

    def error_after(self, iterations: int, initial_residual: float) -> float:
        r"""The a-priori bound :math:`c\, \gamma^k r_0` on :math:`\|z_k - z^\star\|` after
        :math:`k` = ``iterations`` iterations, for a first residual :math:`r_0`; ``inf`` when
        the iteration is not certified.

        Example:
            >>> import torch, implicitlayers as il
            >>> cell = il.nn.MonotoneLinear(2, 4, margin=0.5)
            >>> cert = cell.certificate((4,), il.nn.PeacemanRachford())
            >>> k = cert.iterations(1e-6, initial_residual=3.0)
            >>> cert.error_after(k, 3.0) <= 1e-6 < cert.error_after(k - 1, 3.0)
            True
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
        if not self.certified:
            return math.inf
        return self.error_factor * self.rate**iterations * initial_residual

    def iterations(self, error: float, initial_residual: float) -> int:
        r"""Iterations that guarantee :math:`\|z_k - z^\star\| \le` ``error`` a priori:
        the smallest :math:`k` with :math:`c\, \gamma^k r_0 \le` ``error``, for a first
        residual :math:`r_0` (``result.trace[0]``, or measured at the initial state).

        Raises:
            ValueError: When the iteration is not certified (``rate >= 1``), or for a
                non-positive ``error``.
        """
        if not error > 0:
            raise ValueError(f"error must be > 0, got {error!r}")
        if not self.certified:
            raise ValueError(
                f"the {self.splitting} iteration is not certified (rate {self.rate:.4g} >= 1), "
                "so no number of iterations is guaranteed; use a smaller alpha (alpha=None "
                "picks the certified one)"
            )
        target = error / (self.error_factor * initial_residual) if initial_residual > 0 else 1.0
        if target >= 1.0:
            return 0
        if self.rate == 0.0:
            return 1
        return math.ceil(math.log(target) / math.log(self.rate))

    def summary(self) -> str:
        """The certificate as lines of ``name: value`` (for a log or a safety case)."""
        lines = [f"{name}: {value}" for name, value in self._items()]
        return "\n".join(lines)

    def _items(self) -> list[tuple[str, object]]:
        items: list[tuple[str, object]] = [
            ("splitting", self.splitting),
            ("state shape", self.state_shape),
            ("step alpha", f"{self.alpha:.6g}"),
            ("margin m", f"{self.margin:.6g}"),
            ("strong monotonicity mu of I - W", f"{self.monotonicity:.6g}"),
            ("||I - W||_2", f"{self.lipschitz:.6g}"),
            ("||W||_2", f"{self.weight_norm:.6g}"),
            ("contraction rate (exact)", f"{self.rate:.6g}"),
            ("contraction rate from m and ||I - W||", f"{self.rate_from_margin:.6g}"),
            ("error <= c * residual, c", f"{self.error_factor:.6g}"),
            ("error <= c * ||f(z) - z||, c", f"{self.natural_factor:.6g}"),
        ]
        if self.output_lipschitz is not None:
            items.append(("Lipschitz bound of x -> y", f"{self.output_lipschitz:.6g}"))
            items.append(("LMI slack (> 0 proves it)", f"{self.lmi_margin:.6g}"))
        return items


def build(
    blocks: Tensor,
    *,
    splitting: Splitting,
    alpha: float | None,
    margin: float,
    state_shape: tuple[int, ...],
    output_lipschitz: float | None = None,
    lmi_margin: float | None = None,
) -> MonotoneCertificate:
    """The certificate of a layer whose :math:`M = I - W` has the float64 ``blocks``."""
    spec = spectrum(blocks)
    if spec.monotonicity <= 0:
        # Cannot happen for a parametrised layer (mu >= m > 0) unless the weights overflow.
        raise ValueError(
            f"I - W is not strongly monotone (lambda_min of its symmetric part is "
            f"{spec.monotonicity:.3g}); check the weights for overflow"
        )
    step = default_alpha(splitting, spec) if alpha is None else alpha
    rate = exact_rate(splitting, step, blocks)
    factor = 1.0 / (1.0 - rate) if rate < 1.0 else math.inf
    if splitting == "forward-backward":
        # z' = prox(z - a F(z)) and 0 in F(z*) + dg(z*): monotonicity of dg gives
        # a mu ||z' - z*|| <= ||(I - aM)(z - z')||, so ||z - z*|| <= (1 + rate / (a mu)) r.
        factor = min(factor, 1.0 + rate / (step * spec.monotonicity))
    return MonotoneCertificate(
        splitting=splitting,
        alpha=step,
        margin=margin,
        monotonicity=spec.monotonicity,
        lipschitz=spec.lipschitz,
        weight_norm=spec.weight_norm,
        rate=rate,
        rate_from_margin=textbook_rate(splitting, step, margin, spec.lipschitz),
        error_factor=factor,
        natural_factor=1.0 + spec.weight_norm / spec.monotonicity,
        state_shape=state_shape,
        output_lipschitz=output_lipschitz,
        lmi_margin=lmi_margin,
    )
