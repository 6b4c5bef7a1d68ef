"""PSNR and SSIM: exact values, conventions, and agreement with scikit-image."""

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import structural_similarity

from implicitlayers.imaging import psnr, psnr_paper, psnr_standard, ssim, ssim_standard

F64 = torch.float64


def _skimage_ssim(x, ref, data_range):
    return structural_similarity(
        x.numpy(),
        ref.numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        channel_axis=0,
    )


def test_psnr_of_a_known_mse():
    ref = torch.zeros(2, 3, 8, 8, dtype=F64)
    x = ref.clone()
    x[0] += 0.2  # MSE 0.04
    x[1, :, ::2] += 0.1  # half the pixels off by 0.1: MSE 0.005
    expected = [10 * math.log10(1 / 0.04), 10 * math.log10(1 / 0.005)]
    torch.testing.assert_close(psnr(x, ref, data_range=1.0), torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(
        psnr(x, ref, data_range=2.0), torch.tensor(expected, dtype=F64) + 20 * math.log10(2)
    )
    assert math.isinf(float(psnr(ref, ref, data_range=1.0)[0]))


def test_standard_psnr_is_paper_psnr_plus_6_02_db():
    ref = torch.rand(3, 3, 16, 16, dtype=F64) * 2 - 1
    x = (ref + 0.05 * torch.randn_like(ref)).clamp(-1, 1)
    diff = psnr_standard(x, ref) - psnr_paper(x, ref)
    torch.testing.assert_close(diff, torch.full((3,), 20 * math.log10(2), dtype=F64))
    assert 20 * math.log10(2) == pytest.approx(6.0206, abs=1e-4)


def test_ssim_of_identical_images_is_one():
    x = torch.rand(2, 3, 16, 16, dtype=F64)
    torch.testing.assert_close(ssim(x, x, data_range=1.0), torch.ones(2, dtype=F64))
    assert float(ssim(x, 1 - x, data_range=1.0).max()) < 0.5


def test_ssim_matches_skimage_on_random_images():
    ref = torch.rand(3, 3, 24, 32, dtype=F64)
    x = (ref + 0.1 * torch.randn_like(ref)).clamp(0, 1)
    ours = ssim(x, ref, data_range=1.0)
    for b in range(3):
        assert float(ours[b]) == pytest.approx(_skimage_ssim(x[b], ref[b], 1.0), abs=1e-10)
    # float32 and a different data range
    ours32 = ssim(2 * x.float(), 2 * ref.float(), data_range=2.0)
    assert float(ours32[0]) == pytest.approx(_skimage_ssim(2 * x[0], 2 * ref[0], 2.0), abs=1e-4)


def test_ssim_matches_skimage_on_a_real_image():
    img = torch.from_numpy(data.astronaut()[100:164, 180:244].astype(np.float64) / 255.0)
    ref = img.permute(2, 0, 1)[None]  # (1, 3, 64, 64)
    blurred = torch.nn.functional.avg_pool2d(ref, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (blurred + 0.02 * torch.randn_like(blurred)).clamp(0, 1)
    expected = _skimage_ssim(noisy[0], ref[0], 1.0)
    assert 0.3 < expected < 0.95  # a non-trivial comparison
    assert float(ssim(noisy, ref, data_range=1.0)[0]) == pytest.approx(expected, abs=1e-4)
    # ssim_standard maps [-1, 1] to [0, 1]
    assert float(ssim_standard(noisy * 2 - 1, ref * 2 - 1)[0]) == pytest.approx(expected, abs=1e-4)


def test_metric_validation():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:, :2], data_range=1.0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0.0)
    with pytest.raises(ValueError, match=r"smaller than the SSIM window.*win_size=11"):
        ssim(x[..., :8, :8], x[..., :8, :8], data_range=1.0)
    with pytest.raises(ValueError, match=r"x\[None\]"):
        psnr(x[0, 0, 0], x[0, 0, 0], data_range=1.0)


def test_psnr_conventions_on_a_constant_error():
    # [-1, 1] images off by exactly 0.1 everywhere: MSE = 0.01 on the [-1, 1] scale
    ref = torch.linspace(-0.9, 0.8, 2 * 3 * 6 * 6, dtype=F64).reshape(2, 3, 6, 6)
    x = ref + 0.1
    standard = torch.full((2,), 20 * math.log10(2 / 0.1), dtype=F64)  # 10 log10(4 / 0.01)
    paper = torch.full((2,), 20.0, dtype=F64)  # 10 log10(1 / 0.01)
    torch.testing.assert_close(psnr_standard(x, ref), standard, rtol=0, atol=1e-12)
    torch.testing.assert_close(psnr(x, ref, data_range=2.0), standard, rtol=0, atol=1e-12)
    torch.testing.assert_close(psnr_paper(x, ref), paper, rtol=0, atol=1e-12)
    assert float(standard[0]) == pytest.approx(26.0206, abs=1e-4)
    gap = psnr_standard(x, ref) - psnr_paper(x, ref)
    torch.testing.assert_close(gap, torch.full((2,), 6.0206, dtype=F64), rtol=0, atol=1e-4)


def test_psnr_and_ssim_need_an_explicit_data_range():
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(TypeError, match="data_range"):
        psnr(x, x)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="data_range"):
        ssim(x, x)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="data_range"):
        ssim(x, x, data_range=-1.0)


def test_ssim_of_constant_images_is_the_luminance_term_with_c1_scaled_by_the_range():
    # constant images have zero (co)variances, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly
    a, b = 0.5, 0.25
    x = torch.full((1, 1, 12, 12), a, dtype=F64)
    ref = torch.full((1, 1, 12, 12), b, dtype=F64)
    for data_range in (1.0, 2.0, 255.0):
        c1 = (0.01 * data_range) ** 2
        expected = (2 * a * b + c1) / (a * a + b * b + c1)
        assert float(ssim(x, ref, data_range=data_range)[0]) == pytest.approx(expected, rel=1e-12)
    # an unscaled C1 = 1e-4 would give 0.80006 at every range; at L = 255 it is 0.99083
    assert float(ssim(x, ref, data_range=255.0)[0]) == pytest.approx(6.7525 / 6.815, rel=1e-12)


@pytest.mark.parametrize("scale", [2.0, 255.0, 1e-3])
def test_ssim_and_psnr_are_invariant_to_scaling_images_and_range_together(scale):
    ref = torch.rand(2, 3, 20, 24, dtype=F64)
    x = (ref + 0.1 * torch.randn_like(ref)).clamp(0, 1)
    base = ssim(x, ref, data_range=1.0)
    assert float(base.min()) > 0.3 and float(base.max()) < 0.99  # a non-trivial value
    scaled = ssim(scale * x, scale * ref, data_range=scale)
    torch.testing.assert_close(scaled, base, rtol=1e-10, atol=0)
    # ... and C1, C2 do scale: the same images with the range left at 1 differ
    assert float((ssim(scale * x, scale * ref, data_range=1.0) - base).abs().max()) > 1e-5
    torch.testing.assert_close(
        psnr(scale * x, scale * ref, data_range=scale), psnr(x, ref, data_range=1.0)
    )


def test_ssim_standard_rescales_rather_than_passing_range_two():
    ref = torch.rand(1, 3, 16, 16, dtype=F64) * 2 - 1
    x = (ref + 0.2 * torch.randn_like(ref)).clamp(-1, 1)
    mapped = ssim((x + 1) / 2, (ref + 1) / 2, data_range=1.0)
    torch.testing.assert_close(ssim_standard(x, ref), mapped, rtol=0, atol=0)
    # SSIM is not shift invariant: data_range=2 on the [-1, 1] images is another number
    assert abs(float(ssim(x, ref, data_range=2.0)[0]) - float(mapped[0])) > 1e-3
