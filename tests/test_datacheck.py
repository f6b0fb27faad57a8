"""Tests for samat.datacheck: `samat data check|download` on tiny files in each real layout."""

from __future__ import annotations

import pickle
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torchvision
from click.testing import CliRunner
from PIL import Image

from samat import datacheck
from samat.config import ConfigError, DataConfig
from samat.data import TINY_CACHE, load_dataset
from samat.datacheck import CORRUPTIONS, check, data, dataset_dir, report
from samat.segmentation.data import load_stanford_background, load_voc2012
from samat.segmentation.generate import generate_stanford, generate_voc
from samat.text.data import generate_rotten_tomatoes, load_rotten_tomatoes

CIFAR = {
    # name -> (folder, training files, test file, label key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
}


def _pickle(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def make_cifar(root: Path, name: str, per_file: int = 10, *, seed: int = 0) -> Path:
    """CIFAR's python layout: pickled dicts with bytes keys, data uint8 [N, 3072], labels."""
    folder, train_files, test_file, label_key, classes = CIFAR[name]
    base = root / folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for file in [*train_files, test_file]:
        batch = {
            b"batch_label": file.encode(),
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, per_file).tolist(),
            b"filenames": [f"{i}.png".encode() for i in range(per_file)],
        }
        if name == "cifar100":
            batch[b"coarse_labels"] = rng.integers(0, 20, per_file).tolist()
        _pickle(base / file, batch)
    meta = "batches.meta" if name == "cifar10" else "meta"
    _pickle(base / meta, {b"label_names": [b"c%d" % i for i in range(classes)]})
    return base


def make_tinyimagenet(root: Path, wnids=("n01443537", "n01629819"), per_class: int = 2) -> Path:
    """Tiny-ImageNet's released layout with 64x64 JPEGs."""
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    rng = np.random.default_rng(0)

    def jpeg(path: Path) -> None:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)

    lines = []
    for c, wnid in enumerate(wnids):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(per_class):
            jpeg(images / f"{wnid}_{i}.JPEG")
            file = f"val_{c * per_class + i}.JPEG"
            jpeg(base / "val" / "images" / file)
            lines.append(f"{file}\t{wnid}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return base


def make_corruptions(root: Path, folder: str = "CIFAR-10-C", rows: int = 10, classes=10) -> Path:
    """CIFAR-10-C's layout: labels.npy and one uint8 [rows, 32, 32, 3] .npy per corruption."""
    base = root / folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(base / "labels.npy", np.tile(rng.integers(0, classes, rows // 5), 5).astype(np.uint8))
    for corruption in CORRUPTIONS:
        np.save(base / f"{corruption}.npy", rng.integers(0, 256, (rows, 32, 32, 3), np.uint8))
    return base


def run(*args: object) -> object:
    return CliRunner().invoke(data, [str(a) for a in args])


# --- check: CIFAR -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_complete_agrees_with_the_loader(tmp_path: Path, name: str) -> None:
    base = make_cifar(tmp_path, name)
    assert check(name, tmp_path) == []
    result = run("check", name, tmp_path)
    assert result.exit_code == 0, result.output
    train = 50 if name == "cifar10" else 10
    classes = CIFAR[name][4]
    assert result.output == (
        f"complete: {name} in {base}: {train} train and 10 test images, {classes} classes\n"
    )
    # What check calls complete, samat's loader reads.
    loaded = load_dataset(DataConfig(name=name, root=tmp_path))
    assert (len(loaded.train.labels), len(loaded.test.labels)) == (train, 10)


def test_root_may_be_the_extracted_folder_itself(tmp_path: Path) -> None:
    base = make_cifar(tmp_path, "cifar10")
    assert dataset_dir("cifar10", base) == base
    assert dataset_dir("cifar10", tmp_path) == base
    assert check("cifar10", base) == []
    assert report("cifar10", base).directory == base
    # Named like the folder but empty: the missing files are reported inside it, not below it.
    empty = tmp_path / "other" / "cifar-10-batches-py"
    empty.mkdir(parents=True)
    assert check("cifar10", empty)[0] == f"{empty / 'data_batch_1'}: missing"


def test_missing_cifar_file_is_named_with_the_fix(tmp_path: Path) -> None:
    base = make_cifar(tmp_path, "cifar10")
    (base / "data_batch_3").unlink()
    assert check("cifar10", tmp_path) == [f"{base / 'data_batch_3'}: missing"]
    result = run("check", "cifar10", tmp_path)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f"incomplete: cifar10 in {base}:"
    assert lines[1] == f"  {base / 'data_batch_3'}: missing"
    assert lines[2].startswith(f'fix: run "samat data download cifar10 {tmp_path}"')
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in lines[2]
    assert f"tar -xzf cifar-10-python.tar.gz -C {tmp_path}" in lines[2]
    assert len(lines) == 3


def test_cifar_meta_files_are_not_required(tmp_path: Path) -> None:
    # samat/data.py never reads batches.meta / meta, so check does not ask for them.
    base = make_cifar(tmp_path, "cifar10")
    (base / "batches.meta").unlink()
    assert check("cifar10", tmp_path) == []


def test_broken_cifar_pickles_are_reported(tmp_path: Path) -> None:
    base = make_cifar(tmp_path, "cifar10")
    full = (base / "data_batch_1").read_bytes()
    (base / "data_batch_1").write_bytes(full[: len(full) // 2])  # truncated download
    _pickle(base / "data_batch_2", {b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4})
    _pickle(base / "data_batch_4", {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3})
    _pickle(base / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]})
    problems = check("cifar10", tmp_path)
    assert problems == [
        f"{base / 'data_batch_1'}: unreadable (truncated, or not a CIFAR pickle); re-extract it",
        f"{base / 'data_batch_2'}: data is uint8 [4, 1024], expected uint8 [N, 3072]",
        f"{base / 'data_batch_4'}: 3 labels for 4 images",
        f"{base / 'test_batch'}: labels outside 0..9; is it the other CIFAR?",
    ]


def test_cifar10_pickles_are_not_cifar100(tmp_path: Path) -> None:
    base = make_cifar(tmp_path, "cifar10")
    # CIFAR-10's test batch copied where CIFAR-100's should be: no fine_labels.
    target = tmp_path / "cifar-100-python"
    target.mkdir()
    for file in ("train", "test"):
        (target / file).write_bytes((base / "test_batch").read_bytes())
    problems = check("cifar100", tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith(f"{target / 'train'}: has no data/fine_labels entries")
    assert "has: batch_label, data, labels, filenames" in problems[0]


def test_missing_root_and_unknown_name(tmp_path: Path) -> None:
    assert check("cifar10", tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'}: no such directory"]
    with pytest.raises(ConfigError, match="unknown; use one of: cifar10, cifar100, tinyimagenet"):
        check("imagenet", tmp_path)
    result = run("check", "imagenet", tmp_path)
    assert result.exit_code == 2 and "'imagenet' is not one of 'cifar10'" in result.output


# --- check: Tiny-ImageNet -----------------------------------------------------------------------


def test_tinyimagenet_complete_then_cache_alone(tmp_path: Path) -> None:
    base = make_tinyimagenet(tmp_path)
    assert check("tinyimagenet", tmp_path) == []
    result = run("check", "tinyimagenet", tmp_path)
    assert result.exit_code == 0
    assert result.output == (
        f"complete: tinyimagenet in {base}: 4 train and 4 validation images, 2 classes\n"
    )
    # samat's loader agrees, and writes its cache into data.root.
    loaded = load_dataset(DataConfig(name="tinyimagenet", root=tmp_path))
    assert len(loaded.train.labels) == 4 and len(loaded.test.labels) == 4
    assert (tmp_path / TINY_CACHE).is_file()
    # With a valid cache samat reads nothing else, so the extracted folder may go.
    (base / "wnids.txt").unlink()
    found = report("tinyimagenet", tmp_path)
    assert found.problems == []
    assert found.summary == (
        f"4 train and 4 validation images, 2 classes, from samat's cache {TINY_CACHE}"
    )
    # A corrupt cache would break the loader: reported, with the fix.
    (tmp_path / TINY_CACHE).write_bytes(b"garbage")
    assert check("tinyimagenet", tmp_path) == [
        f"{tmp_path / TINY_CACHE}: unreadable samat cache; delete it",
        f"{base / 'wnids.txt'}: missing",
    ]


def test_tinyimagenet_missing_pieces(tmp_path: Path) -> None:
    base = make_tinyimagenet(tmp_path, wnids=("n01", "n02", "n03", "n04", "n05"))
    for wnid in ("n02", "n03", "n04", "n05"):
        for image in (base / "train" / wnid / "images").iterdir():
            image.unlink()
    (base / "val" / "images" / "val_1.JPEG").unlink()
    with (base / "val" / "val_annotations.txt").open("a") as f:
        f.write("val_0.JPEG\tn99\t0\t0\t63\t63\nbroken line\n")
    problems = check("tinyimagenet", base)  # ROOT the extracted folder itself
    assert problems == [
        f"{base / 'train' / '<wnid>' / 'images'}/*.JPEG: missing for 4 of 5 classes "
        "(n02, n03, n04, ... (1 more))",
        f"{base / 'val' / 'val_annotations.txt'}: lines 12 lack a tab-separated class",
        f"{base / 'val' / 'val_annotations.txt'}: classes not in wnids.txt (n99)",
        f"{base / 'val' / 'images'}: 1 of the 11 images listed in val_annotations.txt are "
        "missing (val_1.JPEG)",
    ]
    (base / "wnids.txt").unlink()
    (base / "val" / "val_annotations.txt").unlink()
    result = run("check", "tinyimagenet", tmp_path)
    assert result.exit_code == 1
    assert f"  {base / 'wnids.txt'}: missing\n" in result.output
    assert f"  {base / 'val' / 'val_annotations.txt'}: missing\n" in result.output
    assert result.output.splitlines()[-1] == (
        "fix: download http://cs231n.stanford.edu/tiny-imagenet-200.zip "
        f'(MD5 90528d7ca1a48142e341f4ef8d21d0de) and extract it with "unzip -q '
        f'tiny-imagenet-200.zip -d {tmp_path}"'
    )


# --- check: CIFAR-10-C / CIFAR-100-C -------------------------------------------------------------


def test_corruptions_are_the_fifteen_of_the_benchmark() -> None:
    assert len(CORRUPTIONS) == 15 == len(set(CORRUPTIONS))
    assert {"gaussian_noise", "glass_blur", "fog", "elastic_transform", "jpeg_compression"} <= set(
        CORRUPTIONS
    )
    # The four extra corruptions of the release are not part of the benchmark.
    assert not {"speckle_noise", "gaussian_blur", "spatter", "saturate"} & set(CORRUPTIONS)


@pytest.mark.parametrize(
    ("name", "folder", "classes"),
    [("cifar10c", "CIFAR-10-C", 10), ("cifar100c", "CIFAR-100-C", 100)],
)
def test_cifar_c_complete(tmp_path: Path, name: str, folder: str, classes: int) -> None:
    base = make_corruptions(tmp_path, folder, rows=20, classes=classes)
    assert check(name, tmp_path) == []
    assert check(name, base) == []
    result = run("check", name, tmp_path)
    assert result.exit_code == 0
    assert (
        result.output == f"complete: {name} in {base}: 15 corruptions x 5 severities x 4 images\n"
    )


def test_cifar_c_missing_and_malformed_files(tmp_path: Path) -> None:
    base = make_corruptions(tmp_path)
    (base / "fog.npy").unlink()
    np.save(base / "snow.npy", np.zeros((10, 32, 32), np.uint8))
    np.save(base / "frost.npy", np.zeros((10, 32, 32, 3), np.float32))
    np.save(base / "pixelate.npy", np.zeros((15, 32, 32, 3), np.uint8))
    full = (base / "contrast.npy").read_bytes()
    (base / "contrast.npy").write_bytes(full[:-100])  # truncated download
    problems = check("cifar10c", tmp_path)
    assert problems == [
        f"{base / 'snow.npy'}: is uint8 [10, 32, 32], expected uint8 [10, 32, 32, 3]",
        f"{base / 'frost.npy'}: is float32 [10, 32, 32, 3], expected uint8 [10, 32, 32, 3]",
        f"{base / 'fog.npy'}: missing",
        f"{base / 'contrast.npy'}: unreadable (truncated?); re-extract it",
        f"{base / 'pixelate.npy'}: is uint8 [15, 32, 32, 3], expected uint8 [10, 32, 32, 3]",
    ]
    result = run("check", "cifar10c", tmp_path)
    assert result.exit_code == 1
    assert f"  {base / 'fog.npy'}: missing\n" in result.output
    assert "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar" in result.output
    assert f'"tar -xf CIFAR-10-C.tar -C {tmp_path}"' in result.output


def test_cifar_c_labels(tmp_path: Path) -> None:
    base = make_corruptions(tmp_path, "CIFAR-100-C", classes=100)
    assert check("cifar10c", base) == [f"{base / 'labels.npy'}: labels outside 0..9"]
    np.save(base / "labels.npy", np.zeros(12, np.int64))
    assert check("cifar100c", base)[0] == (
        f"{base / 'labels.npy'}: 12 labels, not a multiple of 5 severities"
    )
    np.save(base / "labels.npy", np.zeros((10, 1), np.int64))
    assert check("cifar100c", base)[0] == (
        f"{base / 'labels.npy'}: is int64 [10, 1], expected integers [N]"
    )
    (base / "labels.npy").unlink()
    assert check("cifar100c", base) == [f"{base / 'labels.npy'}: missing"]


def test_cifar_c_shapes_come_from_headers_without_reading_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make_corruptions(tmp_path)
    modes = []
    load = np.load

    def spy(path, *args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    assert check("cifar10c", base) == []
    assert modes == ["r"] * 16


# --- download -----------------------------------------------------------------------------------


def _offline_urlopen(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))


def _offline_archive(*args: object, **kwargs: object) -> None:
    raise OSError(101, "Network is unreachable")


def _corrupt_archive(*args: object, **kwargs: object) -> None:
    raise RuntimeError("File not found or corrupted.")


@pytest.mark.parametrize(
    ("target", "fake", "reason"),
    [
        (urllib.request, _offline_urlopen, "[Errno -3] Temporary failure in name resolution"),
        (torchvision.datasets.cifar, _offline_archive, "[Errno 101] Network is unreachable"),
        (torchvision.datasets.cifar, _corrupt_archive, "File not found or corrupted."),
    ],
)
def test_download_offline_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target, fake, reason: str
) -> None:
    attribute = "urlopen" if target is urllib.request else "download_and_extract_archive"
    monkeypatch.setattr(target, attribute, fake)
    result = run("download", "cifar10", tmp_path)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert result.stderr.startswith(
        f"error: cannot download CIFAR-10 from {url} into {tmp_path} ({reason}); fix: run this "
        "where the internet is reachable"
    )
    assert f'"tar -xzf cifar-10-python.tar.gz -C {tmp_path}"' in result.stderr


class FakeCIFAR:
    """Stands in for torchvision's CIFAR10/CIFAR100: records the call, extracts tiny files."""

    calls: ClassVar[list[tuple[str, bool, bool]]] = []
    name = "cifar10"

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        FakeCIFAR.calls.append((root, train, download))
        if download and not (Path(root) / CIFAR[self.name][0]).exists():
            make_cifar(Path(root), self.name)


@pytest.mark.parametrize(("name", "cls"), [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100")])
def test_download_uses_torchvision_into_the_parent_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, cls: str
) -> None:
    FakeCIFAR.calls = []
    monkeypatch.setattr(FakeCIFAR, "name", name)
    monkeypatch.setattr(torchvision.datasets, cls, FakeCIFAR)
    root = tmp_path / "new" / CIFAR[name][0]  # ROOT the data set's folder: extract to its parent
    result = run("download", name, root)
    assert result.exit_code == 0, result.output
    assert FakeCIFAR.calls == [(str(tmp_path / "new"), True, True)]
    train = 50 if name == "cifar10" else 10
    assert result.output.endswith(
        f"complete: {name} in {root}: {train} train and 10 test images, {CIFAR[name][4]} classes\n"
    )
    # Already complete: nothing is downloaded again.
    result = run("download", name, tmp_path / "new")
    assert result.exit_code == 0 and result.output.endswith("; nothing to download\n")
    assert len(FakeCIFAR.calls) == 1


@pytest.mark.parametrize(
    ("name", "archive", "extract"),
    [
        ("tinyimagenet", "tiny-imagenet-200.zip", "unzip -q tiny-imagenet-200.zip -d"),
        ("cifar10c", "CIFAR-10-C.tar", "tar -xf CIFAR-10-C.tar -C"),
        ("cifar100c", "CIFAR-100-C.tar", "tar -xf CIFAR-100-C.tar -C"),
    ],
)
def test_download_without_a_downloader_prints_the_official_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, archive: str, extract: str
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _offline_urlopen)  # nothing is fetched
    source = datacheck.SOURCES[name]
    result = run("download", name, tmp_path)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{source.title} has no automatic download; fetch it by hand:",
        f"  curl -L -o {archive} {source.url}",
        f"  echo '{source.md5}  {archive}' | md5sum -c",
        f"  {extract} {tmp_path}",
        f"then: samat data check {name} {tmp_path}",
    ]
    assert source.url.startswith(("http://cs231n.stanford.edu/", "https://zenodo.org/records/"))
    assert not list(tmp_path.iterdir())


def test_download_of_complete_cifar_c_says_so(tmp_path: Path) -> None:
    make_corruptions(tmp_path, "CIFAR-100-C", classes=100)
    result = run("download", "cifar100c", tmp_path)
    assert result.exit_code == 0 and result.output.endswith("; nothing to download\n")


# --- check: Stanford Background, VOC2012, Rotten Tomatoes ----------------------------------------


def test_stanford_complete_agrees_with_the_loader(tmp_path: Path) -> None:
    base = generate_stanford(tmp_path, n_images=5, size=16, seed=0)
    summary = "4 train and 1 test images (the fixed split of 5), 8 classes"
    result = run("check", "stanford_background", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output == f"complete: stanford_background in {base}: {summary}\n"
    assert report("stanford_background", base) == report("stanford_background", tmp_path)
    loaded = load_stanford_background(tmp_path, size=16)
    assert (len(loaded.train.images), len(loaded.test.images)) == (4, 1)


def test_stanford_missing_and_empty_labels_are_named(tmp_path: Path) -> None:
    base = generate_stanford(tmp_path, n_images=3, size=16, seed=0)
    labels = base / "labels"
    (labels / "0002000.regions.txt").unlink()
    (labels / "0003000.regions.txt").write_bytes(b"")  # an interrupted extraction
    # The geometric labels are not what samat reads: one of them missing does not matter.
    (labels / "0001000.surfaces.txt").unlink()
    assert check("stanford_background", tmp_path) == [
        f"{labels / '0002000.regions.txt'}: missing",
        f"{labels / '0003000.regions.txt'}: empty (0 bytes); re-extract it",
    ]
    result = run("check", "stanford_background", base)  # ROOT the extracted folder itself
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"incomplete: stanford_background in {base}:",
        f"  {labels / '0002000.regions.txt'}: missing",
        f"  {labels / '0003000.regions.txt'}: empty (0 bytes); re-extract it",
        "fix: download http://dags.stanford.edu/data/iccv09Data.tar.gz (no published checksum) "
        f'and extract it with "tar -xzf iccv09Data.tar.gz -C {tmp_path}"',
    ]


def test_stanford_without_images_or_labels(tmp_path: Path) -> None:
    base = generate_stanford(tmp_path, n_images=1, size=16, seed=0)
    shutil.rmtree(base / "labels")
    assert check("stanford_background", tmp_path) == [f"{base / 'labels'}: missing"]
    for image in (base / "images").iterdir():
        image.unlink()
    assert check("stanford_background", tmp_path) == [
        f"{base / 'images'}: holds no *.jpg images; re-extract it",
        f"{base / 'labels'}: missing",
    ]
    assert check("stanford_background", tmp_path / "empty") == [
        f"{tmp_path / 'empty'}: no such directory"
    ]


def test_long_lists_of_missing_files_are_capped(tmp_path: Path) -> None:
    base = generate_stanford(tmp_path, n_images=8, size=16, seed=0)
    for label in (base / "labels").glob("*.regions.txt"):
        label.unlink()
    problems = check("stanford_background", tmp_path)
    assert problems == [
        *(f"{base / 'labels' / f'{1000 * i:07d}.regions.txt'}: missing" for i in range(1, 6)),
        f"and 3 more under {base / 'labels'}",
    ]
    assert datacheck.MAX_LISTED == 5


def test_voc_complete_agrees_with_the_loader(tmp_path: Path) -> None:
    base = generate_voc(tmp_path, n_train=3, n_val=2, size=16, seed=0)
    result = run("check", "voc2012", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output == f"complete: voc2012 in {base}: 3 train and 2 val images, 21 classes\n"
    # ROOT may be the folder above VOCdevkit, VOCdevkit or VOC2012, as load_voc2012 accepts.
    for root in (tmp_path, base.parent, base):
        assert report("voc2012", root) == report("voc2012", tmp_path)
        assert datacheck._extract_root("voc2012", root) == tmp_path
    loaded = load_voc2012(tmp_path, size=16)
    assert (len(loaded.train.images), len(loaded.test.images)) == (3, 2)


def test_voc_listed_images_must_exist_in_pairs(tmp_path: Path) -> None:
    base = generate_voc(tmp_path, n_train=3, n_val=2, size=16, seed=0)
    (base / "JPEGImages" / "2008_000002.jpg").unlink()  # listed in train.txt
    (base / "SegmentationClass" / "2008_000005.png").write_bytes(b"")  # listed in val.txt
    (base / "JPEGImages" / "2008_999999.jpg").unlink()  # detection-only: not listed, not needed
    result = run("check", "voc2012", base.parent)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[:3] == [
        f"incomplete: voc2012 in {base}:",
        f"  {base / 'JPEGImages' / '2008_000002.jpg'}: missing",
        f"  {base / 'SegmentationClass' / '2008_000005.png'}: empty (0 bytes); re-extract it",
    ]
    assert lines[3].startswith(f'fix: run "samat data download voc2012 {tmp_path}"')
    assert "(MD5 6cd6e144f989b92b3379bac3b3de84fd)" in lines[3]
    assert lines[3].endswith(f'"tar -xf VOCtrainval_11-May-2012.tar -C {tmp_path}"')
    assert len(lines) == 4


def test_voc_lists_and_folders(tmp_path: Path) -> None:
    base = generate_voc(tmp_path, n_train=1, n_val=1, size=16, seed=0)
    lists = base / "ImageSets" / "Segmentation"
    (lists / "val.txt").unlink()
    (lists / "train.txt").write_text("\n")
    shutil.rmtree(base / "SegmentationClass")
    assert check("voc2012", tmp_path) == [
        f"{lists / 'train.txt'}: lists no images; re-extract it",
        f"{lists / 'val.txt'}: missing",
        f"{base / 'SegmentationClass'}: missing",
    ]


def test_segmentation_check_decodes_no_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    stanford = generate_stanford(tmp_path / "s", n_images=2, size=16, seed=0)
    voc = generate_voc(tmp_path / "v", n_train=1, n_val=1, size=16, seed=0)
    for image in [*(stanford / "images").iterdir(), *(voc / "JPEGImages").iterdir()]:
        image.write_bytes(b"not a JPEG")  # only a decoder would notice

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("check decoded an image")

    monkeypatch.setattr(Image, "open", refuse)
    assert check("stanford_background", tmp_path / "s") == []
    assert check("voc2012", tmp_path / "v") == []


def test_rotten_tomatoes_release_complete_agrees_with_the_loader(tmp_path: Path) -> None:
    generate_rotten_tomatoes(tmp_path, n=10, seed=0)
    base = tmp_path / "rt-polaritydata"
    summary = "16 train, 2 validation and 2 test sentences, 2 classes"
    result = run("check", "rotten_tomatoes", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output == f"complete: rotten_tomatoes in {base}: {summary}\n"
    assert report("rotten_tomatoes", base) == report("rotten_tomatoes", tmp_path)
    loaded = load_rotten_tomatoes(tmp_path)
    assert [len(loaded.train), len(loaded.validation), len(loaded.test)] == [16, 2, 2]


def test_rotten_tomatoes_missing_neg_is_named(tmp_path: Path) -> None:
    generate_rotten_tomatoes(tmp_path, n=10, seed=0)
    base = tmp_path / "rt-polaritydata"
    (base / "rt-polarity.neg").unlink()
    result = run("check", "rotten_tomatoes", tmp_path)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[:2] == [
        f"incomplete: rotten_tomatoes in {base}:",
        f"  {base / 'rt-polarity.neg'}: missing",
    ]
    assert lines[2] == (
        "fix: download http://www.cs.cornell.edu/people/pabo/movie-review-data/"
        "rt-polaritydata.tar.gz (no published checksum) and extract it with "
        f'"tar -xzf rt-polaritydata.tar.gz -C {tmp_path}", or export Hugging Face\'s '
        f"rotten_tomatoes train, validation and test splits as .csv or .jsonl into {tmp_path}"
    )
    assert len(lines) == 3
    # With no file of the release and no export, both files of the release are asked for.
    (base / "rt-polarity.pos").unlink()
    assert check("rotten_tomatoes", tmp_path) == [
        f"{base / 'rt-polarity.pos'}: missing",
        f"{base / 'rt-polarity.neg'}: missing",
    ]


def test_rotten_tomatoes_release_lines_must_pair(tmp_path: Path) -> None:
    generate_rotten_tomatoes(tmp_path, n=10, seed=0)
    base = tmp_path / "rt-polaritydata"
    with (base / "rt-polarity.pos").open("ab") as f:
        f.write(b"one more line \n")
    assert check("rotten_tomatoes", base) == [
        f"{base}: 11 positive but 10 negative lines; the release has 5,331 of each, re-extract it"
    ]
    (base / "rt-polarity.pos").write_bytes(b"")
    assert check("rotten_tomatoes", base) == [
        f"{base / 'rt-polarity.pos'}: empty (0 bytes); re-extract it"
    ]


@pytest.mark.parametrize("layout", ["csv", "jsonl"])
def test_rotten_tomatoes_exports(tmp_path: Path, layout: str) -> None:
    generate_rotten_tomatoes(tmp_path, n=10, seed=0, layout=layout)
    result = run("check", "rotten_tomatoes", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"complete: rotten_tomatoes in {tmp_path}: 16 train, 2 validation and 2 test sentences, "
        f"2 classes, from the {layout} export\n"
    )
    (tmp_path / f"test.{layout}").unlink()
    (tmp_path / f"validation.{layout}").write_bytes(b"")
    with (tmp_path / f"train.{layout}").open("a") as f:
        f.write("neither,7\n" if layout == "csv" else '{"text": "x", "label": 7}\n')
    problems = check("rotten_tomatoes", tmp_path)
    assert problems[0].startswith(f"{tmp_path / f'train.{layout}'}: label ")
    assert problems[1:] == [
        f"{tmp_path / f'validation.{layout}'}: no rows; export it again",
        f"{tmp_path / f'test.{layout}'}: missing",
    ]
    (tmp_path / f"train.{layout}").write_text("not,a\n" if layout == "csv" else "{broken\n")
    assert "train" in check("rotten_tomatoes", tmp_path)[0]
    assert len(check("rotten_tomatoes", tmp_path)) == 3


def test_help_lists_every_data_set() -> None:
    assert datacheck.NAMES[-3:] == ("stanford_background", "voc2012", "rotten_tomatoes")
    for command in ("check", "download"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert result.output.startswith(f"Usage: data {command} [OPTIONS] NAME ROOT\n")
        # Wrapped between names, never inside one.
        assert f"NAME is one of: {', '.join(datacheck.NAMES)}." in " ".join(result.output.split())
    result = run("check", "voc2011", ".")
    assert result.exit_code == 2 and "'stanford_background', 'voc2012', 'rotten_tomatoes'" in (
        result.output
    )


# --- download: Stanford Background, VOC2012, Rotten Tomatoes -------------------------------------


@pytest.mark.parametrize(
    ("name", "archive", "extract"),
    [
        ("stanford_background", "iccv09Data.tar.gz", "tar -xzf iccv09Data.tar.gz -C"),
        ("rotten_tomatoes", "rt-polaritydata.tar.gz", "tar -xzf rt-polaritydata.tar.gz -C"),
    ],
)
def test_download_without_a_checksum_prints_the_url_and_no_md5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, archive: str, extract: str
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _offline_urlopen)  # nothing is fetched
    source = datacheck.SOURCES[name]
    assert source.md5 is None
    result = run("download", name, tmp_path)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{source.title} has no automatic download; fetch it by hand:",
        f"  curl -L -o {archive} {source.url}",
        "  (no published checksum: the archive cannot be verified)",
        f"  {extract} {tmp_path}",
        f"then: samat data check {name} {tmp_path}",
    ]
    assert "MD5" not in result.output and "None" not in result.output
    assert not list(tmp_path.iterdir())


def test_download_of_complete_text_and_segmentation_sets_says_so(tmp_path: Path) -> None:
    generate_stanford(tmp_path, n_images=1, size=16, seed=0)
    generate_rotten_tomatoes(tmp_path, n=4, seed=0)
    for name in ("stanford_background", "rotten_tomatoes"):
        result = run("download", name, tmp_path)
        assert result.exit_code == 0 and result.output.endswith("; nothing to download\n")


def test_download_voc_fetches_the_official_archive_into_the_parent_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake(url: str, download_root: str, **kwargs: object) -> None:
        calls.append((url, download_root, kwargs))
        generate_voc(download_root, n_train=2, n_val=1, size=16, seed=0)

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake)
    root = tmp_path / "new" / "VOCdevkit"  # ROOT inside the archive's folder: extract above it
    result = run("download", "voc2012", root)
    assert result.exit_code == 0, result.output
    assert calls == [
        (
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            str(tmp_path / "new"),
            {"filename": "VOCtrainval_11-May-2012.tar", "md5": "6cd6e144f989b92b3379bac3b3de84fd"},
        )
    ]
    assert result.output == (
        f"complete: voc2012 in {root / 'VOC2012'}: 2 train and 1 val images, 21 classes\n"
    )
    result = run("download", "voc2012", tmp_path / "new")
    assert result.exit_code == 0 and result.output.endswith("; nothing to download\n")
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("target", "fake", "reason"),
    [
        (urllib.request, _offline_urlopen, "[Errno -3] Temporary failure in name resolution"),
        (torchvision.datasets.utils, _corrupt_archive, "File not found or corrupted."),
    ],
)
def test_download_voc_offline_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target, fake, reason: str
) -> None:
    attribute = "urlopen" if target is urllib.request else "download_and_extract_archive"
    monkeypatch.setattr(target, attribute, fake)
    result = run("download", "voc2012", tmp_path)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(
        "error: cannot download PASCAL VOC2012 from http://host.robots.ox.ac.uk/pascal/VOC/"
        f"voc2012/VOCtrainval_11-May-2012.tar into {tmp_path} ({reason}); fix: run this "
    )
    assert "(MD5 6cd6e144f989b92b3379bac3b3de84fd)" in result.stderr
    assert not list(tmp_path.iterdir())
