"""Guards for samat.data found by mutation testing (docs/mutation.md): each test fails on a
change that the other tests let through, and says which."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import samat.data
from samat.config import ConfigError, DataConfig
from samat.data import Split, _decode, _write_cache, load_dataset, split_validation


def _split(n: int) -> Split:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    return Split(images, torch.arange(n))


def test_validation_must_leave_training_examples() -> None:
    """Kills: `size >= n` relaxed to `size > n` (a validation split of the whole set)."""
    with pytest.raises(
        ConfigError, match=r"^train\.validation\.size 8 leaves no training examples"
    ):
        split_validation(_split(8), 8)
    train, validation = split_validation(_split(8), 7)
    assert len(train.labels) == 1 and len(validation.labels) == 7


def test_the_validation_draw_ignores_the_global_seed() -> None:
    """Kills: the held-out draw taken from the global RNG instead of its fixed generator."""
    torch.manual_seed(1)
    first = split_validation(_split(50), 10)[1].labels
    torch.manual_seed(2)
    second = split_validation(_split(50), 10)[1].labels
    assert torch.equal(first, second)
    assert first.tolist() == sorted(first.tolist()) and first.tolist() != list(range(10))


def test_a_cache_write_goes_through_a_hidden_temp_file_in_the_root(tmp_path, monkeypatch) -> None:
    """Kills: the temp file created elsewhere or under another name, or left behind when the
    write fails."""
    seen: list[Path] = []

    def failing_save(tensors, path, metadata=None) -> None:
        seen.append(Path(path))
        Path(path).write_bytes(b"half a cache")
        raise OSError("disk full")

    monkeypatch.setattr(samat.data, "save_file", failing_save)
    cache = tmp_path / "cache.safetensors"
    _write_cache(cache, {"x": torch.zeros(1)}, {"version": "1"})
    (temp,) = seen
    assert temp.parent == tmp_path
    assert temp.name.startswith(".cache.safetensors.") and temp.name.endswith(".tmp")
    assert list(tmp_path.iterdir()) == [] and not cache.exists()


def test_a_cache_in_a_missing_folder_is_skipped(tmp_path) -> None:
    _write_cache(tmp_path / "absent" / "cache.safetensors", {"x": torch.zeros(1)}, {})
    assert list(tmp_path.iterdir()) == []


def _tiny(tmp_path: Path, *, annotations: bool = True, train: bool = True) -> Path:
    base = tmp_path / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("n01\n")
    if train:
        images = base / "train" / "n01" / "images"
        images.mkdir(parents=True)
        Image.new("RGB", (64, 64), (9, 9, 9)).save(images / "a.JPEG", "JPEG")
    if annotations:
        Image.new("RGB", (64, 64), (9, 9, 9)).save(base / "val" / "images" / "v.JPEG", "JPEG")
        (base / "val" / "val_annotations.txt").write_text("v.JPEG\tn01\t0\t0\t63\t63\n")
    return tmp_path


def test_tinyimagenet_without_annotations_names_what_is_missing(tmp_path) -> None:
    """Kills: `or` -> `and` in the check for wnids.txt and val_annotations.txt."""
    root = _tiny(tmp_path, annotations=False)
    with pytest.raises(ConfigError) as error:
        load_dataset(DataConfig(name="tinyimagenet", root=root))
    assert str(error.value) == (
        f"data.root {root}: no Tiny-ImageNet found (expected tiny-imagenet-200/wnids.txt and "
        "tiny-imagenet-200/val/val_annotations.txt); download Tiny-ImageNet there or fix data.root"
    )


def test_tinyimagenet_without_training_images_says_where_they_go(tmp_path) -> None:
    root = _tiny(tmp_path, train=False)
    with pytest.raises(ConfigError) as error:
        load_dataset(DataConfig(name="tinyimagenet", root=root))
    assert str(error.value) == (
        f"data.root {root}: no Tiny-ImageNet found (expected "
        "tiny-imagenet-200/train/<wnid>/images/*.JPEG); download Tiny-ImageNet there or fix "
        "data.root"
    )


def test_tinyimagenet_unknown_validation_class_is_named(tmp_path) -> None:
    root = _tiny(tmp_path)
    annotations = root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text("v.JPEG\tn09\t0\t0\t63\t63\n")
    with pytest.raises(ConfigError, match=r"val_annotations\.txt: class n09 is not in wnids"):
        load_dataset(DataConfig(name="tinyimagenet", root=root))


def test_decode_names_a_missing_or_misshapen_image(tmp_path) -> None:
    """Kills: the error messages of _decode lost or their width and height swapped."""
    missing = tmp_path / "gone.JPEG"
    with pytest.raises(ConfigError, match=r"gone\.JPEG: listed in Tiny-ImageNet but missing"):
        _decode([(missing, 0)])
    wide = tmp_path / "wide.JPEG"
    Image.new("RGB", (64, 32), (0, 0, 0)).save(wide, "JPEG")
    with pytest.raises(ConfigError, match=r"wide\.JPEG: expected a 64x64 image, got 64x32; re-"):
        _decode([(wide, 0)])


def test_split_names_the_wrong_shape_or_dtype() -> None:
    """Kills: a 3-D uint8 image tensor, or int64 labels of the wrong length, accepted (`or`
    read as `and`); the error without the shape it got."""
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(
        ValueError, match=r"^images must be uint8 \[N, C, H, W\], got torch.uint8 \[2, 3, 4\]$"
    ):
        Split(torch.zeros(2, 3, 4, dtype=torch.uint8), labels)
    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^labels must be int64 \[2\], got torch.int64 \[3\]$"):
        Split(images, torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("key", ["train_size", "test_size"])
def test_a_subset_larger_than_the_data_set_names_key_and_data_set(key: str) -> None:
    """Kills: the size check refusing a subset of exactly the whole split; the error naming
    another key or no data set."""
    part = key.removesuffix("_size")
    n = len(getattr(load_dataset(DataConfig(name="digits")), part).labels)
    exact = load_dataset(DataConfig(name="digits", **{key: n}))
    assert len(getattr(exact, part).labels) == n
    with pytest.raises(
        ConfigError,
        match=rf"^data.{key} {n + 1} exceeds the {n} examples of digits; lower data.{key}$",
    ):
        load_dataset(DataConfig(name="digits", **{key: n + 1}))


def test_loader_batches_are_plain_nchw_unless_asked() -> None:
    """Kills: channels_last on by default (evaluation loaders would hand out channels-last
    batches the model was not converted for)."""
    split = Split(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    images, _ = next(iter(samat.data.DeviceLoader(split, 4, device="cpu", shuffle=False).epoch(0)))
    assert images.is_contiguous()
