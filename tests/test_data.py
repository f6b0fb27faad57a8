"""Tests for samat.data: the five data sources and the device-resident loader."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samat.config import ConfigError, DataConfig
from samat.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    TINY_CACHE,
    DeviceLoader,
    Split,
    channel_stats,
    load_dataset,
)


def test_digits_shapes_dtypes_and_stratified_split() -> None:
    data = load_dataset(DataConfig(name="digits"))
    assert data.train.images.shape == (1437, 1, 8, 8)
    assert data.test.images.shape == (360, 1, 8, 8)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert data.num_classes == 10
    assert (data.crop_padding, data.flip) == (0, False)
    # 0..16 scaled by 255 / 16 and rounded: 0 and 255 occur, nothing else off that grid.
    grid = {round(v * 255 / 16) for v in range(17)}
    assert set(data.train.images.unique().tolist()) <= grid
    assert data.train.images.min() == 0 and data.train.images.max() == 255
    # Stratified: each of the ~180 examples per class puts 36 +- 1 into the test split.
    counts = torch.bincount(data.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37 and counts.sum() == 360


def test_digits_split_ignores_global_seeds() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    first = load_dataset(DataConfig(name="digits"))
    torch.manual_seed(2)
    np.random.seed(2)
    second = load_dataset(DataConfig(name="digits"))
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)


def test_mean_std_are_train_split_statistics() -> None:
    data = load_dataset(DataConfig(name="digits"))
    pixels = data.train.images.double() / 255
    assert data.mean == pytest.approx((pixels.mean().item(),), abs=1e-9)
    assert data.std == pytest.approx((pixels.std(unbiased=False).item(),), abs=1e-9)


def test_channel_stats_per_channel() -> None:
    images = torch.zeros(2, 2, 1, 2, dtype=torch.uint8)
    images[:, 1] = torch.tensor([[0, 255]], dtype=torch.uint8)
    mean, std = channel_stats(images)
    assert mean == pytest.approx((0.0, 0.5))
    assert std == pytest.approx((0.0, 0.5))


def test_subsets_are_fixed_and_checked() -> None:
    full = load_dataset(DataConfig(name="digits"))
    cfg = DataConfig(name="digits", train_size=100, test_size=50)
    small, again = load_dataset(cfg), load_dataset(cfg)
    assert len(small.train.labels) == 100 and len(small.test.labels) == 50
    assert torch.equal(small.train.images, again.train.images)
    # A subset is a selection of the full split's examples, with their own labels.
    test = zip(full.test.images, full.test.labels, strict=True)
    rows = {tuple(x.flatten().tolist()): int(y) for x, y in test}
    for x, y in zip(small.test.images, small.test.labels, strict=True):
        assert rows[tuple(x.flatten().tolist())] == int(y)
    # Statistics stay those of the full training split.
    assert small.mean == full.mean
    with pytest.raises(ConfigError, match=r"data\.train_size 5000 exceeds the 1437"):
        load_dataset(DataConfig(name="digits", train_size=5000))


def test_augmentation_from_config_overrides_default() -> None:
    data = load_dataset(DataConfig(name="digits", crop_padding=2, flip=True, test_size=10))
    assert (data.crop_padding, data.flip) == (2, True)


def test_synthetic_is_deterministic_balanced_and_learnable() -> None:
    cfg = DataConfig(name="synthetic", image_size=12, channels=3, num_classes=4)
    torch.manual_seed(3)
    data = load_dataset(cfg)
    torch.manual_seed(4)
    again = load_dataset(cfg)
    assert torch.equal(data.train.images, again.train.images)
    assert torch.equal(data.test.labels, again.test.labels)
    assert data.train.images.shape == (2000, 3, 12, 12) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (500, 3, 12, 12) and data.num_classes == 4
    assert torch.bincount(data.train.labels).tolist() == [500] * 4
    assert (data.crop_padding, data.flip) == (0, False) and len(data.mean) == 3
    # The classes differ in their pixels: nearest class mean already separates them.
    x_train = data.train.images.flatten(1).float()
    centers = torch.stack([x_train[data.train.labels == k].mean(0) for k in range(4)])
    predicted = torch.cdist(data.test.images.flatten(1).float(), centers).argmin(1)
    assert (predicted == data.test.labels).float().mean() > 0.9


def _cifar_batch(path: Path, images: np.ndarray, labels: list[int], label_key: bytes) -> None:
    # The on-disk format: a pickled dict with bytes keys; rows of 3072 = 1024 R, 1024 G, 1024 B.
    extra = {b"coarse_labels": [0] * len(labels)} if label_key == b"fine_labels" else {}
    batch = {
        b"batch_label": path.name.encode(),
        label_key: labels,
        b"data": images.reshape(len(labels), 3072),
        b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
        **extra,
    }
    with path.open("wb") as f:
        pickle.dump(batch, f)


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(1, 6):
        images = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
        _cifar_batch(folder / f"data_batch_{k}", images, [k, k + 1], b"labels")
    test = np.zeros((3, 3, 32, 32), dtype=np.uint8)
    rows = test.reshape(3, 3072)
    rows[1, 1024 + 5 * 32 + 30] = 200  # green plane, row 5, column 30 of test image 1
    rows[2, 2 * 1024 + 31 * 32 + 0] = 77  # blue plane, row 31, column 0 of test image 2
    _cifar_batch(folder / "test_batch", test, [9, 8, 7], b"labels")
    return tmp_path


def test_cifar10_reads_batches_in_order_with_pixel_layout(cifar10_root: Path) -> None:
    data = load_dataset(DataConfig(name="cifar10", root=cifar10_root))
    assert data.train.images.shape == (10, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert data.test.labels.tolist() == [9, 8, 7] and data.test.labels.dtype == torch.int64
    test = data.test.images
    assert test[1, 1, 5, 30] == 200 and test[2, 2, 31, 0] == 77
    assert int(test.sum()) == 277
    assert data.num_classes == 10 and (data.crop_padding, data.flip) == (4, True)
    assert data.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_cifar10_root_may_be_the_batches_folder(cifar10_root: Path) -> None:
    direct = load_dataset(DataConfig(name="cifar10", root=cifar10_root / "cifar-10-batches-py"))
    parent = load_dataset(DataConfig(name="cifar10", root=cifar10_root))
    assert torch.equal(direct.train.images, parent.train.images)


def test_cifar10_missing_files_name_data_root(cifar10_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.root .*nowhere: no CIFAR-10 found"):
        load_dataset(DataConfig(name="cifar10", root=tmp_path / "nowhere"))
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py/data_batch_3.*fix data\.root"):
        load_dataset(DataConfig(name="cifar10", root=cifar10_root))


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = np.zeros((4, 3, 32, 32), dtype=np.uint8)
    train[3, 0, 0, 1] = 9
    _cifar_batch(folder / "train", train, [99, 0, 42, 7], b"fine_labels")
    _cifar_batch(folder / "test", train[:2], [5, 6], b"fine_labels")
    data = load_dataset(DataConfig(name="cifar100", root=tmp_path))
    assert data.train.labels.tolist() == [99, 0, 42, 7] and data.test.labels.tolist() == [5, 6]
    assert data.train.images[3, 0, 0, 1] == 9 and data.num_classes == 100
    # CIFAR-100's published statistics and the natural-image augmentation
    assert (data.mean, data.std) == (CIFAR100_MEAN, CIFAR100_STD)
    assert (data.crop_padding, data.flip) == (4, True)
    with pytest.raises(ConfigError, match="no CIFAR-100 found"):
        load_dataset(DataConfig(name="cifar100", root=tmp_path / "cifar-10-batches-py"))


# Class ids in file order; samat numbers them sorted (as ImageFolder does): n01 -> 0, n02 -> 1, ...
TINY_COLOURS = {"n03": (200, 30, 30), "n01": (30, 200, 30), "n02": (30, 30, 200)}


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    base = tmp_path / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in TINY_COLOURS))
    for wnid, colour in TINY_COLOURS.items():
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), colour).save(images / f"{wnid}_{i}.JPEG", "JPEG")
    # Tiny-ImageNet holds some grayscale JPEGs.
    Image.new("L", (64, 64), 128).save(base / "train" / "n01" / "images" / "n01_2.JPEG", "JPEG")
    lines = []
    for i, wnid in enumerate(["n02", "n03", "n01", "n02"]):
        Image.new("RGB", (64, 64), TINY_COLOURS[wnid]).save(
            base / "val" / "images" / f"val_{i}.JPEG", "JPEG"
        )
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return tmp_path


def test_tinyimagenet_reads_jpegs_with_sorted_class_ids(tiny_root: Path) -> None:
    data = load_dataset(DataConfig(name="tinyimagenet", root=tiny_root))
    assert data.train.images.shape == (7, 3, 64, 64) and data.train.images.dtype == torch.uint8
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert data.test.labels.tolist() == [1, 2, 0, 1]
    assert data.num_classes == 3 and (data.crop_padding, data.flip) == (4, True)
    ids = sorted(TINY_COLOURS)
    # Train image 2 is the grayscale n01_2: its one channel is repeated to three.
    grey = data.train.images[2].int()
    assert (grey - 128).abs().max() <= 2 and torch.equal(grey[0], grey[2])
    coloured = [(data.train, i) for i in (0, 1, 3, 4, 5, 6)] + [(data.test, i) for i in range(4)]
    for split, i in coloured:
        colour = torch.tensor(TINY_COLOURS[ids[split.labels[i]]]).view(3, 1, 1)
        assert (split.images[i].int() - colour).abs().max() <= 8  # JPEG loss on flat colour


def test_tinyimagenet_cache_serves_later_loads(tiny_root: Path) -> None:
    first = load_dataset(DataConfig(name="tinyimagenet", root=tiny_root / "tiny-imagenet-200"))
    cache = tiny_root / "tiny-imagenet-200" / TINY_CACHE
    assert cache.is_file()
    assert [p.name for p in cache.parent.iterdir() if p.name.startswith(".")] == []
    for image in (tiny_root / "tiny-imagenet-200").rglob("*.JPEG"):
        image.unlink()
    second = load_dataset(DataConfig(name="tinyimagenet", root=tiny_root / "tiny-imagenet-200"))
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert second.num_classes == 3 and second.mean == first.mean


def test_tinyimagenet_missing_names_data_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.root .*: no Tiny-ImageNet found"):
        load_dataset(DataConfig(name="tinyimagenet", root=tmp_path))


def _toy_split(n: int = 37, channels: int = 2, size: int = 6) -> Split:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    return Split(images, torch.arange(n))


def _batches(loader: DeviceLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch))


def test_loader_covers_the_split_once_per_epoch() -> None:
    split = _toy_split()
    loader = DeviceLoader(split, 8, device="cpu", shuffle=True, seed=1)
    assert len(loader) == 5
    batches = _batches(loader, 0)
    assert [len(y) for _, y in batches] == [8, 8, 8, 8, 5]
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(37))
    assert labels.tolist() != list(range(37))
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, split.images[y].float() / 255)
    dropped = DeviceLoader(split, 8, device="cpu", shuffle=True, drop_last=True)
    assert len(dropped) == 4 and sum(len(y) for _, y in dropped.epoch(0)) == 32


def test_loader_without_shuffle_keeps_order() -> None:
    loader = DeviceLoader(_toy_split(), 10, device="cpu", shuffle=False)
    assert torch.cat([y for _, y in loader.epoch(3)]).tolist() == list(range(37))


def test_loader_replays_by_seed_and_epoch_only() -> None:
    split = _toy_split()
    options = dict(device="cpu", shuffle=True, crop_padding=2, flip=True, seed=7)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = _batches(DeviceLoader(split, 8, **options), 4)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    torch.manual_seed(123)
    replay = _batches(DeviceLoader(split, 8, **options), 4)
    for (x1, y1), (x2, y2) in zip(first, replay, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_epoch = torch.cat([y for _, y in DeviceLoader(split, 8, **options).epoch(5)])
    assert other_epoch.tolist() != torch.cat([y for _, y in first]).tolist()
    reseeded = DeviceLoader(split, 8, **{**options, "seed": 8})
    other_seed = torch.cat([y for _, y in reseeded.epoch(4)])
    assert other_seed.tolist() != torch.cat([y for _, y in first]).tolist()


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The image moved by (dy, dx) with zeros coming in, as a padded random crop makes it."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_loader_crop_and_flip_are_shifts_and_mirrors() -> None:
    split = _toy_split(n=64)
    loader = DeviceLoader(split, 64, device="cpu", shuffle=False, crop_padding=2, flip=True)
    ((x, y),) = loader.epoch(0)
    assert x.shape == (64, 2, 6, 6) and x.min() >= 0 and x.max() <= 1
    seen = set()
    for image, label in zip(x, y, strict=True):
        original = split.images[label].float() / 255
        matches = [
            (dy, dx, flipped)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            for flipped in (False, True)
            if torch.equal(image, _shifted(original.flip(2) if flipped else original, dy, dx))
        ]
        assert matches, "every output is a shifted (and maybe mirrored) copy of its input"
        seen.update(matches)
    assert len(seen) > 10  # shifts and flips vary across the batch


def test_loader_flip_mirrors_about_half() -> None:
    split = _toy_split(n=64)
    loader = DeviceLoader(split, 32, device="cpu", shuffle=True, flip=True, seed=3)
    flipped = 0
    for x, y in loader.epoch(0):
        original = split.images[y].float() / 255
        mirrored = torch.flip(original, dims=[3])
        is_flipped = (x == mirrored).flatten(1).all(1)
        is_same = (x == original).flatten(1).all(1)
        assert torch.all(is_flipped ^ is_same)
        flipped += int(is_flipped.sum())
    assert 16 <= flipped <= 48


def test_loader_channels_last() -> None:
    loader = DeviceLoader(_toy_split(), 8, device="cpu", shuffle=True, channels_last=True)
    x, _ = next(iter(loader.epoch(0)))
    assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_loader_batches_do_not_depend_on_the_device() -> None:
    split = _toy_split()
    options = dict(shuffle=True, crop_padding=2, flip=True, seed=5)
    cpu = _batches(DeviceLoader(split, 8, device="cpu", **options), 1)
    gpu = _batches(DeviceLoader(split, 8, device="cuda", **options), 1)
    for (x1, y1), (x2, y2) in zip(cpu, gpu, strict=True):
        assert x2.is_cuda and torch.equal(x1, x2.cpu()) and torch.equal(y1, y2.cpu())
