"""Data sets as uint8 tensors, and a loader that keeps a whole split on the device."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from samat.config import ConfigError, DataConfig
from samat.files import atomic_file
from samat.safepickle import NotACifarBatch, load_cifar_batch

# Fixed seed for the digits split, subsets and synthetic data: every run, whatever its own seed,
# sees the same examples, so runs differ only in what the config says.
DATA_SEED = 0
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
TINY_CACHE = "samat-cache-tinyimagenet.safetensors"
# Bumped when the cache layout changes, so that an old cache is decoded again rather than trusted.
TINY_CACHE_VERSION = "1"


@dataclass(frozen=True, eq=False)
class Split:
    """Images as uint8 [N, C, H, W] and labels as int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 [{len(self.images)}], got {self.labels.dtype} "
                f"{list(self.labels.shape)}"
            )


@dataclass(frozen=True, eq=False)
class Dataset:
    """Both splits, the per-channel statistics for the model's Normalize, and the augmentation."""

    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    # what fills the crop's padding: 'zeros' or 'reflect' (DataConfig.crop_padding_mode)
    crop_padding_mode: str = "zeros"
    # held out of the training set for model selection (train.validation), when asked for
    validation: Split | None = None


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the data set that `cfg` names, with its subsets and augmentation resolved."""
    if cfg.name == "digits":
        train, test, num_classes = _digits()
    elif cfg.name == "synthetic":
        train, test, num_classes = _synthetic(cfg.image_size, cfg.channels, cfg.num_classes)
    elif cfg.name in ("cifar10", "cifar100"):
        train, test, num_classes = _cifar(Path(cfg.root), cfg.name)
    else:
        train, test, num_classes = _tinyimagenet(Path(cfg.root))
    if cfg.name == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif cfg.name == "cifar100":
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    else:
        mean, std = channel_stats(train.images)
    natural = cfg.name in ("cifar10", "cifar100", "tinyimagenet")
    return Dataset(
        train=_subset(train, cfg.train_size, "train_size", cfg.name),
        test=_subset(test, cfg.test_size, "test_size", cfg.name),
        num_classes=num_classes,
        mean=mean,
        std=std,
        crop_padding=cfg.crop_padding if cfg.crop_padding is not None else (4 if natural else 0),
        # Digits are not flip-invariant (a mirrored 2 is no 2), nor is the synthetic data.
        flip=cfg.flip if cfg.flip is not None else natural,
        crop_padding_mode=cfg.crop_padding_mode,
    )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (exact, via 256-bin histograms)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].flatten(), minlength=256).double()
        p = counts / counts.sum()
        mean = float((p * values).sum())
        means.append(mean)
        stds.append(math.sqrt(max(float((p * values**2).sum()) - mean**2, 0.0)))
    return tuple(means), tuple(stds)


def _subset(split: Split, size: int | None, key: str, name: str) -> Split:
    if size is None:
        return split
    if size > len(split.labels):
        raise ConfigError(
            f"data.{key} {size} exceeds the {len(split.labels)} examples of {name}; "
            f"lower data.{key}"
        )
    keep = torch.randperm(len(split.labels), generator=_generator(DATA_SEED))[:size]
    return Split(split.images[keep], split.labels[keep])


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _digits() -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=360, stratify=labels, random_state=DATA_SEED
    )
    return (
        Split(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        Split(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        10,
    )


def _synthetic(size: int, channels: int, num_classes: int) -> tuple[Split, Split, int]:
    gen = _generator(DATA_SEED)
    # One smooth random pattern per class (coarse noise upsampled), so that the class shows in local
    # structure that a small CNN with global pooling can pick up; pixel noise keeps it from trivial.
    coarse = torch.rand(num_classes, channels, max(2, size // 4), max(2, size // 4), generator=gen)
    patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def draw(n: int) -> Split:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, channels, size, size, generator=gen)
        images = (0.2 + 0.6 * patterns[labels] + 0.15 * noise).clamp(0, 1)
        return Split((images * 255).round().to(torch.uint8), labels)

    return draw(2000), draw(500), num_classes


def _missing(root: Path, what: str, expected: str) -> ConfigError:
    return ConfigError(
        f"data.root {root}: no {what} found (expected {expected}); "
        f"download {what} there or fix data.root"
    )


def _cifar_split(path: Path, label_key: bytes) -> Split:
    # CIFAR's own distribution format is a pickle, read by an unpickler that builds arrays only
    try:
        batch = load_cifar_batch(path)
    except NotACifarBatch as error:
        raise ConfigError(
            f"{path} is not a CIFAR batch: it {error}; replace it with the file from the "
            "CIFAR archive (samat data check names every bad file)"
        ) from None
    # Each row holds 1024 red, then 1024 green, then 1024 blue values, each a row-major 32x32 plane.
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels))


# name -> (folder inside data.root, human name, training files, test file, label key, classes)
CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        "CIFAR-10",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python", "CIFAR-100", ["train"], "test", b"fine_labels", 100),
}


def _cifar(root: Path, name: str) -> tuple[Split, Split, int]:
    folder, what, train_files, test_file, label_key, num_classes = CIFAR_LAYOUT[name]
    # data.root may be the folder that holds the extracted archive or the extracted folder itself.
    base = root if (root / train_files[0]).is_file() else root / folder
    for file in [*train_files, test_file]:
        if not (base / file).is_file():
            raise _missing(root, what, f"{folder}/{file}")
    parts = [_cifar_split(base / file, label_key) for file in train_files]
    train = Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
    return train, _cifar_split(base / test_file, label_key), num_classes


def _tinyimagenet(root: Path) -> tuple[Split, Split, int]:
    cache = root / TINY_CACHE
    if cache.is_file():
        with safe_open(cache, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("version") == TINY_CACHE_VERSION:
            tensors = load_file(cache)
            train = Split(tensors["train_images"], tensors["train_labels"])
            test = Split(tensors["test_images"], tensors["test_labels"])
            return train, test, int(meta["num_classes"])
    base = root if (root / "wnids.txt").is_file() else root / "tiny-imagenet-200"
    annotations = base / "val" / "val_annotations.txt"
    if not (base / "wnids.txt").is_file() or not annotations.is_file():
        raise _missing(
            root,
            "Tiny-ImageNet",
            "tiny-imagenet-200/wnids.txt and tiny-imagenet-200/val/val_annotations.txt",
        )
    # Sorted class ids, as torchvision's ImageFolder would number them.
    wnids = sorted(base.joinpath("wnids.txt").read_text().split())
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train_files = [
        (path, index[wnid])
        for wnid in wnids
        for path in sorted((base / "train" / wnid / "images").glob("*.JPEG"))
    ]
    test_files = []
    for line in annotations.read_text().splitlines():
        if line.strip():
            file, wnid = line.split("\t")[:2]
            if wnid not in index:
                raise ConfigError(f"{annotations}: class {wnid} is not in wnids.txt; re-extract it")
            test_files.append((base / "val" / "images" / file, index[wnid]))
    if not train_files:
        raise _missing(root, "Tiny-ImageNet", "tiny-imagenet-200/train/<wnid>/images/*.JPEG")
    train, test = _decode(train_files), _decode(test_files)
    tensors = {
        "train_images": train.images,
        "train_labels": train.labels,
        "test_images": test.images,
        "test_labels": test.labels,
    }
    _write_cache(cache, tensors, {"version": TINY_CACHE_VERSION, "num_classes": str(len(wnids))})
    return train, test, len(wnids)


def _decode(files: list[tuple[Path, int]]) -> Split:
    from PIL import Image

    images = np.empty((len(files), 64, 64, 3), dtype=np.uint8)

    def read(i: int) -> None:
        path = files[i][0]
        if not path.is_file():
            raise ConfigError(f"{path}: listed in Tiny-ImageNet but missing; re-extract data.root")
        with Image.open(path) as image:
            # Some Tiny-ImageNet images are grayscale; the network expects three channels.
            pixels = np.asarray(image.convert("RGB"))
        if pixels.shape != (64, 64, 3):
            raise ConfigError(
                f"{path}: expected a 64x64 image, got {pixels.shape[1]}x"
                f"{pixels.shape[0]}; re-extract data.root"
            )
        images[i] = pixels

    # PIL releases the GIL while decoding, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(read, range(len(files))))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return Split(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels)


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # a read-only data.root only costs the decoding again next time; concurrent runs each write
    # a complete temp file and rename it (files.atomic_file), so a reader never sees half a
    # cache, and the group can read it (no mkstemp 0600 in a shared root)
    with contextlib.suppress(OSError), atomic_file(path, sync=False, make_parent=False) as temp:
        save_file(tensors, temp, metadata=metadata)


class DeviceLoader:
    """Batches of one split kept on the device as one uint8 tensor, augmented per batch on tensors.

    Order and augmentation depend only on (seed, epoch), through a local generator, so that a
    resumed run replays exactly the batches it would have seen.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        device: torch.device | str,
        shuffle: bool,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        padding_mode: str = "zeros",
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.crop_padding = crop_padding
        self.padding_mode = padding_mode
        self.flip = flip
        self.drop_last = drop_last
        self.seed = seed
        self.channels_last = channels_last

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (float32 images in [0, 1] [B, C, H, W], int64 labels) for one epoch, from batch
        `start` on (a run resumed mid-epoch gets exactly the batches it had not seen)."""
        # Draws happen on the CPU so that the batches do not depend on the device either.
        key = hashlib.blake2b(f"{self.seed}:{epoch}".encode(), digest_size=8).digest()
        gen = _generator(int.from_bytes(key, "little") >> 1)
        n = len(self.labels)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for step, begin in enumerate(range(0, len(self) * self.batch_size, self.batch_size)):
            index = order[begin : begin + self.batch_size]
            draws = self._draws(len(index), gen)
            if step < start:
                continue
            images = self._augment(self.images[index], draws)
            images = images.float().div_(255)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels[index]

    def _draws(self, b: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The batch's random crop offsets (each in 0..2p) and flips, drawn in a fixed order."""
        draws = {}
        if self.crop_padding:
            draws["offsets"] = torch.randint(0, 2 * self.crop_padding + 1, (2, b, 1), generator=gen)
        if self.flip:
            draws["flip"] = torch.rand(b, generator=gen) < 0.5
        return draws

    def _augment(self, images: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        b, _, h, w = images.shape
        if "offsets" in draws:
            p = self.crop_padding
            dy, dx = draws["offsets"].to(images.device)
            rows = (dy + torch.arange(h, device=images.device))[:, :, None]
            cols = (dx + torch.arange(w, device=images.device))[:, None, :]
            batch = torch.arange(b, device=images.device)[:, None, None]
            if self.padding_mode == "reflect":
                # torchvision's padding_mode='reflect' (numpy's 'reflect', the edge not
                # repeated), as indices into the unpadded image: any dtype, no padded copy
                padded, rows, cols = images, _reflect(rows - p, h), _reflect(cols - p, w)
            else:
                padded = F.pad(images, (p, p, p, p))
            # Advanced indexing around the channel slice yields [B, H, W, C].
            images = padded[batch, :, rows, cols].permute(0, 3, 1, 2)
        if "flip" in draws:
            mask = draws["flip"].to(images.device)
            images = torch.where(mask[:, None, None, None], images.flip(3), images)
        return images


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions -p..size-1+p mirrored into 0..size-1 about the first and last pixel."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    folded = index.remainder(period)
    return torch.where(folded < size, folded, period - folded)


def split_validation(split: Split, size: int) -> tuple[Split, Split]:
    """(train, validation): `size` examples held out by a fixed draw, the same for every run."""
    if size >= len(split.labels):
        raise ConfigError(
            f"train.validation.size {size} leaves no training examples out of "
            f"{len(split.labels)}; lower it"
        )
    order = torch.randperm(len(split.labels), generator=_generator(DATA_SEED + 1))
    held, kept = order[:size].sort().values, order[size:].sort().values
    return Split(split.images[kept], split.labels[kept]), Split(
        split.images[held], split.labels[held]
    )
