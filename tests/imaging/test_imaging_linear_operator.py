"""LinearOperator: the abstract base, its adjoint self-test, and user-written operators in the
reconstruction code (DEGRADCell, tikhonov_cg, the baselines)."""

import math

import pytest
import torch
import torch.nn.functional as F
from imaging_zoo import Downsample
from torch import nn

import implicitlayers as il
from implicitlayers.imaging import (
    ContractiveDnCNN,
    DEGRADCell,
    GaussianBlur,
    LinearOperator,
    direct_inverse,
    gradient_descent,
    operator_norm,
    pnp_deblur,
    tikhonov_cg,
    tv_deblur,
)

F64 = torch.float64


class WrongDownsample(Downsample):
    """The classic slip: the upsampling without the 1/4, an adjoint 4 times too large."""

    def adjoint(self, y):
        return F.interpolate(y, scale_factor=2, mode="nearest")


class Mask(LinearOperator):
    """Inpainting: A x = m * x with a fixed weight m (self-adjoint), no norm bound given."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.mask * x

    def adjoint(self, y):
        return self.mask * y


def _error(op, like, seed):
    """check_adjoint's formula, recomputed from the same draws."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(like.shape, generator=g, dtype=like.dtype)
    ax = op(x)
    y = torch.randn(ax.shape, generator=g, dtype=ax.dtype)
    aty = op.adjoint(y)
    lhs, rhs = float((ax * y).sum()), float((x * aty).sum())
    return abs(lhs - rhs) / max(float(ax.norm()), float(aty.norm())), lhs


def test_the_base_is_abstract_and_its_defaults():
    with pytest.raises(TypeError, match="abstract"):
        LinearOperator()

    class NoAdjoint(LinearOperator):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="adjoint"):
        NoAdjoint()
    op = Mask(torch.rand(1, 1, 4, 4, dtype=F64))
    assert isinstance(op, nn.Module) and "mask" in op.state_dict()
    assert op.norm_bound() == math.inf
    x = torch.randn(2, 1, 4, 4, dtype=F64)
    torch.testing.assert_close(op.normal(x), op.mask * (op.mask * x), rtol=0, atol=0)
    assert isinstance(GaussianBlur(), LinearOperator)


def test_check_adjoint_passes_correct_operators():
    like = torch.zeros(2, 3, 8, 12, dtype=F64)
    error = Downsample().check_adjoint(like, generator=torch.Generator().manual_seed(1))
    expected, _ = _error(Downsample(), like, 1)
    assert error == pytest.approx(expected, abs=1e-15)
    assert error < 1e-14
    mask = Mask(torch.rand(1, 3, 8, 12, dtype=F64))
    assert mask.check_adjoint(like) < 1e-14
    asymmetric = GaussianBlur(3, 1.0, 3, dtype=F64)
    asymmetric.kernel = torch.rand(3, 3, dtype=F64)
    assert asymmetric.check_adjoint(like) < 1e-14
    # float32 passes under the default rtol sqrt(eps) = 3.5e-4
    assert GaussianBlur().check_adjoint(torch.zeros(2, 3, 16, 16)) < math.sqrt(1.2e-7)


def test_check_adjoint_rejects_a_wrong_adjoint_and_reports_the_error():
    like = torch.zeros(2, 1, 8, 8, dtype=F64)
    expected, lhs = _error(WrongDownsample(), like, 3)
    # with B = 4 A^T: <x, B y> - <Ax, y> = 3 <Ax, y>, over max(||Ax||, 4 ||A^T y||)
    assert expected > 0.05
    with pytest.raises(ValueError) as info:
        WrongDownsample().check_adjoint(like, generator=torch.Generator().manual_seed(3))
    message = str(info.value)
    assert "WrongDownsample.adjoint is not the adjoint of WrongDownsample.forward" in message
    assert f"error {expected:.3e} > rtol=1.490e-08" in message
    assert f"<Ax, y> = {lhs:.6e}" in message
    # a missing kernel flip, which a symmetric Gaussian would hide
    blur = GaussianBlur(3, 1.0, 1, dtype=F64)
    blur.kernel = torch.arange(9, dtype=F64).reshape(3, 3)
    blur.adjoint = blur.forward
    with pytest.raises(ValueError, match=r"GaussianBlur.adjoint is not the adjoint.*error"):
        blur.check_adjoint(like)
    # a loose enough rtol accepts it, and returns the measured error
    assert WrongDownsample().check_adjoint(
        like, rtol=1.0, generator=torch.Generator().manual_seed(3)
    ) == pytest.approx(expected, rel=1e-12)


def test_check_adjoint_validation():
    with pytest.raises(ValueError, match=r"adjoint must map A x's shape \(2, 1, 4, 4\) back"):

        class Shape(Downsample):
            def adjoint(self, y):
                return y

        Shape().check_adjoint(torch.zeros(2, 1, 8, 8))
    with pytest.raises(TypeError, match="like must be a floating-point tensor"):
        Downsample().check_adjoint(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="rtol"):
        Downsample().check_adjoint(torch.zeros(2, 1, 8, 8), rtol=0.0)


class _Duck:
    """Has forward and adjoint, but is no LinearOperator: refused with the fix."""

    def __call__(self, x):
        return x

    def adjoint(self, y):
        return y


def test_non_operators_are_refused_with_the_fix():
    d = torch.randn(1, 1, 8, 8)
    subclass = r"subclass implicitlayers\.imaging\.LinearOperator"
    calls = {
        "DEGRADCell": lambda op: DEGRADCell(op, nn.Identity()),
        "contractive": lambda op: DEGRADCell.contractive(op, ContractiveDnCNN(1, 3, 4)),
        "tikhonov_cg": lambda op: tikhonov_cg(op, d),
        "gradient_descent": lambda op: gradient_descent(op, d, max_iter=1),
        "tv_deblur": lambda op: tv_deblur(op, d, lam=0.1),
        "pnp_deblur": lambda op: pnp_deblur(op, d, lambda v: v),
        "operator_norm": lambda op: operator_norm(op, d),
        "direct_inverse": lambda op: direct_inverse(op, d),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"operator must be an .*got _Duck; {subclass}"):
            call(_Duck())
        with pytest.raises(TypeError, match="got function"):
            call(lambda x: x)
        assert name  # every entry point checks


class _Ridge(nn.Module):
    """R(x) = x / 2 + a small convolution: keeps T contractive on A's null space."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.mul_(0.1)

    def forward(self, x):
        return 0.5 * x + self.conv(x)


def test_degrad_cell_with_a_downsampling_operator():
    A = Downsample()
    torch.manual_seed(0)
    x_true = torch.rand(2, 1, 16, 16, dtype=F64) * 2 - 1
    d = A(x_true)
    assert d.shape == (2, 1, 8, 8)
    R = _Ridge()
    cell = DEGRADCell(A, R, step_size=0.5, clamp=None)
    x = torch.randn_like(x_true)
    up = F.interpolate(F.avg_pool2d(x, 2) - d, scale_factor=2, mode="nearest") / 4
    expected = x - 0.5 * (up + 0.5 * x + R.conv(x))
    torch.testing.assert_close(cell(x, d), expected, rtol=1e-12, atol=1e-12)
    x0 = cell.initial_point(d)
    torch.testing.assert_close(x0, F.interpolate(d, scale_factor=2, mode="nearest") / 4)
    deq = il.DEQ(cell, solver=il.Anderson(max_iter=100, rtol=1e-8), backward=il.JFB())
    z, result = deq(d, z0=x0)
    assert z.shape == x_true.shape and bool(result.converged.all())
    torch.testing.assert_close(cell(z.detach(), d), z.detach(), rtol=0, atol=1e-6)
    (z - x_true).pow(2).mean().backward()
    assert float(R.conv.weight.grad.abs().sum()) > 0 and cell.raw_step_size.grad is not None


def test_contractive_cell_needs_a_finite_norm_bound():
    D = ContractiveDnCNN(channels=1, depth=3, width=4, input_size=(8, 8))
    cell = DEGRADCell.contractive(Downsample(), D, step_size=0.5)
    assert cell.lipschitz_bound() < 1
    with pytest.raises(ValueError, match=r"Mask\.norm_bound\(\) = inf.*override norm_bound"):
        DEGRADCell.contractive(Mask(torch.ones(1, 1, 8, 8)), D)


def test_tikhonov_cg_and_baselines_with_a_mask():
    # (A^T A + lam I) x = A^T d is diagonal for a mask: x = m d / (m^2 + lam) exactly
    m = torch.rand(1, 1, 6, 6, dtype=F64) * 0.9 + 0.1
    A = Mask(m)
    d = torch.randn(3, 1, 6, 6, dtype=F64)
    x = tikhonov_cg(A, d, lam=0.1, atol=0.0, rtol=1e-13)
    torch.testing.assert_close(x, m * d / (m**2 + 0.1), rtol=1e-10, atol=1e-12)
    # no norm bound given: operator_norm estimates max |m| by power iteration
    assert operator_norm(A, d, power_iterations=500) == pytest.approx(float(m.max()), rel=1e-6)
    assert operator_norm(Downsample(), d) == 0.5  # a finite bound is used as is
    # gradient descent with the default step 1 / ||A||^2 converges to d / m on the mask
    out = gradient_descent(A, d, max_iter=2000)
    torch.testing.assert_close(out, d / m, rtol=1e-4, atol=1e-4)


class _StandInPhysics(torch.nn.Module):
    """deepinv's LinearPhysics protocol, as its blur implements it: ``A`` a circular
    convolution, ``A_adjoint`` its transpose (a stand-in: deepinv needs a torchvision that
    does not import beside this torch)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("kernel", torch.rand(1, 1, 3, 3, generator=gen, dtype=torch.float64))

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, (1, 1, 1, 1), "circular"), self.kernel
        )

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        flipped = self.kernel.flip(-1, -2)
        return torch.nn.functional.conv2d(
            torch.nn.functional.pad(y, (1, 1, 1, 1), "circular"), flipped
        )


def test_an_operator_of_deepinvs_protocol_drives_the_degrad_cell():
    from implicitlayers.imaging import DEGRADCell, DnCNN, PhysicsOperator, tikhonov_cg

    physics = _StandInPhysics()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    op = PhysicsOperator(physics)
    assert op.check_adjoint(x) < 1e-12  # the wrapped pair is a true adjoint pair
    torch.testing.assert_close(op(x), physics.A(x))
    cell = DEGRADCell(physics, DnCNN(channels=1, depth=3, width=4).double())
    assert isinstance(cell.operator, PhysicsOperator) and cell.operator.physics is physics
    d = physics.A(x)
    out = il.DEQ(cell, solver=il.Anderson(max_iter=30))(d, z0=op.adjoint(d))
    assert out.z.shape == x.shape and torch.isfinite(out.z).all()
    # The Tikhonov baseline takes it as well: it solves its normal equations.
    rec = tikhonov_cg(physics, d, lam=0.1, rtol=1e-12)
    residual = op.normal(rec) + 0.1 * rec - op.adjoint(d)
    assert residual.abs().max() < 1e-8
    with pytest.raises(TypeError, match=r"A\(x\) and A_adjoint\(y\) \(deepinv's LinearPhysics"):
        DEGRADCell(object(), DnCNN(channels=1, depth=3, width=4))


class _FourierPhysics(torch.nn.Module):
    """A circular shift by one pixel as deepinv's ``BlurFFT`` computes it: the filter's
    Fourier transform is a complex buffer."""

    def __init__(self, size: int) -> None:
        super().__init__()
        kernel = torch.zeros(size, size)
        kernel[0, 1] = 1.0  # y[i, j] = x[i, j - 1]
        self.register_buffer("filter", torch.fft.fft2(kernel))

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifft2(torch.fft.fft2(x) * self.filter).real

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifft2(torch.fft.fft2(y) * self.filter.conj()).real


def test_a_cast_keeps_the_complex_buffers_of_a_wrapped_physics_complex():
    from implicitlayers.imaging import PhysicsOperator

    op = PhysicsOperator(_FourierPhysics(8)).to(torch.float64)
    assert op.physics.filter.dtype == torch.complex128  # torch's own to() would drop .imag
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    # (the filter was built in complex64: round-off 1e-8; without the fix the error is 1)
    torch.testing.assert_close(op(x), x.roll(1, dims=-1), rtol=0, atol=1e-6)
    assert op.check_adjoint(x) < 1e-12
    back = op.to(torch.float32)
    assert back.physics.filter.dtype == torch.complex64
    assert op.to("cpu", non_blocking=False) is op  # no dtype: torch's own to()
