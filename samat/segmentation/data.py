"""Segmentation data sets from their released layouts, decoded once into a uint8 tensor cache.

Every image is scaled down to fit `size` x `size` when its longer side exceeds `size` (bilinear;
masks nearest) and padded at the bottom and right to `size` x `size` with black pixels and the
ignore label, so a split is one tensor and padding never counts in the loss or the metrics. The
defaults keep every pixel: Stanford Background's images are at most 320 pixels on a side and VOC's
at most 500, so `DEFAULT_SIZES` only pads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from samat.config import ConfigError
from samat.files import atomic_file
from samat.segmentation.loss import IGNORE_INDEX

DEFAULT_SIZES = {"stanford_background": 320, "voc2012": 512}
# Both networks start from ImageNet conventions (VOC's backbone is ImageNet-pretrained), so both
# data sets normalise with ImageNet's statistics rather than their own.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STANFORD_CLASSES = ("sky", "tree", "road", "grass", "water", "building", "mountain", "foreground")
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
# Stanford Background has no official split: a fixed permutation (seed 0) of the sorted image
# names puts round(20%) in the test split, 572 / 143 of the 715 images.
STANFORD_SPLIT_SEED = 0
STANFORD_TEST_FRACTION = 0.2
# Bumped when the cache layout changes, so that an old cache is decoded again rather than trusted.
CACHE_VERSION = "1"


@dataclass(frozen=True, eq=False)
class SegSplit:
    """Images as uint8 [N, 3, H, W] and masks as uint8 [N, H, W] (class ids, 255 = ignore)."""

    images: torch.Tensor
    masks: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, 3, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        expected = (self.images.shape[0], *self.images.shape[2:])
        if self.masks.dtype != torch.uint8 or tuple(self.masks.shape) != expected:
            raise ValueError(
                f"masks must be uint8 {list(expected)}, got {self.masks.dtype} "
                f"{list(self.masks.shape)}"
            )


@dataclass(frozen=True, eq=False)
class SegDataset:
    """Both splits, the class names and the statistics for the model's Normalize."""

    train: SegSplit
    test: SegSplit
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        """How many classes the masks use (255 aside)."""
        return len(self.class_names)


def load_segmentation(name: str, root: Path | str, *, size: int | None = None) -> SegDataset:
    """Data set `name` (stanford_background | voc2012) under `root`; `size` None = its default."""
    loaders = {"stanford_background": load_stanford_background, "voc2012": load_voc2012}
    if name not in loaders:
        raise ConfigError(f"data.name {name!r} is unknown; use one of: {', '.join(loaders)}")
    return loaders[name](root, size=size or DEFAULT_SIZES[name])


def stanford_split(stems: list[str]) -> tuple[list[str], list[str]]:
    """(train, test) image names, each sorted: the fixed seeded 80/20 split of the sorted names."""
    ordered = sorted(stems)
    n_test = round(STANFORD_TEST_FRACTION * len(ordered))
    gen = torch.Generator().manual_seed(STANFORD_SPLIT_SEED)
    order = torch.randperm(len(ordered), generator=gen).tolist()
    test = sorted(ordered[i] for i in order[:n_test])
    train = sorted(ordered[i] for i in order[n_test:])
    return train, test


def load_stanford_background(root: Path | str, *, size: int = 320) -> SegDataset:
    """Stanford Background (iccv09Data): 8 classes, unknown (-1) pixels ignored.

    `root` is the folder that holds `iccv09Data/` or `iccv09Data/` itself.
    """
    root = Path(root)
    base = root if (root / "images").is_dir() else root / "iccv09Data"
    stems = sorted(p.name.removesuffix(".jpg") for p in (base / "images").glob("*.jpg"))
    if not stems:
        raise ConfigError(
            f"data.root {root}: no Stanford Background found (expected iccv09Data/images/*.jpg "
            "and iccv09Data/labels/*.regions.txt); extract iccv09Data.tgz there or fix data.root"
        )
    train, test = stanford_split(stems)

    def item(stem: str) -> tuple[Path, Path]:
        return base / "images" / f"{stem}.jpg", base / "labels" / f"{stem}.regions.txt"

    return _load(
        base / f"samat-cache-stanford-{size}.safetensors",
        f"{STANFORD_SPLIT_SEED} {STANFORD_TEST_FRACTION}\n" + "\n".join(stems),
        {"train": [item(s) for s in train], "test": [item(s) for s in test]},
        _read_regions,
        size,
        STANFORD_CLASSES,
    )


def load_voc2012(root: Path | str, *, size: int = 512) -> SegDataset:
    """PASCAL VOC2012 segmentation: 21 classes, train (1464) / val (1449) from ImageSets.

    `root` is the folder that holds `VOCdevkit/`, `VOCdevkit/` itself or `VOC2012/` itself.
    """
    root = Path(root)
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    lists = Path("ImageSets") / "Segmentation"
    base = next((c for c in candidates if (c / lists).is_dir()), candidates[-1])
    files = {}
    for split, listed in (("train", "train.txt"), ("test", "val.txt")):
        path = base / lists / listed
        if not path.is_file():
            raise ConfigError(
                f"data.root {root}: no VOC2012 segmentation list found (expected "
                f"VOCdevkit/VOC2012/{lists / listed}); extract VOCtrainval_11-May-2012.tar "
                "there or fix data.root"
            )
        names = path.read_text().split()
        files[split] = [
            (base / "JPEGImages" / f"{n}.jpg", base / "SegmentationClass" / f"{n}.png")
            for n in names
        ]
    fingerprint = "\n".join(f"{split}:{p.stem}" for split, pairs in files.items() for p, _ in pairs)
    return _load(
        base / f"samat-cache-voc2012-{size}.safetensors",
        fingerprint,
        files,
        _read_palette_png,
        size,
        VOC_CLASSES,
    )


def _load(
    cache: Path,
    listing: str,
    files: dict[str, list[tuple[Path, Path]]],
    read_mask: Callable[[Path], np.ndarray],
    size: int,
    class_names: tuple[str, ...],
) -> SegDataset:
    # The cache is trusted while the file list, the size and the layout version are unchanged;
    # delete it to decode again after editing images in place.
    fingerprint = hashlib.blake2b(
        f"{CACHE_VERSION}\n{size}\n{listing}".encode(), digest_size=16
    ).hexdigest()
    if cache.is_file():
        with safe_open(cache, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") == fingerprint:
            tensors = load_file(cache)
            return SegDataset(
                train=SegSplit(tensors["train_images"], tensors["train_masks"]),
                test=SegSplit(tensors["test_images"], tensors["test_masks"]),
                class_names=class_names,
            )
    splits = {
        name: _decode(pairs, read_mask, size, len(class_names)) for name, pairs in files.items()
    }
    tensors = {}
    for name, split in splits.items():
        tensors[f"{name}_images"], tensors[f"{name}_masks"] = split.images, split.masks
    _write_cache(cache, tensors, {"version": CACHE_VERSION, "fingerprint": fingerprint})
    return SegDataset(train=splits["train"], test=splits["test"], class_names=class_names)


def _read_regions(path: Path) -> np.ndarray:
    """A Stanford `*.regions.txt`: one whitespace-separated row of class ids per pixel row."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if not rows or any(len(row) != len(rows[0]) for row in rows):
        raise ConfigError(f"{path}: not a rectangle of class ids; re-extract iccv09Data.tgz")
    labels = np.array(rows, dtype=np.int64)
    if labels.min() < -1 or labels.max() >= len(STANFORD_CLASSES):
        raise ConfigError(f"{path}: class ids outside -1..7; re-extract iccv09Data.tgz")
    return np.where(labels < 0, IGNORE_INDEX, labels).astype(np.uint8)


def _read_palette_png(path: Path) -> np.ndarray:
    """A VOC `SegmentationClass/*.png`: palette indices are the class ids (255 = void)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ConfigError(
                f"{path}: mode {image.mode}, not a palette PNG of class ids; use the "
                "SegmentationClass PNGs as released (not converted to RGB)"
            )
        return np.asarray(image, dtype=np.uint8).copy()


def _decode(
    pairs: list[tuple[Path, Path]],
    read_mask: Callable[[Path], np.ndarray],
    size: int,
    num_classes: int,
) -> SegSplit:
    from PIL import Image

    images = np.zeros((len(pairs), size, size, 3), dtype=np.uint8)
    masks = np.full((len(pairs), size, size), IGNORE_INDEX, dtype=np.uint8)

    def read(i: int) -> None:
        image_path, mask_path = pairs[i]
        for path in pairs[i]:
            if not path.is_file():
                raise ConfigError(f"{path}: listed in the data set but missing; re-extract it")
        mask = read_mask(mask_path)
        bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise ConfigError(
                f"{mask_path}: class id {int(mask[bad][0])} outside 0..{num_classes - 1} and "
                f"{IGNORE_INDEX}; re-extract it"
            )
        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
        if image.size != (mask.shape[1], mask.shape[0]):
            raise ConfigError(
                f"{mask_path}: {mask.shape[1]}x{mask.shape[0]} labels for a "
                f"{image.size[0]}x{image.size[1]} image; re-extract it"
            )
        longer = max(image.size)
        if longer > size:
            shape = tuple(max(1, round(side * size / longer)) for side in image.size)
            image = image.resize(shape, Image.Resampling.BILINEAR)
            mask = np.asarray(Image.fromarray(mask).resize(shape, Image.Resampling.NEAREST))
        h, w = mask.shape
        images[i, :h, :w] = np.asarray(image)
        masks[i, :h, :w] = mask

    # PIL releases the GIL while decoding, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(read, range(len(pairs))))
    return SegSplit(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(masks)
    )


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # a read-only data.root only costs the decoding again next time; concurrent runs each write
    # a complete temp file and rename it (files.atomic_file), so a reader never sees half a
    # cache, and the group can read it (no mkstemp 0600 in a shared root)
    with contextlib.suppress(OSError), atomic_file(path, sync=False, make_parent=False) as temp:
        save_file(tensors, temp, metadata=metadata)
