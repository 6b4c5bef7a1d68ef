"""CelebA loading (Pillow) and a tiny CelebA run; skipped when the shared images are absent."""

from __future__ import annotations

import json
from pathlib import Path

import deblur_celeba
import pytest
import torch
from deblur.config import ConfigError, resolve_config
from deblur.data import celeba_splits, load_image
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


def test_seed_split_is_a_deterministic_partition(celeba_dir: Path) -> None:
    config = resolve_config(None, {"data_dir": str(celeba_dir), "image_size": 16, "val_size": 2})
    splits = celeba_splits(config)
    files = splits.files
    assert files is not None
    assert (len(files["train"]), len(files["val"]), len(files["test"])) == (8, 2, 2)
    assert sorted(files["train"] + files["val"] + files["test"]) == NAMES
    assert celeba_splits(config).files == files
    other = resolve_config(None, {**config.to_dict(), "split_seed": 1, "preset": "small"})
    assert celeba_splits(other).files != files
    assert splits.train[0].shape == (3, 16, 16)


def test_official_split_from_the_partition_file(celeba_dir: Path) -> None:
    lines = [f"{name} {0 if i < 8 else 1 if i < 10 else 2}" for i, name in enumerate(NAMES)]
    (celeba_dir / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    config = resolve_config(None, {"data_dir": str(celeba_dir), "image_size": 16})
    files = celeba_splits(config).files
    assert files is not None
    assert files["train"] == NAMES[:8] and files["val"] == NAMES[8:10]
    assert files["test"] == NAMES[10:]
    limited = resolve_config(None, {**config.to_dict(), "limit": 3, "preset": "small"})
    assert celeba_splits(limited).files["train"] == NAMES[:3]  # type: ignore[index]


def test_test_offset_takes_a_disjoint_slice_of_the_test_split(celeba_dir: Path) -> None:
    config = resolve_config(None, {"data_dir": str(celeba_dir), "val_size": 2, "test_limit": 1})
    first = celeba_splits(config).files
    second = celeba_splits(resolve_config(None, {**config.to_dict(), "test_offset": 1})).files
    assert first is not None and second is not None
    assert first["train"] == second["train"] and first["val"] == second["val"]
    assert len(first["test"]) == len(second["test"]) == 1
    assert first["test"] != second["test"]
    beyond = resolve_config(None, {**config.to_dict(), "test_offset": 2})
    with pytest.raises(ConfigError, match="test split"):
        celeba_splits(beyond)


def test_missing_partition_file_with_official_split_is_explained(celeba_dir: Path) -> None:
    config = resolve_config(None, {"data_dir": str(celeba_dir), "split": "official"})
    with pytest.raises(ConfigError, match=r"--split official needs list_eval_partition\.txt"):
        celeba_splits(config)


def test_tiny_celeba_run(celeba_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", *TINY, "--data-dir", str(celeba_dir), "--val-size", "2", "--limit", "4"]
    assert deblur_celeba.main([*argv, "--output-dir", str(out)]) == 0
    split = json.loads((out / "split.json").read_text())
    assert not set(split["test"]) & set(split["train"] + split["val"])
    report = json.loads((out / "results.json").read_text())
    assert report["images"] == 2 and "CelebA" in report["data"]
