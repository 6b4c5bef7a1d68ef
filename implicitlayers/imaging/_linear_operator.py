r"""The linear-operator base class: :math:`A`, its adjoint, a norm bound and an adjoint test."""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import check_float

__all__ = ["LinearOperator"]


class LinearOperator(nn.Module, abc.ABC):
    r"""Base class of the forward operators :math:`A` of the imaging code.

    A subclass defines :meth:`forward` (:math:`x \mapsto A x`) and :meth:`adjoint`
    (:math:`y \mapsto A^\top y`) on batches whose leading dimension is the batch, and, when
    it knows one, :meth:`norm_bound`. The adjoint is the one of the Euclidean inner product
    over each sample's entries:

    .. math::

        \langle A x, y \rangle = \langle x, A^\top y \rangle
        \quad \text{for all } x, y, \qquad \langle u, v \rangle = \sum_i u_i v_i .

    Everything that reconstructs from measurements (:class:`DEGRADCell`,
    :func:`tikhonov_cg`, :func:`gradient_descent`, :func:`tv_deblur`, :func:`pnp_deblur`,
    :func:`operator_norm`) takes a ``LinearOperator``; :class:`GaussianBlur` is one. Being an
    ``nn.Module``, an operator's buffers follow ``.to()`` and it is registered as a submodule
    of the cell that holds it. Call :meth:`check_adjoint` once on an operator you write
    yourself: a wrong adjoint does not raise anywhere else, it only makes gradient steps
    wrong.

    Example:
        A 2x downsampler by average pooling, :math:`(A x)_{ij} = \frac14 \sum_{a, b \in
        \{0, 1\}} x_{2i + a,\, 2j + b}`, whose adjoint spreads each value over its 2x2 block
        (nearest upsampling divided by 4) and whose norm is :math:`1/2` (attained by a
        constant image):

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from implicitlayers.imaging import LinearOperator
        >>> class Downsample(LinearOperator):
        ...     def forward(self, x):
        ...         return F.avg_pool2d(x, 2)
        ...     def adjoint(self, y):
        ...         return F.interpolate(y, scale_factor=2, mode="nearest") / 4
        ...     def norm_bound(self):
        ...         return 0.5
        >>> A = Downsample()
        >>> A.check_adjoint(torch.zeros(2, 3, 8, 8, dtype=torch.float64)) < 1e-12
        True
    """

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        r"""Apply the operator: :math:`A x`."""

    @abc.abstractmethod
    def adjoint(self, y: Tensor) -> Tensor:
        r"""Apply the adjoint: :math:`A^\top y`."""

    def normal(self, x: Tensor) -> Tensor:
        r"""The normal operator :math:`A^\top A x` (by default ``self.adjoint(self(x))``;
        override it when there is a cheaper way, e.g. :math:`\mathcal F^{-1} M \mathcal F` for
        a masked Fourier transform)."""
        return self.adjoint(self(x))

    def norm_bound(self) -> float:
        r"""A guaranteed upper bound on the operator norm :math:`\|A\|_2`.

        The default, ``math.inf``, means "unknown": :func:`operator_norm` then estimates the
        norm by power iteration, and :meth:`DEGRADCell.contractive` refuses the operator
        (its contraction argument needs a certified :math:`\|A\|_2 \le 1`). Override it
        whenever a bound is known.
        """
        return math.inf

    def check_adjoint(
        self,
        like: Tensor,
        *,
        rtol: float | None = None,
        generator: torch.Generator | None = None,
    ) -> float:
        r"""Test :meth:`adjoint` against :meth:`forward` on random inputs.

        Draws :math:`x` with the shape, dtype and device of ``like`` and :math:`y` with the
        shape of :math:`A x`, both with i.i.d. standard normal entries, and returns

        .. math::

            e = \frac{|\langle A x, y \rangle - \langle x, A^\top y \rangle|}
                {\max(\|A x\|_2, \|A^\top y\|_2)},

        the inner products accumulated in float64. Given :math:`x`, :math:`\langle A x, y
        \rangle` is normal with standard deviation :math:`\|A x\|_2` (and
        :math:`\langle x, A^\top y \rangle` given :math:`y` with :math:`\|A^\top y\|_2`), so
        :math:`e` is the mismatch in units of the inner products' typical size: rounding
        error for a correct adjoint, of order one for a wrong one. (Dividing by
        :math:`|\langle A x, y \rangle|` instead would fail now and then by chance, when the
        inner product happens to be near zero.) Runs without autograd.

        Args:
            like: A tensor shaped like the operator's inputs, ``(B, *S)``; only its shape,
                dtype and device are used.
            rtol: The largest accepted :math:`e`; default :math:`\sqrt{\varepsilon}` of
                ``like``'s dtype (``3.5e-4`` for float32, ``1.5e-8`` for float64).
            generator: A ``torch.Generator`` on ``like``'s device, for a reproducible draw.

        Returns:
            :math:`e`, at most ``rtol``.

        Raises:
            ValueError: When :math:`e` exceeds ``rtol`` (the message gives :math:`e`), or
                when ``adjoint`` does not return the shape of ``like``.
        """
        if not isinstance(like, Tensor) or not like.is_floating_point():
            raise TypeError(
                "like must be a floating-point tensor shaped like the operator's input, got "
                f"{type(like).__name__}"
            )
        if rtol is None:
            rtol = math.sqrt(torch.finfo(like.dtype).eps)
        check_float("rtol", rtol, low=0.0, low_open=True)
        name = type(self).__name__
        with torch.no_grad():
            x = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
            ax = self(x)
            if not isinstance(ax, Tensor):
                raise TypeError(f"{name}.forward must return a tensor, got {type(ax).__name__}")
            y = torch.randn(ax.shape, generator=generator, dtype=ax.dtype, device=ax.device)
            aty = self.adjoint(y)
            if not isinstance(aty, Tensor) or aty.shape != x.shape:
                got = tuple(aty.shape) if isinstance(aty, Tensor) else type(aty).__name__
                raise ValueError(
                    f"{name}.adjoint must map A x's shape {tuple(ax.shape)} back to the input "
                    f"shape {tuple(x.shape)}, got {got}"
                )
            lhs = float((ax.double() * y.double()).sum())
            rhs = float((x.double() * aty.double()).sum())
            scale = max(float(ax.double().norm()), float(aty.double().norm()))
        error = abs(lhs - rhs) / scale if scale > 0 else abs(lhs - rhs)
        if not error <= rtol:
            raise ValueError(
                f"{name}.adjoint is not the adjoint of {name}.forward: relative adjointness "
                f"error {error:.3e} > rtol={rtol:.3e} (<Ax, y> = {lhs:.6e}, <x, A^T y> = "
                f"{rhs:.6e}); fix adjoint so that <A x, y> = <x, A^T y> for all x, y"
            )
        return error


class PhysicsOperator(LinearOperator):
    r"""A :class:`LinearOperator` around an operator of deepinv's ``LinearPhysics`` protocol:
    any object with methods ``A(x)`` (:math:`A x`) and ``A_adjoint(y)`` (:math:`A^\top y`),
    such as deepinv's blur, inpainting, MRI and CT physics. The imaging tools wrap such an
    object themselves, so ``DEGRADCell(physics, denoiser)`` takes it directly.

    Its norm is unknown to this library (:meth:`~LinearOperator.norm_bound` is ``inf``): the
    tools that need one estimate it by power iteration, and a certified contractive cell
    refuses it.

    Args:
        physics: The operator; kept as a submodule when it is an ``nn.Module`` (so ``.to()``
            and ``state_dict`` follow it).

    Example:
        >>> import torch
        >>> from implicitlayers.imaging import PhysicsOperator
        >>> class Mask:  # deepinv's protocol: A and A_adjoint
        ...     def __init__(self, m): self.m = m
        ...     def A(self, x): return self.m * x
        ...     def A_adjoint(self, y): return self.m * y
        >>> op = PhysicsOperator(Mask(torch.tensor([1.0, 0.0])))
        >>> op(torch.ones(1, 2)), op.adjoint(torch.ones(1, 2))
        (tensor([[1., 0.]]), tensor([[1., 0.]]))
    """

    def __init__(self, physics: object) -> None:
        super().__init__()
        if not (
            callable(getattr(physics, "A", None)) and callable(getattr(physics, "A_adjoint", None))
        ):
            raise TypeError(
                f"physics must have methods A(x) and A_adjoint(y) (deepinv's LinearPhysics "
                f"protocol), got {type(physics).__name__}"
            )
        self.physics = physics

    def to(self, *args: Any, **kwargs: Any) -> PhysicsOperator:
        """As ``torch.nn.Module.to``, except that a real floating ``dtype`` casts complex
        parameters and buffers to its complex counterpart (``float64``: ``complex128``).
        torch's own ``to`` casts them to the real dtype, dropping the imaginary part: an FFT
        operator such as deepinv's ``BlurFFT``, whose filter's phase is a complex buffer,
        would compute another operator afterwards."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        paired = _COMPLEX_OF.get(dtype) if dtype is not None else None
        if paired is None:
            return super().to(*args, **kwargs)

        def cast(t: Tensor) -> Tensor:
            target = paired if t.is_complex() else dtype if t.is_floating_point() else None
            return t.to(device, target, non_blocking)

        self._apply(cast)  # type: ignore[no-untyped-call]
        return self

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.physics.A(x)  # type: ignore[attr-defined]
        return out

    def adjoint(self, y: Tensor) -> Tensor:
        out: Tensor = self.physics.A_adjoint(y)  # type: ignore[attr-defined]
        return out


#: The complex dtype a real floating dtype casts a complex tensor to.
_COMPLEX_OF = {
    torch.float64: torch.complex128,
    torch.float32: torch.complex64,
    torch.float16: torch.complex32,
}


def check_operator(name: str, operator: object) -> LinearOperator:
    """``operator`` as a :class:`LinearOperator`: itself, or an object of deepinv's
    ``LinearPhysics`` protocol (``A`` and ``A_adjoint``) wrapped in a
    :class:`PhysicsOperator`."""
    if isinstance(operator, LinearOperator):
        return operator
    if callable(getattr(operator, "A", None)) and callable(getattr(operator, "A_adjoint", None)):
        return PhysicsOperator(operator)
    raise TypeError(
        f"{name} must be an implicitlayers.imaging.LinearOperator (with forward and "
        f"adjoint methods) or an object with methods A(x) and A_adjoint(y) (deepinv's "
        f"LinearPhysics protocol), got {type(operator).__name__}; subclass "
        "implicitlayers.imaging.LinearOperator, define forward(x) = A x and "
        "adjoint(y) = A^T y, and test it once with check_adjoint"
    )
