r"""The classical baselines of the comparison, tuned on validation images only.

Every baseline's hyperparameter is chosen by the mean standard PSNR of its (clamped)
reconstructions of *validation* measurements; the test split is held in a
:class:`SealedDataset` that raises if anything reads it before the final evaluation, so the
tuning cannot touch it by construction.

* direct inverse: Fourier division, no regularisation (nothing to tune), and, to show what
  regularisation buys, the same with a Wiener-type :math:`\epsilon` tuned;
* gradient descent on :math:`\frac12\|Ax - d\|^2` (Landweber, step :math:`1/\|A\|^2`) with the
  number of steps chosen on validation (early stopping is the regulariser), and with a
  Tikhonov term :math:`\frac{\lambda}{2}\|x\|^2` (:math:`\lambda` and steps tuned);
* Tikhonov-CG: 60 steps, :math:`\lambda = 0.01`, the classical anchor (fixed, not tuned);
* TV by Chambolle-Pock: :math:`\lambda` tuned on a log grid;
* Plug-and-Play proximal gradient with the flagship's pretrained denoiser as the prior:
  strength, step and iteration count tuned.

All reconstructions are clamped to :math:`[-1, 1]` before scoring, as DE-GRAD's are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from implicitlayers.imaging import (
    GaussianBlur,
    direct_inverse,
    gradient_descent,
    pnp_deblur,
    psnr_standard,
    tikhonov_cg,
    tv_deblur,
)

__all__ = [
    "BASELINES",
    "BaselineSettings",
    "SealedDataset",
    "Tuned",
    "reconstruct",
    "tune_baselines",
]

#: Baseline keys and their row names, in table order.
BASELINES = {
    "direct_inverse": "Direct inverse (Fourier division)",
    "wiener": "Direct inverse + Wiener eps",
    "gradient_descent": "Gradient descent, early stopping",
    "gradient_descent_tikhonov": "Gradient descent + Tikhonov",
    "tikhonov_cg": "Tikhonov-CG (60 steps, lambda 0.01)",
    "tv": "TV (Chambolle-Pock)",
    "pnp": "Plug-and-Play (pretrained DnCNN)",
}


class SealedDataset(Dataset[Tensor]):
    """A dataset that refuses to be read until :meth:`unseal` is called.

    It holds the test split while baselines are tuned and networks trained, so that any
    access from those phases fails loudly instead of silently leaking test images.

    Args:
        inner: The dataset to guard.
        name: Its name, for the error message.
    """

    def __init__(self, inner: Dataset[Tensor], name: str = "test") -> None:
        self.inner = inner
        self.name = name
        self.sealed = True

    def unseal(self) -> None:
        """Allow reads (the final evaluation)."""
        self.sealed = False

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tensor:
        if self.sealed:
            raise RuntimeError(
                f"the {self.name} split was read before the final evaluation; tuning and "
                "training may use only the training and validation splits"
            )
        return self.inner[index]


@dataclass
class BaselineSettings:
    """Search spaces of the baselines (each tuned on validation images).

    Attributes:
        wiener_eps: Grid of the Wiener :math:`\\epsilon`.
        gd_max_steps: Longest gradient-descent run; the best step count up to it is kept.
        gd_tikhonov: Grid of gradient descent's Tikhonov :math:`\\lambda`.
        cg_steps: Tikhonov-CG steps (fixed).
        cg_lambda: Tikhonov-CG :math:`\\lambda` (fixed).
        tv_lambdas: Grid of the TV weight :math:`\\lambda`.
        tv_iters: Chambolle-Pock iterations.
        pnp_strengths: Grid of the PnP denoiser strength :math:`s`.
        pnp_steps: Grid of the PnP step :math:`\\tau`.
        pnp_max_iters: Longest PnP run; the best iteration count up to it is kept.
    """

    wiener_eps: list[float] = field(default_factory=lambda: _log_grid(1e-4, 1e-1, 7))
    gd_max_steps: int = 500
    gd_tikhonov: list[float] = field(default_factory=lambda: _log_grid(1e-4, 1e-1, 7))
    cg_steps: int = 60
    cg_lambda: float = 0.01
    tv_lambdas: list[float] = field(default_factory=lambda: _log_grid(1e-4, 1e-1, 7))
    tv_iters: int = 400
    pnp_strengths: list[float] = field(
        default_factory=lambda: [0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0]
    )
    pnp_steps: list[float] = field(default_factory=lambda: [1.0, 1.9])
    pnp_max_iters: int = 100


def _log_grid(low: float, high: float, n: int) -> list[float]:
    """``n`` log-spaced values from ``low`` to ``high``, rounded to 3 significant digits."""
    ratio = (high / low) ** (1 / max(n - 1, 1))
    return [float(f"{low * ratio**i:.3g}") for i in range(n)]


@dataclass
class Tuned:
    """A baseline's chosen hyperparameters and what the search saw.

    Attributes:
        params: The chosen hyperparameters (keyword arguments of :func:`reconstruct`).
        val_psnr_standard: Mean validation PSNR at the choice.
        search: Every candidate tried, with its validation PSNR.
        note: What was tuned and how (or why nothing was).
        at_edge: Whether the choice lies on the edge of its grid (widen it).
    """

    params: dict[str, Any]
    val_psnr_standard: float
    search: list[dict[str, Any]]
    note: str
    at_edge: bool = False


def _score(x_hat: Tensor, x: Tensor) -> float:
    return float(psnr_standard(x_hat.clamp(-1, 1), x).mean())


def _best_step(
    run: Callable[[Callable[[int, Tensor], None]], None], x: Tensor
) -> tuple[int, float, list[float]]:
    """Run an iteration with a per-step callback; return the best step, its PSNR, the curve."""
    curve: list[float] = []
    run(lambda k, x_k: curve.append(_score(x_k, x)))
    best = max(range(len(curve)), key=curve.__getitem__)
    return best + 1, curve[best], curve


def _edge(grid: Sequence[float], value: float) -> bool:
    return len(grid) > 1 and value in (min(grid), max(grid))


def tune_baselines(
    operator: GaussianBlur,
    x: Tensor,
    d: Tensor,
    denoiser: nn.Module,
    settings: BaselineSettings,
) -> dict[str, Tuned]:
    """Tune every baseline on validation images.

    Args:
        operator: The blur :math:`A`.
        x: ``(N, 3, H, W)`` validation ground truth in :math:`[-1, 1]`.
        d: ``(N, 3, H, W)`` their measurements.
        denoiser: The pretrained denoiser :math:`D` (eval mode) for Plug-and-Play.
        settings: The search spaces.

    Returns:
        The tuned settings, by baseline key (see :data:`BASELINES`).
    """
    tuned: dict[str, Tuned] = {}
    with torch.no_grad():
        tuned["direct_inverse"] = Tuned(
            {"eps": 0.0},
            _score(reconstruct("direct_inverse", operator, d, denoiser, {"eps": 0.0}), x),
            [],
            "no regularisation: nothing to tune",
        )
        search = []
        for eps in settings.wiener_eps:
            value = _score(direct_inverse(operator, d, eps=eps), x)
            search.append({"eps": eps, "val_psnr_standard": value})
        best = max(search, key=lambda r: r["val_psnr_standard"])
        tuned["wiener"] = Tuned(
            {"eps": best["eps"]},
            best["val_psnr_standard"],
            search,
            f"eps on a log grid of {len(search)}",
            _edge(settings.wiener_eps, best["eps"]),
        )
        tuned["gradient_descent"] = _tune_gd(operator, x, d, settings, [0.0])
        tuned["gradient_descent_tikhonov"] = _tune_gd(
            operator, x, d, settings, settings.gd_tikhonov
        )
        cg_params: dict[str, Any] = {"lam": settings.cg_lambda, "steps": settings.cg_steps}
        tuned["tikhonov_cg"] = Tuned(
            cg_params,
            _score(tikhonov_cg(operator, d, lam=settings.cg_lambda, steps=settings.cg_steps), x),
            [],
            "fixed (the classical anchor), not tuned",
        )
        search = []
        for lam in settings.tv_lambdas:
            value = _score(tv_deblur(operator, d, lam=lam, iters=settings.tv_iters), x)
            search.append({"lam": lam, "val_psnr_standard": value})
        best = max(search, key=lambda r: r["val_psnr_standard"])
        tuned["tv"] = Tuned(
            {"lam": best["lam"], "iters": settings.tv_iters},
            best["val_psnr_standard"],
            search,
            f"lambda on a log grid of {len(search)}, {settings.tv_iters} iterations",
            _edge(settings.tv_lambdas, best["lam"]),
        )
        tuned["pnp"] = _tune_pnp(operator, x, d, denoiser, settings)
    return tuned


def _tune_gd(
    operator: GaussianBlur,
    x: Tensor,
    d: Tensor,
    settings: BaselineSettings,
    lambdas: list[float],
) -> Tuned:
    search = []
    for lam in lambdas:

        def run(callback: Callable[[int, Tensor], None], lam: float = lam) -> None:
            gradient_descent(
                operator, d, steps=settings.gd_max_steps, tikhonov=lam, callback=callback
            )

        steps, value, _ = _best_step(run, x)
        search.append({"tikhonov": lam, "steps": steps, "val_psnr_standard": value})
    best = max(search, key=lambda r: r["val_psnr_standard"])
    what = "steps" if lambdas == [0.0] else f"tikhonov on a log grid of {len(lambdas)}, and steps"
    edge = best["steps"] == settings.gd_max_steps or (
        lambdas != [0.0] and _edge(lambdas, best["tikhonov"])
    )
    return Tuned(
        {"tikhonov": best["tikhonov"], "steps": best["steps"]},
        best["val_psnr_standard"],
        search,
        f"{what} (early stopping, up to {settings.gd_max_steps})",
        edge,
    )


def _tune_pnp(
    operator: GaussianBlur,
    x: Tensor,
    d: Tensor,
    denoiser: nn.Module,
    settings: BaselineSettings,
) -> Tuned:
    search = []
    for strength in settings.pnp_strengths:
        for step in settings.pnp_steps:

            def run(
                callback: Callable[[int, Tensor], None],
                strength: float = strength,
                step: float = step,
            ) -> None:
                x_k = operator.adjoint(d)
                for k in range(1, settings.pnp_max_iters + 1):
                    x_k = pnp_deblur(
                        operator, d, denoiser, iters=1, step_size=step, strength=strength, x0=x_k
                    )
                    callback(k, x_k)

            iters, value, _ = _best_step(run, x)
            search.append(
                {
                    "strength": strength,
                    "step_size": step,
                    "iters": iters,
                    "val_psnr_standard": value,
                }
            )
    best = max(search, key=lambda r: r["val_psnr_standard"])
    edge = (_edge(settings.pnp_strengths, best["strength"]) and best["strength"] < 1.0) or best[
        "iters"
    ] == settings.pnp_max_iters
    return Tuned(
        {k: best[k] for k in ("strength", "step_size", "iters")},
        best["val_psnr_standard"],
        search,
        f"strength x step on a {len(settings.pnp_strengths)}x{len(settings.pnp_steps)} grid, "
        f"and iterations (up to {settings.pnp_max_iters})",
        edge,
    )


def reconstruct(
    key: str,
    operator: GaussianBlur,
    d: Tensor,
    denoiser: nn.Module,
    params: dict[str, Any],
) -> Tensor:
    """Run baseline ``key`` with ``params`` on measurements ``d``; clamp to :math:`[-1, 1]`.

    Raises:
        ValueError: For an unknown key.
    """
    with torch.no_grad():
        if key in ("direct_inverse", "wiener"):
            x = direct_inverse(operator, d, eps=params["eps"])
        elif key in ("gradient_descent", "gradient_descent_tikhonov"):
            x = gradient_descent(operator, d, steps=params["steps"], tikhonov=params["tikhonov"])
        elif key == "tikhonov_cg":
            x = tikhonov_cg(operator, d, lam=params["lam"], steps=params["steps"])
        elif key == "tv":
            x = tv_deblur(operator, d, lam=params["lam"], iters=params["iters"])
        elif key == "pnp":
            x = pnp_deblur(
                operator,
                d,
                denoiser,
                iters=params["iters"],
                step_size=params["step_size"],
                strength=params["strength"],
            )
        else:
            raise ValueError(f"unknown baseline {key!r}; expected one of {', '.join(BASELINES)}")
    if not bool(torch.isfinite(x).all()):
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    out: Tensor = x.clamp(-1.0, 1.0)
    return out
