r"""Stability diagnostics of a DEQ cell :math:`f(z, x)` at a point :math:`z`.

- :func:`jacobian_penalty` (and its low-level form :func:`jacobian_frobenius`): the Jacobian
  regulariser of Bai, Koltun & Kolter (2021), a differentiable Hutchinson estimate of
  :math:`\|J_f(z)\|_F^2` per sample, to add to a training loss.
- :func:`spectral_radius` (and :func:`spectral_radius_of` for any batched linear map): the
  contraction diagnostic :math:`\rho(J_f(z))` per sample, by a matrix-free batched Arnoldi
  process, returned as a :class:`SpectralRadius`.

Both treat the samples of a batch independently and accept states that are tensors or
tuples/lists/dicts of tensors. See the guide page *Stability: Jacobian regularisation and
contraction diagnostics*.

References:
    S. Bai, V. Koltun and J. Z. Kolter. *Stabilizing Equilibrium Models by Jacobian
    Regularization.* International Conference on Machine Learning (ICML), 2021.
    arXiv:2106.14342.
"""

from ._jacobian import jacobian_frobenius, jacobian_penalty
from ._spectral import SpectralRadius, spectral_radius, spectral_radius_of

__all__ = [
    "SpectralRadius",
    "jacobian_frobenius",
    "jacobian_penalty",
    "spectral_radius",
    "spectral_radius_of",
]
