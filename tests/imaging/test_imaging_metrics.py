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
    torch.testing.assert_close(psnr(x, ref), torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(
        psnr(x, ref, data_range=2.0), torch.tensor(expected, dtype=F64) + 20 * math.log10(2)
    )
    assert math.isinf(float(psnr(ref, ref)[0]))


def test_standard_psnr_is_paper_psnr_plus_6_02_db():
    ref = torch.rand(3, 3, 16, 16, dtype=F64) * 2 - 1
    x = (ref + 0.05 * torch.randn_like(ref)).clamp(-1, 1)
    diff = psnr_standard(x, ref) - psnr_paper(x, ref)
    torch.testing.assert_close(diff, torch.full((3,), 20 * math.log10(2), dtype=F64))
    assert 20 * math.log10(2) == pytest.approx(6.0206, abs=1e-4)


def test_ssim_of_identical_images_is_one():
    x = torch.rand(2, 3, 16, 16, dtype=F64)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=F64))
    assert float(ssim(x, 1 - x).max()) < 0.5


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
    assert float(ssim(noisy, ref)[0]) == pytest.approx(expected, abs=1e-4)
    # ssim_standard maps [-1, 1] to [0, 1]
    assert float(ssim_standard(noisy * 2 - 1, ref * 2 - 1)[0]) == pytest.approx(expected, abs=1e-4)


def test_metric_validation():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:, :2])
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0.0)
    with pytest.raises(ValueError, match=r"smaller than the SSIM window.*win_size=11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match=r"x\[None\]"):
        psnr(x[0, 0, 0], x[0, 0, 0])
