r"""Imaging: the DE-GRAD deblurring domain (Gilton, Ongie & Willett, 2021).

Forward operators with exact adjoints (the base class :class:`LinearOperator`, with its
adjoint self-test, and :class:`GaussianBlur`), the DE-GRAD cell
:math:`T(x; d) = x - \eta (A^\top (A x - d) + R_\theta(x))` (:class:`DEGRADCell`), DnCNN
regularisers (:class:`DnCNN`, and the provably contractive :class:`ContractiveDnCNN`),
batched metrics (:func:`psnr`, :func:`ssim`), Lipschitz tools, and the classical baselines of
the comparison table (:func:`tikhonov_cg`, :func:`direct_inverse`, :func:`gradient_descent`,
:func:`tv_deblur`, :func:`pnp_deblur`).

References:
    Gilton, Ongie & Willett. *Deep Equilibrium Architectures for Inverse Problems in
    Imaging.* IEEE TCI, 2021 (DE-GRAD).
    Fung, Heaton, Li, McKenzie, Osher & Yin. *JFB: Jacobian-Free Backpropagation for Implicit
    Networks.* AAAI, 2022.
    Zhang, Zuo, Chen, Meng & Zhang. *Beyond a Gaussian Denoiser: Residual Learning of Deep
    CNN for Image Denoising.* IEEE TIP, 2017 (DnCNN).
    Wang, Bovik, Sheikh & Simoncelli. *Image Quality Assessment: From Error Visibility to
    Structural Similarity.* IEEE TIP, 2004 (SSIM).
    Chambolle & Pock. *A First-Order Primal-Dual Algorithm for Convex Problems with
    Applications to Imaging.* JMIV, 2011.
    Sedghi, Gupta & Long. *The Singular Values of Convolutional Layers.* ICLR, 2019.
"""

from ._baselines import direct_inverse, gradient_descent, operator_norm, pnp_deblur, tv_deblur
from ._contractive import ContractiveDnCNN, NormalizedConv2d
from ._degrad import DEGRADCell
from ._dncnn import DnCNN
from ._linear_operator import LinearOperator, PhysicsOperator
from ._lipschitz import circular_conv_norm, estimate_lipschitz
from ._metrics import psnr, psnr_paper, psnr_standard, ssim, ssim_standard
from ._norms import refresh_norms
from ._operators import GaussianBlur, add_noise, gaussian_kernel
from ._tikhonov import tikhonov_cg

__all__ = [
    "ContractiveDnCNN",
    "DEGRADCell",
    "DnCNN",
    "GaussianBlur",
    "LinearOperator",
    "NormalizedConv2d",
    "PhysicsOperator",
    "add_noise",
    "circular_conv_norm",
    "direct_inverse",
    "estimate_lipschitz",
    "gaussian_kernel",
    "gradient_descent",
    "operator_norm",
    "pnp_deblur",
    "psnr",
    "psnr_paper",
    "psnr_standard",
    "refresh_norms",
    "ssim",
    "ssim_standard",
    "tikhonov_cg",
    "tv_deblur",
]
