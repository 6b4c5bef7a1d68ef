r"""deepinv's ``LinearPhysics`` operators inside the DE-GRAD cell: adjoint test, DEQ, Tikhonov-CG.

Each operator :math:`A` below is a real deepinv physics, wrapped in
:class:`implicitlayers.imaging.PhysicsOperator` (its ``A`` and ``A_adjoint``). For each one:

1. the adjoint test on random :math:`x, y` with i.i.d. standard normal entries,
   :math:`e = |\langle A x, y \rangle - \langle x, A^\top y \rangle| /
   \max(\|A x\|, \|A^\top y\|)` (:meth:`~implicitlayers.imaging.LinearOperator.check_adjoint`),
   in float64 (rounding level, about 1e-16, for an exact adjoint);
2. a DE-GRAD solve, :math:`x = T(x; d) = \Pi(x - \eta (A^\top (A x - d) + x - D_\theta(x)))`
   with a small spectrally normalised DnCNN :math:`D_\theta` (the cell in ``eval()`` mode)
   and :math:`\eta = 1 / (\|A\|^2 + 1)`, a contraction when :math:`\mathrm{Lip}(D_\theta) < 1`
   (:math:`|1 - \eta \lambda| \le 1 - \eta` on the spectrum of :math:`A^\top A + I`), by
   :class:`implicitlayers.DEQ` (Anderson, ``rtol`` 1e-8 in float64 and 1e-4 in float32, JFB)
   on two images, reporting the fraction of converged samples, the largest iteration count
   and the norm of the loss gradient with respect to the DnCNN's parameters (each parameter
   must receive a nonzero gradient);
3. :func:`implicitlayers.imaging.tikhonov_cg`, reporting the relative residual
   :math:`\|A^\top d - (A^\top A + \lambda I) x\| / \|A^\top d\|`.

Needs deepinv (``pip install deepinv``; it is not a dependency of implicitlayers) and exits
with a message, status 0, where it is absent. Run::

    python benchmarks/deepinv_check.py
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

import implicitlayers as il
from implicitlayers.imaging import (
    DEGRADCell,
    DnCNN,
    PhysicsOperator,
    operator_norm,
    tikhonov_cg,
)

F64 = torch.float64
BATCH = 2
SIZE = 32
SEED = 0
LAM = 0.01


@dataclass(frozen=True)
class Case:
    """One deepinv operator: its name, a factory, the image shape ``(C, H, W)``, the dtype."""

    name: str
    make: Callable[[], object]
    shape: tuple[int, int, int]
    dtype: torch.dtype = F64


def cases(dinv: ModuleType) -> list[Case]:
    """The operators under test, built in float64 where deepinv allows it.

    Each is built from float64 tensors rather than cast by ``.to(torch.float64)``: ``Module.to``
    with a real dtype drops the imaginary part of complex buffers (BlurFFT's phase, the
    Fourier filters of Downsampling), so a cast BlurFFT blurs with a different kernel.
    Decolorize holds real buffers only and is cast.
    """
    physics = dinv.physics
    blur = dinv.physics.functional.blur
    g = torch.Generator().manual_seed(SEED)
    mask = (torch.rand(3, SIZE, SIZE, generator=g) > 0.5).to(F64)
    mri_mask = (torch.rand(SIZE, SIZE, generator=g) > 0.6).to(F64)
    kernel = blur.gaussian_blur(sigma=(1.0, 1.0)).to(F64)
    return [
        Case(
            "Blur (circular)",
            lambda: physics.Blur(filter=kernel, padding="circular"),
            (3, SIZE, SIZE),
        ),
        Case(
            "BlurFFT",
            lambda: physics.BlurFFT(img_size=(3, SIZE, SIZE), filter=kernel),
            (3, SIZE, SIZE),
        ),
        Case(
            "Inpainting (50%)",
            lambda: physics.Inpainting(img_size=(3, SIZE, SIZE), mask=mask),
            (3, SIZE, SIZE),
        ),
        Case("Decolorize", lambda: physics.Decolorize().to(F64), (3, SIZE, SIZE)),
        Case(
            "Downsampling (x2)",
            lambda: physics.Downsampling(
                img_size=(3, SIZE, SIZE), filter=kernel, factor=2, padding="circular"
            ),
            (3, SIZE, SIZE),
        ),
        Case(
            "MRI (40% mask)",
            lambda: physics.MRI(mask=mri_mask, img_size=(SIZE, SIZE)),
            (2, SIZE, SIZE),
        ),
        # deepinv's Radon transform keeps float32 grids: float64 inputs raise in grid_sample
        Case(
            "Tomography (float32)",
            lambda: physics.Tomography(angles=20, img_width=SIZE, normalize=True),
            (1, SIZE, SIZE),
            torch.float32,
        ),
    ]


def cg_budget(steps: int) -> dict[str, int]:
    """``tikhonov_cg``'s budget keyword (``max_iter``, or ``steps`` in older checkouts)."""
    params = inspect.signature(tikhonov_cg).parameters
    return {"max_iter" if "max_iter" in params else "steps": steps}


def check(case: Case) -> dict[str, str]:
    """Run the three checks on one operator; return the table row."""
    torch.manual_seed(SEED)
    dtype = case.dtype
    op = PhysicsOperator(case.make())
    like = torch.zeros(BATCH, *case.shape, dtype=dtype)
    error = op.check_adjoint(like, rtol=1.0, generator=torch.Generator().manual_seed(SEED))

    x_true = torch.rand(BATCH, *case.shape, dtype=dtype) * 2 - 1
    with torch.no_grad():
        d = op(x_true)
        d = d + 0.01 * torch.randn_like(d)
    norm = operator_norm(op, like)
    # Build the cell in the operator's dtype instead of calling cell.to(dtype): Module.to
    # with a real dtype drops the imaginary part of complex buffers (BlurFFT's filter).
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        denoiser = DnCNN(case.shape[0], depth=3, width=8, batch_norm=False)
        cell = DEGRADCell(
            op, denoiser, step_size=1.0 / (norm**2 + 1.0), residual_regularizer=True
        ).eval()
    finally:
        torch.set_default_dtype(default)
    rtol = 1e-8 if dtype == F64 else 1e-4
    deq = il.DEQ(cell, solver=il.Anderson(max_iter=200, rtol=rtol, atol=0.0), backward=il.JFB())
    x, result = deq(d, z0=cell.initial_point(d))
    ((x - x_true) ** 2).mean().backward()
    grads = [p.grad for p in denoiser.parameters()]
    if any(gr is None or not bool(gr.abs().sum() > 0) for gr in grads):
        raise RuntimeError(f"{case.name}: a DnCNN parameter received no gradient")
    grad_norm = float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads)))

    xt = tikhonov_cg(op, d, lam=LAM, **cg_budget(200))
    with torch.no_grad():
        rhs = op.adjoint(d)
        res = rhs - op.normal(xt) - LAM * xt
        cg_res = float(res.double().norm() / rhs.double().norm())
    return {
        "operator": case.name,
        "dtype": str(dtype).removeprefix("torch."),
        "||A||": f"{norm:.3f}",
        "adjoint rel. error": f"{error:.1e}",
        "DEQ converged": f"{float(result.converged.double().mean()):.2f}",
        "iterations": str(int(result.n_steps.max())),
        "grad norm": f"{grad_norm:.3e}",
        "CG rel. residual": f"{cg_res:.1e}",
    }


def table(rows: list[dict[str, str]]) -> str:
    """A Markdown table of ``rows``."""
    keys = list(rows[0])
    widths = [max(len(k), *(len(r[k]) for r in rows)) for k in keys]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(keys), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([r[k] for k in keys]) for r in rows]
    return "\n".join(out)


def main() -> int:
    if importlib.util.find_spec("deepinv") is None:
        print("deepinv is not installed: skipped (pip install deepinv to run this check)")
        return 0
    import deepinv as dinv
    import torchvision

    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"deepinv {dinv.__version__}, implicitlayers {il.__version__}"
    )
    rows, failures = [], []
    for case in cases(dinv):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                rows.append(check(case))
        except Exception as exc:  # report every operator, then fail
            failures.append(f"{case.name}: {type(exc).__name__}: {exc}")
    if rows:
        print(table(rows))
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
