"""Crop training (``--train-crop``): a crop is measured as an image of its own, and
evaluation at ``--image-size`` uses whole images."""

from __future__ import annotations

import json
from typing import Any

import deblur_celeba as flagship
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
