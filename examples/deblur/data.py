"""Images: the photographs built into scikit-image or a CelebA folder, split three ways.

Every image is a ``(3, H, W)`` float32 tensor with pixels in :math:`[-1, 1]`.

* Built-in (no ``--data-dir``): crops of scikit-image's photographs, downscaled by 1/2 so that
  a crop holds whole structures. Training crops come from the top four fifths of
  :data:`TRAIN_PHOTOS`, validation crops from their bottom fifth, test crops from the other
  photographs :data:`TEST_PHOTOS`, drawn with :data:`TEST_SEED` whatever the run's seed.
* CelebA: the JPEGs of ``img_align_celeba`` (or the folder itself), resized bilinearly by
  Pillow. The first 10,000 files by name are shuffled with ``--split-seed`` and cut 80/20
  into train and test; the last ``--val-size`` training files are the validation set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from implicitlayers import imaging

from .cli import SettingsError
from .ddp import Context

TRAIN_PHOTOS: tuple[str, ...] = ("astronaut", "rocket", "motorcycle", "immunohistochemistry")
TRAIN_PHOTOS += ("retina", "camera", "coins", "moon", "brick", "grass", "gravel")
TEST_PHOTOS = ("chelsea", "coffee")
#: Seed of the built-in test crops and of every test measurement's noise.
TEST_SEED = 20240203
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TAGS = ("pretrain", "train", "val", "test", "restore")


def image_seeds(seed: int, tag: str, epoch: int, index: list[int]) -> list[int]:
    """A 63-bit seed per image, hashed from (run seed, purpose, epoch, dataset index): noise and
    augmentation do not depend on the batch, the number of processes or an interruption."""
    sequences = (np.random.SeedSequence([seed, TAGS.index(tag), epoch, i]) for i in index)
    return [int(s.generate_state(1, np.uint64)[0]) >> 1 for s in sequences]


def noise(seeds: list[int], shape: torch.Size) -> Tensor:
    """Standard normal noise per image, one CPU generator per seed (the same on any device)."""
    return imaging.add_noise(torch.zeros(len(seeds), *shape), 1.0, seeds=seeds)


class Images(Dataset[Tensor]):
    """Images held in memory (a ``(N, 3, H, W)`` tensor), or files read and resized to
    ``size x size`` when indexed."""

    def __init__(self, items: Tensor | list[Path], size: int | None = None) -> None:
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tensor:
        item = self.items[index]
        return item if isinstance(item, Tensor) else load_image(item, self.size)


@dataclass
class Splits:
    """Train, validation and test images, and where they came from."""

    train: Images
    val: Images
    test: Images
    description: str

    def files(self) -> dict[str, list[str]]:
        """Each split's file names (none for the built-in crops), for ``split.json``."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {k: [p.name for p in v.items if isinstance(p, Path)] for k, v in splits.items()}


def shard(
    images: Images, size: int, ctx: Context, seed: int | None = None, epoch: int = 0
) -> list[list[int]]:
    """This process's index batches of ``images``: in order, or shuffled by ``(seed, epoch)``
    (``DistributedSampler`` with ``drop_last``: every process gets as many)."""
    if seed is None:
        order = list(range(ctx.rank, len(images), ctx.world))
    else:
        sampler = DistributedSampler[int](images, ctx.world, ctx.rank, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        order = list(sampler)
    return [order[i : i + size] for i in range(0, len(order), size)]


def draws(images: Images, size: int, ctx: Context, seed: int, steps: int) -> list[list[int]]:
    """``steps`` random batches (with replacement) of ``size`` per process, this one's share."""
    g = torch.Generator().manual_seed(seed)
    draw = (torch.randint(len(images), (size * ctx.world,), generator=g) for _ in range(steps))
    return [d.tolist()[ctx.rank :: ctx.world] for d in draw]


def load(
    images: Images, batches: list[list[int]], workers: int = 0
) -> Iterator[tuple[list[int], Tensor]]:
    """``(indices, images)`` for exactly these batches, in order (a resumed run skips some)."""
    return zip(batches, DataLoader(images, batch_sampler=batches, num_workers=workers), strict=True)


def augment(x: Tensor, seeds: list[int], crop: int | None) -> Tensor:
    """A random ``crop x crop`` window of each clean image (``None``: all of it), mirrored with
    probability 1/2, as its seed decides. Training measures the result: a crop is blurred at
    its own border and noised as an image of its own, exactly as a whole test image is."""
    out = []
    for image, seed in zip(x, seeds, strict=True):
        g = torch.Generator().manual_seed(seed ^ 0x5BD1E995)
        if crop is not None:
            top, left = (int(torch.randint(n - crop + 1, (1,), generator=g)) for n in x.shape[2:])
            image = image[:, top : top + crop, left : left + crop]
        out.append(image.flip(-1) if bool(torch.randint(2, (1,), generator=g)) else image)
    return torch.stack(out)


def to_tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(array[:, :, :3])).permute(2, 0, 1).float() / 127.5 - 1


def load_image(path: str | Path, size: int | None = None) -> Tensor:
    """Read an image as ``(3, H, W)`` in :math:`[-1, 1]`, resized to ``size x size`` if given."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if size is not None:
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return to_tensor(np.asarray(rgb, dtype=np.uint8))


def check_paths(source: str, target: str) -> Tensor:
    """``restore``'s ``--input`` read as by :func:`load_image`, once ``--output`` is known to be
    an image file name."""
    if not Path(source).is_file():
        raise SettingsError(f"--input {source!r} does not exist; pass an image file")
    if Path(target).suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".webp"):
        raise SettingsError(f"--output {target!r} needs an image suffix such as .png")
    return load_image(source)


def save_image(x: Tensor, path: str | Path) -> None:
    """Write a ``(3, H, W)`` image in :math:`[-1, 1]` (format from the suffix)."""
    array = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    Image.fromarray(array.permute(1, 2, 0).numpy()).save(path)


def photo(name: str) -> np.ndarray:
    """A scikit-image photograph as RGB, downscaled by 1/2."""
    from skimage import data

    array = getattr(data, "stereo_" + name if name == "motorcycle" else name)()
    array = array[0] if isinstance(array, tuple) else array  # the stereo pair's left image
    img = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    return np.asarray(img.resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR))


def _crops(photos: list[np.ndarray], count: int, size: int, seed: int) -> Images:
    """``count`` crops spread over ``photos``, skipping nearly flat ones (sky, background)."""
    g, crops, attempts = torch.Generator().manual_seed(seed), list[Tensor](), 0
    while len(crops) < count:
        part = photos[len(crops) % len(photos)]
        if min(part.shape[:2]) < size:
            raise SettingsError(
                f"--image-size {size} is larger than a built-in photograph part "
                f"({part.shape[0]}x{part.shape[1]}); use --image-size 64 or less, or --data-dir"
            )
        top, left = (int(torch.randint(n - size + 1, (1,), generator=g)) for n in part.shape[:2])
        crop = to_tensor(part[top : top + size, left : left + size])
        attempts += 1
        if float(crop.std()) >= 0.05 or attempts >= 20 * count:
            crops.append(crop)
    return Images(torch.stack(crops))


def _celeba(s: Any) -> Splits:
    folder = root = Path(s.data_dir).expanduser()
    if not root.is_dir():
        raise SettingsError(
            f"--data-dir {str(root)!r} is not a folder; pass the folder holding the "
            "img_align_celeba JPEGs (or its parent), or omit --data-dir for the built-in demo"
        )
    while (folder / "img_align_celeba").is_dir():  # the Kaggle zip nests it twice
        folder = folder / "img_align_celeba"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)[:10_000]
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(s.split_seed))
    shuffled, cut = [files[i] for i in order.tolist()], round(0.8 * len(files))
    n_val = min(s.val_size, max(cut - 1, 0))
    train, val = shuffled[: cut - n_val][: s.limit], shuffled[cut - n_val : cut]
    test = shuffled[cut + s.test_offset :][: s.test_limit]
    for name, group in (("train", train), ("validation", val), ("test", test)):
        if not group:
            raise SettingsError(f"the {name} split of {folder} is empty; give more images")
    description = (
        f"CelebA from {folder}: {len(train)} train / {len(val)} val / {len(test)} test images "
        f"({len(files)} files shuffled with seed {s.split_seed}, cut 80/20, {n_val} "
        f"validation), resized bilinearly to {s.image_size}x{s.image_size}, pixels in [-1, 1]"
    )
    size = s.image_size
    return Splits(Images(train, size), Images(val, size), Images(test, size), description)


def make_splits(s: Any) -> Splits:
    """The splits of the flagship's ``Settings`` ``s``: CelebA with ``data_dir``, else built-in."""
    if s.data_dir is not None:
        return _celeba(s)
    size, (n_train, n_val, n_test) = s.image_size, s.builtin_crops
    photos = [photo(name) for name in TRAIN_PHOTOS]
    parts = [(p, min(round(p.shape[0] * 0.8), p.shape[0] - size)) for p in photos]  # top 4/5
    train = _crops([p[:cut] for p, cut in parts], n_train, size, s.seed)
    val = _crops([p[cut:] for p, cut in parts], n_val, size, s.seed + 1)
    test = _crops([photo(name) for name in TEST_PHOTOS], n_test, size, TEST_SEED)
    description = (
        f"built-in scikit-image photographs (no CelebA folder given): {len(train)} train crops "
        f"from {', '.join(TRAIN_PHOTOS)}; {len(val)} validation crops from the bottom fifth of "
        f"those; {len(test)} held-out test crops from {', '.join(TEST_PHOTOS)}; "
        f"{size}x{size} after downscaling by 0.5, pixels in [-1, 1]"
    )
    return Splits(train, val, test, description)
