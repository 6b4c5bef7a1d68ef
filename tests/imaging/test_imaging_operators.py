"""GaussianBlur, gaussian_kernel and add_noise: adjointness, closed forms, norms, validation."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from implicitlayers.imaging import GaussianBlur, LinearOperator, add_noise, gaussian_kernel

F64 = torch.float64


def _inner(a, b):
    return float((a * b).sum())


def test_kernel_matches_closed_form_and_sums_to_one():
    k = gaussian_kernel(5, 5.0, dtype=F64)
    i = np.arange(5) - 2.0
    g = np.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / (2 * 5.0**2))
    np.testing.assert_allclose(k.numpy(), g / g.sum(), rtol=1e-14)
    assert abs(float(k.sum()) - 1.0) < 1e-14
    assert torch.equal(k, k.T) and torch.equal(k, k.flip(0))
    # a narrow Gaussian concentrates: centre weight of std 0.5 is exp(0) / sum
    narrow = gaussian_kernel(3, 0.5, dtype=F64)
    e = math.exp(-1 / (2 * 0.25))
    assert float(narrow[1, 1]) == pytest.approx(1 / (1 + 4 * e + 4 * e * e), rel=1e-14)
    assert gaussian_kernel(5, 5.0).dtype == torch.float32


@pytest.mark.parametrize(
    ("channels", "h", "w", "kernel_size", "circular"),
    [(1, 16, 16, 5, False), (3, 17, 23, 5, False), (2, 12, 20, 7, True), (3, 16, 16, 5, True)],
)
def test_adjoint_identity_float64(channels, h, w, kernel_size, circular):
    A = GaussianBlur(kernel_size, 2.0, channels, circular=circular, dtype=F64)
    x = torch.randn(2, channels, h, w, dtype=F64)
    y = torch.randn(2, channels, h, w, dtype=F64)
    lhs, rhs = _inner(A(x), y), _inner(x, A.adjoint(y))
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    torch.testing.assert_close(A.normal(x), A.adjoint(A(x)), rtol=0, atol=0)


def test_adjoint_is_exact_for_an_asymmetric_kernel():
    # the adjoint must use the flipped kernel: a symmetric Gaussian cannot detect a missing flip
    for circular in (False, True):
        A = GaussianBlur(3, 1.0, 2, circular=circular, dtype=F64)
        A.kernel = torch.rand(3, 3, dtype=F64)
        x, y = torch.randn(2, 2, 9, 11, dtype=F64), torch.randn(2, 2, 9, 11, dtype=F64)
        lhs, rhs = _inner(A(x), y), _inner(x, A.adjoint(y))
        assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


def test_forward_matches_scipy_correlation():
    A = GaussianBlur(5, 5.0, 2, dtype=F64)
    Ac = GaussianBlur(5, 5.0, 2, circular=True, dtype=F64)
    x = torch.randn(1, 2, 13, 15, dtype=F64)
    k = A.kernel.numpy()
    for c in range(2):
        zero = ndimage.correlate(x[0, c].numpy(), k, mode="constant", cval=0.0)
        wrap = ndimage.correlate(x[0, c].numpy(), k, mode="wrap")
        np.testing.assert_allclose(A(x)[0, c].numpy(), zero, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(Ac(x)[0, c].numpy(), wrap, rtol=1e-13, atol=1e-14)


def test_transfer_function_diagonalises_circular_blur():
    A = GaussianBlur(5, 1.5, 1, circular=True, dtype=F64)
    A.kernel = torch.rand(5, 5, dtype=F64)  # asymmetric: checks the orientation
    x = torch.randn(2, 1, 12, 16, dtype=F64)
    via_fft = torch.fft.ifft2(torch.fft.fft2(x) * A.transfer_function(12, 16)).real
    torch.testing.assert_close(via_fft, A(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("circular", [False, True])
def test_operator_norm_at_most_one(circular):
    A = GaussianBlur(5, 5.0, 1, circular=circular, dtype=F64)
    v = torch.randn(1, 1, 20, 20, dtype=F64)
    for _ in range(200):
        v = A.normal(v)
        v = v / v.norm()
    est = float(A(v).norm())
    assert est <= 1.0 + 1e-12
    assert est > 0.95  # nearly constant images pass almost unchanged
    assert A.norm_bound() == pytest.approx(1.0, abs=1e-6)


def test_float32_inputs_and_dtype_following():
    A = GaussianBlur()
    x = torch.rand(2, 3, 16, 16)
    assert A(x).dtype == torch.float32 and A(x).shape == x.shape
    assert A(x.double()).dtype == F64
    assert isinstance(A, LinearOperator)
    assert "kernel" not in A.state_dict()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    A = GaussianBlur().cuda()
    x = torch.rand(2, 3, 16, 16, device="cuda")
    torch.testing.assert_close(A(x).cpu(), GaussianBlur()(x.cpu()), rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_with_the_fix():
    with pytest.raises(ValueError, match=r"kernel_size must be odd.*got 4; use 5"):
        GaussianBlur(kernel_size=4)
    with pytest.raises(ValueError, match="std"):
        GaussianBlur(std=0.0)
    with pytest.raises(ValueError, match="std"):
        gaussian_kernel(5, -1.0)
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        gaussian_kernel(5.0, 1.0)
    with pytest.raises(ValueError, match="channels"):
        GaussianBlur(channels=0)
    A = GaussianBlur(channels=3)
    with pytest.raises(ValueError, match=r"1 channels.*channels=3.*GaussianBlur\(channels=1\)"):
        A(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*x\[None\]"):
        A(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="y must have shape"):
        A.adjoint(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="floating point"):
        A(torch.ones(1, 3, 8, 8, dtype=torch.long))


def test_add_noise():
    y = torch.zeros(4, 3, 32, 32, dtype=F64)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    d1, d2 = add_noise(y, 0.01, generator=g1), add_noise(y, 0.01, generator=g2)
    assert torch.equal(d1, d2)
    assert float(d1.std()) == pytest.approx(0.01, rel=0.05)
    assert d1.dtype == F64
    assert torch.equal(add_noise(y, 0.0), y)
    with pytest.raises(ValueError, match="std"):
        add_noise(y, -0.1)


def test_add_noise_with_per_sample_seeds():
    y = torch.rand(3, 2, 6, 5, dtype=F64)
    d = add_noise(y, 0.1, seeds=[11, 12, 13])
    for b, seed in enumerate((11, 12, 13)):
        # sample b's noise is torch.randn(y.shape[1:]) from a CPU generator seeded with seeds[b]
        eps = torch.randn((2, 6, 5), generator=torch.Generator().manual_seed(seed), dtype=F64)
        torch.testing.assert_close(d[b], y[b] + 0.1 * eps, rtol=0, atol=0)
    # ... so a sample's measurement does not depend on its batch
    torch.testing.assert_close(add_noise(y[1:], 0.1, seeds=[12, 13]), d[1:], rtol=0, atol=0)
    assert add_noise(y.float(), 0.1, seeds=[1, 2, 3]).dtype == torch.float32
    assert not torch.equal(add_noise(y, 0.1, seeds=[1, 1, 1])[0], d[0])
    with pytest.raises(ValueError, match=r"one seed per sample.*got 2 seeds.*\(3, 2, 6, 5\)"):
        add_noise(y, 0.1, seeds=[1, 2])
    with pytest.raises(ValueError, match="either generator or seeds"):
        add_noise(y, 0.1, seeds=[1, 2, 3], generator=torch.Generator())
    with pytest.raises(TypeError, match="seeds must be a sequence of ints"):
        add_noise(y, 0.1, seeds=[1.0, 2, 3])
