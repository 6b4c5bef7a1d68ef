"""Image data: CelebA folders read with Pillow, and built-in scikit-image photographs.

Every dataset yields ``(3, H, W)`` float32 tensors with pixels in :math:`[-1, 1]`, the
paper's convention. CelebA images are resized bilinearly (Pillow, as torchvision's
``Resize`` does for PIL images) to ``image_size x image_size``.

Splits:

* ``official``: CelebA's ``list_eval_partition.txt`` (0 train, 1 validation, 2 test).
* ``seed``: the files sorted by name, the first 10,000 kept, shuffled with ``split_seed``
  and cut 80/20 into train/test; the last ``val_size`` training files are the validation set.
* ``auto``: ``official`` when the partition file is present, else ``seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .config import ConfigError, RunConfig

__all__ = [
    "BUILTIN_TEST_PHOTOS",
    "BUILTIN_TRAIN_PHOTOS",
    "DataSplits",
    "ImageFolderDataset",
    "batches_loader",
    "builtin_splits",
    "celeba_splits",
    "chunks",
    "list_images",
    "load_image",
    "make_splits",
    "save_image",
    "to_unit_range",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PARTITION_FILE = "list_eval_partition.txt"
SEED_SPLIT_FILES = 10_000
SEED_SPLIT_TRAIN_FRACTION = 0.8

#: Photographs shipped inside scikit-image (no download) used for the built-in data.
#: Training and test crops come from different photographs; the validation crops come from
#: the bottom fifth of each training photograph, which no training crop touches.
BUILTIN_TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "motorcycle",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
)
BUILTIN_TEST_PHOTOS = ("chelsea", "coffee")
_VAL_ROWS = 0.2
#: Seed of the built-in test crops and of every test measurement's noise: the same held-out
#: measurements whatever the training run's ``--seed``.
TEST_SEED = 20240203


@dataclass
class DataSplits:
    """Train, validation and test datasets plus a description of where they came from.

    Attributes:
        train: Training images.
        val: Validation images (model selection, every epoch).
        test: Held-out images, used only by evaluation.
        description: One line saying what the data is, printed and stored with results.
        files: For folder data, the file names of each split (``train``, ``val``, ``test``).
    """

    train: Dataset[Tensor]
    val: Dataset[Tensor]
    test: Dataset[Tensor]
    description: str
    files: dict[str, list[str]] | None = None


def to_unit_range(x: Tensor) -> Tensor:
    """Map pixels from :math:`[-1, 1]` to :math:`[0, 1]` (clamped)."""
    return ((x + 1) / 2).clamp(0, 1)


def load_image(path: str | Path, size: int | tuple[int, int] | None = None) -> Tensor:
    """Read an image file as a ``(3, H, W)`` float32 tensor in :math:`[-1, 1]`.

    Args:
        path: Any format Pillow reads; grey or RGBA images are converted to RGB.
        size: Resize bilinearly to ``size x size`` (or ``(height, width)``); ``None`` keeps
            the file's size.

    Returns:
        The image.
    """
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if size is not None:
            height, width = (size, size) if isinstance(size, int) else size
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(rgb, dtype=np.uint8)
    return _uint8_to_tensor(array)


def save_image(x: Tensor, path: str | Path) -> None:
    """Write a ``(3, H, W)`` image in :math:`[-1, 1]` to ``path`` (format from the suffix)."""
    array = (to_unit_range(x.detach().float().cpu()) * 255).round().to(torch.uint8)
    Image.fromarray(array.permute(1, 2, 0).numpy()).save(path)


def _uint8_to_tensor(array: np.ndarray) -> Tensor:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    tensor = torch.from_numpy(np.array(array[:, :, :3])).permute(2, 0, 1)  # a writable copy
    return tensor.float().div(127.5).sub(1.0)


class ImageFolderDataset(Dataset[Tensor]):
    """Images read lazily from files, resized to a square.

    Args:
        files: Image paths.
        image_size: Side of the square the images are resized to.
    """

    def __init__(self, files: Sequence[Path], image_size: int) -> None:
        self.files = list(files)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        return load_image(self.files[index], self.image_size)


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _image_folder(data_dir: Path) -> Path:
    """Accept the CelebA root (holding ``img_align_celeba/``) or the image folder itself."""
    if not data_dir.is_dir():
        raise ConfigError(
            f"--data-dir {str(data_dir)!r} is not a folder; pass the folder holding the "
            "img_align_celeba JPEGs (or its parent), or omit --data-dir for the built-in demo"
        )
    nested = data_dir / "img_align_celeba"
    if nested.is_dir():
        inner = nested / "img_align_celeba"  # the Kaggle zip unpacks one level deeper
        return inner if inner.is_dir() else nested
    return data_dir


def _find_partition(data_dir: Path, image_dir: Path) -> Path | None:
    for folder in (image_dir, data_dir, data_dir.parent, image_dir.parent):
        candidate = folder / PARTITION_FILE
        if candidate.is_file():
            return candidate
    return None


def _read_partition(path: Path) -> dict[str, int]:
    partition: dict[str, int] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.replace(",", " ").split()
        if not parts or parts[0].lower() in ("image_id", "#"):
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ConfigError(
                f"{path}:{line_no}: expected 'FILENAME 0|1|2', got {line!r}; fix the file or "
                "use --split seed"
            )
        partition[parts[0]] = int(parts[1])
    return partition


def celeba_splits(config: RunConfig) -> DataSplits:
    """The CelebA train/validation/test splits described in the module docstring.

    Args:
        config: Uses ``data_dir``, ``split``, ``split_seed``, ``val_size``, ``image_size``
            and the ``limit`` / ``val_limit`` / ``test_limit`` caps (each keeps the first
            files of its split; ``test_offset`` skips that many test files first, so that a
            configuration chosen on one slice of the test split can be confirmed on another).

    Returns:
        The splits, with their file names.

    Raises:
        ConfigError: When the folder holds no images or a split comes out empty.
    """
    if config.data_dir is None:
        raise ConfigError("celeba_splits needs --data-dir")
    data_dir = Path(config.data_dir).expanduser()
    image_dir = _image_folder(data_dir)
    files = list_images(image_dir)
    if not files:
        raise ConfigError(
            f"--data-dir {str(data_dir)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            "point it at the folder of img_align_celeba JPEGs"
        )
    partition_path = _find_partition(data_dir, image_dir)
    split = config.split
    if split == "auto":
        split = "official" if partition_path is not None else "seed"
    if split == "official":
        if partition_path is None:
            raise ConfigError(
                f"--split official needs {PARTITION_FILE} next to the images in {image_dir}; "
                "add it or use --split seed"
            )
        partition = _read_partition(partition_path)
        groups: list[list[Path]] = [[], [], []]
        for path in files:
            if path.name in partition:
                groups[partition[path.name]].append(path)
        train, val, test = groups
        how = f"official split from {partition_path.name}"
    else:
        kept = files[:SEED_SPLIT_FILES]
        order = torch.randperm(
            len(kept), generator=torch.Generator().manual_seed(config.split_seed)
        )
        shuffled = [kept[i] for i in order.tolist()]
        n_train = round(SEED_SPLIT_TRAIN_FRACTION * len(shuffled))
        train_all, test = shuffled[:n_train], shuffled[n_train:]
        n_val = min(config.val_size, max(len(train_all) - 1, 0))
        train, val = train_all[: len(train_all) - n_val], train_all[len(train_all) - n_val :]
        how = (
            f"seed split (first {len(kept)} files by name, permuted with seed "
            f"{config.split_seed}, 80/20 train/test, last {n_val} train files for validation)"
        )
    train, val, test = (
        _cap(train, config.limit),
        _cap(val, config.val_limit),
        _cap(test[config.test_offset :], config.test_limit),
    )
    for name, group in (("train", train), ("validation", val), ("test", test)):
        if not group:
            raise ConfigError(
                f"the {name} split of {image_dir} is empty; give more images or use --split seed"
            )
    size = config.image_size
    description = (
        f"CelebA from {image_dir}: {len(train)} train / {len(val)} val / {len(test)} test "
        f"images, {how}, resized bilinearly to {size}x{size}, pixels in [-1, 1]"
    )
    return DataSplits(
        train=ImageFolderDataset(train, size),
        val=ImageFolderDataset(val, size),
        test=ImageFolderDataset(test, size),
        description=description,
        files={
            "train": [p.name for p in train],
            "val": [p.name for p in val],
            "test": [p.name for p in test],
        },
    )


def _cap(files: list[Path], limit: int | None) -> list[Path]:
    return files if limit is None else files[:limit]


def _builtin_photo(name: str) -> np.ndarray:
    from skimage import data as skdata

    if name == "motorcycle":
        return skdata.stereo_motorcycle()[0]
    array: np.ndarray = getattr(skdata, name)()
    return array


def _downscale(array: np.ndarray, scale: float) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    img = Image.fromarray(np.ascontiguousarray(array[:, :, :3]))
    if scale != 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _random_crops(
    photos: list[np.ndarray], count: int, size: int, generator: torch.Generator
) -> Tensor:
    """``count`` crops spread evenly over ``photos``, skipping nearly flat ones."""
    crops: list[Tensor] = []
    attempts = 0
    while len(crops) < count:
        photo = photos[len(crops) % len(photos)]
        height, width = photo.shape[:2]
        if height < size or width < size:
            raise ConfigError(
                f"--image-size {size} is larger than a built-in photograph ({height}x{width} "
                "after --builtin-scale); use a smaller --image-size or a larger --builtin-scale"
            )
        top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
        crop = _uint8_to_tensor(photo[top : top + size, left : left + size])
        attempts += 1
        if float(crop.std()) < 0.05 and attempts < 20 * count:
            continue  # flat sky or background teaches nothing about deblurring
        crops.append(crop)
    return torch.stack(crops)


def builtin_splits(config: RunConfig) -> DataSplits:
    """Crops of photographs shipped with scikit-image (no network access needed).

    Training crops come from :data:`BUILTIN_TRAIN_PHOTOS` (top four fifths of each),
    validation crops from the bottom fifth of the same photographs, and test crops from the
    different photographs :data:`BUILTIN_TEST_PHOTOS`. Photographs are first downscaled by
    ``builtin_scale`` so that a crop holds whole structures, as a resized CelebA face does.

    Args:
        config: Uses ``image_size`` (crop side), ``builtin_*`` counts, ``builtin_scale`` and
            ``seed``.

    Returns:
        The splits as in-memory tensor datasets.
    """
    train_photos, val_photos = [], []
    for name in BUILTIN_TRAIN_PHOTOS:
        photo = _downscale(_builtin_photo(name), config.builtin_scale)
        cut = min(round(photo.shape[0] * (1 - _VAL_ROWS)), photo.shape[0] - config.image_size)
        train_photos.append(photo[:cut])
        val_photos.append(photo[cut:])
    test_photos = [
        _downscale(_builtin_photo(name), config.builtin_scale) for name in BUILTIN_TEST_PHOTOS
    ]
    size = config.image_size
    # One generator per split, so the test crops do not depend on how many training crops
    # were drawn; the test crops do not depend on the run's seed either.
    streams = [torch.Generator().manual_seed(s) for s in (config.seed, config.seed + 1, TEST_SEED)]
    train = _random_crops(train_photos, config.builtin_train_crops, size, streams[0])
    val = _random_crops(val_photos, config.builtin_val_crops, size, streams[1])
    test = _random_crops(test_photos, config.builtin_test_crops, size, streams[2])
    description = (
        f"built-in scikit-image photographs (no CelebA folder given): {len(train)} train crops "
        f"from {', '.join(BUILTIN_TRAIN_PHOTOS)}; {len(val)} validation crops from the bottom "
        f"fifth of those; {len(test)} held-out test crops from {', '.join(BUILTIN_TEST_PHOTOS)}; "
        f"{size}x{size} after downscaling by {config.builtin_scale}, pixels in [-1, 1]"
    )
    return DataSplits(
        train=_TensorImages(train),
        val=_TensorImages(val),
        test=_TensorImages(test),
        description=description,
    )


class _TensorImages(TensorDataset):
    """A ``TensorDataset`` of images that yields the image itself, not a 1-tuple."""

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        image: Tensor = self.tensors[0][index]
        return image


def make_splits(config: RunConfig) -> DataSplits:
    """CelebA splits when ``config.data_dir`` is set, else the built-in photographs."""
    if config.uses_builtin_data:
        return builtin_splits(config)
    return celeba_splits(config)


class _Indexed(Dataset[tuple[int, Tensor]]):
    """Yield ``(index, image)`` so that noise can be seeded per image."""

    def __init__(self, dataset: Dataset[Tensor]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        return index, self.dataset[index]


def batches_loader(dataset: Dataset[Tensor], batches: list[list[int]], workers: int) -> DataLoader:
    """A loader yielding ``(indices, images)`` for exactly the given index batches, in order.

    Passing the batches explicitly (rather than a shuffling sampler) is what lets a resumed
    run skip the batches it has already trained on.
    """
    return DataLoader(_Indexed(dataset), batch_sampler=batches, num_workers=workers)


def chunks(indices: list[int], size: int) -> list[list[int]]:
    """Consecutive batches of ``size`` indices (the last may be shorter)."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]
