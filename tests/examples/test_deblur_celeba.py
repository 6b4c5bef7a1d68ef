"""CelebA folders (Pillow) and a tiny CelebA run; skipped when the shared images are absent."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import deblur_celeba as flagship
import pytest
import torch
from deblur.cli import SettingsError
from deblur.data import load_image, make_splits
from deblur_tiny import CELEBA, TINY

pytestmark = pytest.mark.skipif(
    not CELEBA.is_dir(), reason=f"CelebA images not found at {CELEBA} (optional)"
)

NAMES = [f"{i:06d}.jpg" for i in range(1, 13)]


@pytest.fixture
def celeba_dir(tmp_path: Path) -> Path:
    """Twelve CelebA JPEGs, linked (not copied) into a folder laid out as users have it."""
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for name in NAMES:
        (folder / name).symlink_to((CELEBA / name).resolve())
    return tmp_path / "celeba"


def test_load_image_resizes_bilinearly_to_minus_one_one() -> None:
    image = load_image(CELEBA / "000001.jpg", 32)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1.0 <= float(image.min()) < 0 < float(image.max()) <= 1.0
    assert load_image(CELEBA / "000001.jpg").shape == (3, 218, 178)


def test_the_split_is_a_deterministic_partition(celeba_dir: Path) -> None:
    settings = flagship.resolve(
        None, {"data_dir": str(celeba_dir), "image_size": 16, "val_size": 2}
    )
    files = make_splits(settings).files()
    assert (len(files["train"]), len(files["val"]), len(files["test"])) == (8, 2, 2)
    assert sorted(files["train"] + files["val"] + files["test"]) == NAMES
    assert make_splits(settings).files() == files
    other = make_splits(dataclasses.replace(settings, split_seed=1)).files()
    assert other != files and make_splits(settings).train[0].shape == (3, 16, 16)


def test_limits_and_the_test_slice(celeba_dir: Path) -> None:
    base = {"data_dir": str(celeba_dir), "image_size": 16, "val_size": 2}
    settings = flagship.resolve(None, {**base, "limit": 3})
    files = make_splits(settings).files()
    assert len(files["train"]) == 3 and len(files["test"]) == 2
    fresh = dataclasses.replace(settings, test_offset=1, test_limit=1)
    assert make_splits(fresh).files()["test"] == files["test"][1:]
    with pytest.raises(SettingsError, match=r"the test split of .* is empty"):
        make_splits(dataclasses.replace(settings, test_offset=2))


def test_tiny_celeba_run(celeba_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", *TINY, "--data-dir", str(celeba_dir), "--val-size", "2", "--limit", "4"]
    assert flagship.main([*argv, "--output-dir", str(out)]) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 4 and not set(split["test"]) & set(split["train"] + split["val"])
    report = json.loads((out / "results.json").read_text())
    assert report["images"] == 2 and report["data"].startswith("CelebA from")
    assert report["settings"]["image_size"] == 16 and report["image_shape"] == [3, 16, 16]
