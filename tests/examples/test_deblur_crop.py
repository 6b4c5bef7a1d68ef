"""Crop training (``--train-crop``): a crop is measured as an image of its own, and
evaluation at ``--image-size`` uses whole images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import deblur_celeba as flagship
import numpy as np
import pytest
import torch
from deblur import data
from deblur.data import noise
from deblur_tiny import TINY

from implicitlayers.imaging import GaussianBlur


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny run with 8x8 training crops of 16x16 images, spying on augment and measure."""
    out = tmp_path_factory.mktemp("crop")
    calls: dict[str, list[Any]] = {"augment": [], "measure": []}
    augment, measure = data.augment, flagship.measure

    def spy_augment(x: torch.Tensor, seeds: list[int], crop: int | None) -> torch.Tensor:
        crops = augment(x, seeds, crop)
        calls["augment"].append((x.clone(), list(seeds), crops.clone()))
        return crops

    def spy_measure(A: Any, x: torch.Tensor, seeds: list[int], std: float) -> torch.Tensor:
        d = measure(A, x, seeds, std)
        calls["measure"].append((x.clone(), list(seeds), std, d.clone()))
        return d

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "augment", spy_augment)
        mp.setattr(flagship, "measure", spy_measure)
        argv = ["train", *TINY, "--train-crop", "8", "--output-dir", str(out)]
        assert flagship.main(argv) == 0
    return {"out": out, **calls}


def _window_of(crop: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether ``crop`` is a window of ``image`` or of its mirror image."""
    size = crop.shape[-1]
    for source in (image, image.flip(-1)):
        windows = source.unfold(1, size, 1).unfold(2, size, 1)  # (C, i, j, size, size)
        if any(
            torch.equal(windows[:, i, j], crop)
            for i in range(windows.shape[1])
            for j in range(windows.shape[2])
        ):
            return True
    return False


def test_a_training_crop_is_measured_as_an_image_of_its_own(crop_run: dict[str, Any]) -> None:
    blur = GaussianBlur(5, 5.0)
    deq_steps = crop_run["augment"][2:]  # after the two pretraining steps
    assert len(deq_steps) == 2
    train_measures = [m for m in crop_run["measure"] if m[0].shape[-1] == 8]
    assert len(train_measures) == 2  # one per DEQ step; nothing else is measured at 8x8
    for (images, seeds, crops), (x, measured_seeds, std, d) in zip(
        deq_steps, train_measures, strict=True
    ):
        assert images.shape[-2:] == (16, 16) and crops.shape[-2:] == (8, 8)
        assert all(_window_of(c, image) for c, image in zip(crops, images, strict=True))
        assert torch.equal(x, crops) and measured_seeds == seeds  # the clean crop is measured
        # d = A(crop) + noise, with A's zero padding at the crop's own border ...
        expected = blur(crops) + std * noise(seeds, crops.shape[1:])
        torch.testing.assert_close(d, expected, rtol=0, atol=1e-6)
        # ... not a crop of the measured whole image, which saw pixels beyond the crop's border.
        windows = blur(torch.cat([images, images.flip(-1)])).unfold(2, 8, 1).unfold(3, 8, 1)
        blurred = blur(crops)
        assert not any(
            torch.allclose(blurred[k], windows[n, :, i, j], atol=1e-4)
            for k in range(len(crops))
            for n in (k, k + len(crops))
            for i in range(9)
            for j in range(9)
        )


def test_evaluation_uses_whole_images(crop_run: dict[str, Any]) -> None:
    evaluated = [m for m in crop_run["measure"] if m[0].shape[-1] != 8]
    assert evaluated and all(m[0].shape[-2:] == (16, 16) for m in evaluated)
    report = json.loads((crop_run["out"] / "results.json").read_text())
    assert report["image_shape"] == [3, 16, 16] and report["images"] == 4
    assert report["settings"]["train_crop"] == 8
    # 2 validations of 4 images and one test evaluation of 4, all whole.
    assert sum(len(m[0]) for m in evaluated) == 12


def test_the_cpu128_recipe_trains_on_crops_and_scores_whole_128x128_images(
    tmp_path: Path,
) -> None:
    """The ``cpu128`` preset's protocol at CI size (random JPEGs, DnCNN 3x8): images resized
    bilinearly to 128x128, the paper's measurement, 64x64 crops in training, whole images at
    validation and test."""
    from PIL import Image

    folder, out = tmp_path / "faces", tmp_path / "run"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # CelebA's aligned size, 178 x 218
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg")
    measured: list[tuple[int, ...]] = []
    measure = flagship.measure

    def spy_measure(A: Any, x: torch.Tensor, seeds: list[int], std: float) -> torch.Tensor:
        measured.append(tuple(x.shape))
        return measure(A, x, seeds, std)

    small = ["--depth", "3", "--width", "8", "--batch-size", "2", "--val-size", "2"]
    small += ["--pretrain-steps", "1", "--epochs", "1", "--max-iter", "4", "--eval-max-iter", "4"]
    small += ["--budgets", "1", "--figure-samples", "1", "--eval-batch-size", "2"]
    small += ["--device", "cpu", "--no-progress", "--quiet", "--output-dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flagship, "measure", spy_measure)
        argv = ["train", "--data-dir", str(folder), "--preset", "cpu128", *small]
        assert flagship.main(argv) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["kernel_size"], settings["blur_std"], settings["noise_std"]) == (5, 5.0, 0.01)
    assert (settings["image_size"], settings["train_crop"]) == (128, 64)
    # Validation before and after the epoch and the test evaluation measure whole 128x128
    # images; training measures 64x64 crops (8 training images, 2 per step).
    whole, crops = [(2, 3, 128, 128)], [(2, 3, 64, 64)] * 4
    assert measured == whole + crops + whole + whole
    report = json.loads((out / "results.json").read_text())
    assert report["image_shape"] == [3, 128, 128] and report["images"] == 2
    test_file = folder / json.loads((out / "split.json").read_text())["test"][0]
    with Image.open(test_file) as img:  # bilinear, as the paper's resize
        expected = np.asarray(img.convert("RGB").resize((128, 128), Image.Resampling.BILINEAR))
    loaded = data.load_image(test_file, 128)
    assert torch.equal(loaded, torch.from_numpy(expected.copy()).permute(2, 0, 1) / 127.5 - 1)
