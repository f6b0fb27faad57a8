"""`samat data check NAME ROOT` and `samat data download NAME ROOT`.

`check` tells whether a data set lies under ROOT where samat reads it (samat/data.py,
samat/segmentation/data.py, samat/text/data.py), before a job is queued on compute nodes that never
download anything; `download` fetches it where the internet is reachable (a login node). ROOT is
the folder that holds the extracted data set (what the run configs call `data.root`) or the
extracted folder itself, as the loaders accept both.

What `check` verifies, per data set (it never decodes images nor hashes files, so it takes seconds):

- cifar10 / cifar100: the pickles samat reads (`cifar-10-batches-py/data_batch_1..5, test_batch`;
  `cifar-100-python/train, test`) exist and unpickle to CIFAR batches: a uint8 `data` array of
  rows of 3 x 32 x 32 values and one label in range per row. `batches.meta` / `meta` are not
  required: samat does not read them.
- tinyimagenet: `tiny-imagenet-200/wnids.txt` lists classes, each class has
  `train/<wnid>/images/*.JPEG`, every line of `val/val_annotations.txt` names a class of wnids.txt
  and an existing `val/images/<file>`. A valid samat cache (`ROOT/samat-cache-tinyimagenet
  .safetensors`, written by the first run) is complete on its own, since samat then reads only it.
- cifar10c / cifar100c: `CIFAR-10-C/` (`CIFAR-100-C/`) holds `labels.npy` (1-D integers in range)
  and one `<corruption>.npy` per each of the 15 corruptions of CORRUPTIONS, each uint8
  [N, 32, 32, 3] with N the length of labels.npy and a multiple of the 5 severities. Shapes are
  read from the .npy headers (np.load with mmap_mode="r"), so a truncated file fails too.
- stanford_background: `iccv09Data/images/*.jpg` holds images and each has its
  `iccv09Data/labels/<stem>.regions.txt` (the `.surfaces.txt` files are not read). ROOT may be
  `iccv09Data/` itself. samat's cache there does not replace the files: its key is the image list.
- voc2012: `VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt` list images, and each listed
  stem has `JPEGImages/<stem>.jpg` and `SegmentationClass/<stem>.png`. ROOT may also be
  `VOCdevkit/` or `VOC2012/` itself. Unlisted files (the detection-only JPEGs) are not checked.
- rotten_tomatoes: the release's `rt-polaritydata/rt-polarity.pos` and `rt-polarity.neg` (ROOT
  may be `rt-polaritydata/` itself), with as many lines in each, or else, as samat/text/data.py
  looks for them, Hugging Face exports of the three splits in ROOT (or ROOT/data):
  `{train,validation,test}.csv`, then `.jsonl`, then `.parquet`, read as the loader reads them
  (text files only: these are small) and each with at least one row.

Images are never decoded (for the segmentation sets only existence and pairing are checked): a
file of zero bytes counts as broken, any other as whole. Each missing or broken file is listed on
its own line, at most MAX_LISTED per folder, then one line "and N more under FOLDER".

The image counts are reported, not required to be the official ones (50,000 / 10,000 for CIFAR,
100,000 / 10,000 for Tiny-ImageNet, 5 x 10,000 per corruption, 572 / 143 for Stanford Background's
fixed split, 1,464 / 1,449 for VOC2012, 8,530 / 1,066 / 1,066 sentences for Rotten Tomatoes): a
file that loads is whole, and the counts are in the "complete:" line for the user to see.

Exit statuses: check: 0 complete, 1 incomplete (each missing piece on its own line, then the fix).
download: 0 complete (downloaded, or already there), 1 no automatic download exists (Tiny-ImageNet,
CIFAR-C, Stanford Background, Rotten Tomatoes: the official URL, its MD5 or "no published
checksum", and the extraction command are printed), 2 the download failed (offline, unreachable,
unwritable ROOT, corrupt archive): one line naming the problem and the fix. CIFAR-10/100 download
through torchvision's dataset classes, VOC2012 through torchvision's archive downloader; both
verify the archive's MD5, extract it into the folder above the data set's and keep the archive.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from samat.attacks.kinds import CORRUPTION_NAMES
from samat.config import ConfigError

# the 15 released CIFAR-10-C / CIFAR-100-C files (torch-free list shared with the evaluation)
CORRUPTIONS = CORRUPTION_NAMES
SEVERITIES = 5
EXIT_INCOMPLETE = 1
EXIT_ERROR = 2
# Seconds a stalled connection may wait before the download gives up (rather than hang a shell).
DOWNLOAD_TIMEOUT = 60
# How many missing or broken files of one folder are listed, each on its own line, before the rest
# are counted in one line.
MAX_LISTED = 5
NO_CHECKSUM = "no published checksum"


@dataclass(frozen=True)
class Source:
    """Where a data set comes from and the folder its archive extracts to."""

    title: str
    folder: str
    url: str
    md5: str | None  # None: no checksum is published for the archive
    extract: str  # shell command, {archive} and {root} filled in

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[1]


SOURCES = {
    "cifar10": Source(
        "CIFAR-10",
        "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "tar -xzf {archive} -C {root}",
    ),
    "cifar100": Source(
        "CIFAR-100",
        "cifar-100-python",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "tar -xzf {archive} -C {root}",
    ),
    "tinyimagenet": Source(
        "Tiny-ImageNet",
        "tiny-imagenet-200",
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        "90528d7ca1a48142e341f4ef8d21d0de",
        "unzip -q {archive} -d {root}",
    ),
    "cifar10c": Source(
        "CIFAR-10-C",
        "CIFAR-10-C",
        "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar",
        "56bf5dcef84df0e2308c6dcbcbbd8499",
        "tar -xf {archive} -C {root}",
    ),
    "cifar100c": Source(
        "CIFAR-100-C",
        "CIFAR-100-C",
        "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar",
        "11f0ed0f1191edbf9fa23466ae6021d3",
        "tar -xf {archive} -C {root}",
    ),
    "stanford_background": Source(
        "Stanford Background",
        "iccv09Data",
        "http://dags.stanford.edu/data/iccv09Data.tar.gz",
        None,
        "tar -xzf {archive} -C {root}",
    ),
    "voc2012": Source(
        "PASCAL VOC2012",
        "VOCdevkit/VOC2012",
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        "6cd6e144f989b92b3379bac3b3de84fd",  # torchvision's
        "tar -xf {archive} -C {root}",
    ),
    "rotten_tomatoes": Source(
        "Rotten Tomatoes",
        "rt-polaritydata",
        "http://www.cs.cornell.edu/people/pabo/movie-review-data/rt-polaritydata.tar.gz",
        None,
        "tar -xzf {archive} -C {root}",
    ),
}
NAMES = tuple(SOURCES)
# Those that `download` fetches itself (the others print how to).
AUTOMATIC = ("cifar10", "cifar100", "voc2012")
# The files (folders: ending in "/") whose presence in ROOT itself means that ROOT is the extracted
# folder, as the loaders decide. VOC2012's two-level folder is resolved by _voc_dir.
_MARKERS = {
    "cifar10": ("data_batch_1",),
    "cifar100": ("train",),
    "tinyimagenet": ("wnids.txt",),
    "cifar10c": ("labels.npy",),
    "cifar100c": ("labels.npy",),
    "stanford_background": ("images/",),
    "rotten_tomatoes": ("rt-polarity.pos", "rt-polarity.neg"),
}
_CLASSES = {"cifar10": 10, "cifar100": 100, "cifar10c": 10, "cifar100c": 100}


@dataclass
class Report:
    """What `report` found: the folder it looked in, what is missing or broken, the counts."""

    directory: Path
    problems: list[str]
    summary: str = ""


def dataset_dir(name: str, root: str | Path) -> Path:
    """The extracted folder of `name` under `root`, or `root` itself when it is that folder."""
    source = _source(name)
    root = Path(root)
    if name == "voc2012":
        return _voc_dir(root)
    if root.name == source.folder or any(_holds(root, m) for m in _MARKERS[name]):
        return root
    return root / source.folder


def _holds(root: Path, marker: str) -> bool:
    return (root / marker).is_dir() if marker.endswith("/") else (root / marker).is_file()


def check(name: str, root: str | Path) -> list[str]:
    """What is missing or broken for samat to read `name` from `root`; empty when complete."""
    return report(name, root).problems


def report(name: str, root: str | Path) -> Report:
    """Check `name` under `root`: the problems (one line each) and, when complete, the counts."""
    source = _source(name)
    root = Path(root)
    if not root.is_dir():
        return Report(root / source.folder, [f"{root}: no such directory"])
    if name in ("cifar10", "cifar100"):
        return _inspect_cifar(name, root)
    if name == "tinyimagenet":
        return _inspect_tinyimagenet(root)
    if name == "stanford_background":
        return _inspect_stanford(root)
    if name == "voc2012":
        return _inspect_voc(root)
    if name == "rotten_tomatoes":
        return _inspect_rotten_tomatoes(root)
    return _inspect_corruptions(name, root)


def fix(name: str, root: str | Path) -> str:
    """One line: how to get `name` into `root`."""
    target = _extract_root(name, Path(root))
    if name in AUTOMATIC:
        return (
            f'run "samat data download {name} {target}" where the internet is reachable (a login '
            f"node, not a compute node), or {_manual(name, root)}"
        )
    if name == "rotten_tomatoes":
        return (
            f"{_manual(name, root)}, or export Hugging Face's rotten_tomatoes train, validation "
            f"and test splits as .csv or .jsonl into {root}"
        )
    return _manual(name, root)


def _manual(name: str, root: str | Path) -> str:
    source = _source(name)
    command = source.extract.format(archive=source.archive, root=_extract_root(name, Path(root)))
    return f'download {source.url} ({_checksum(source)}) and extract it with "{command}"'


def _checksum(source: Source) -> str:
    return f"MD5 {source.md5}" if source.md5 else NO_CHECKSUM


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise ConfigError(f"data set {name!r} is unknown; use one of: {', '.join(NAMES)}")
    return SOURCES[name]


def _extract_root(name: str, root: Path) -> Path:
    """The folder that the archive is extracted into (the one above the data set's folder)."""
    base = dataset_dir(name, root)
    # How many levels of the archive's folder ROOT lies inside: 0 when ROOT holds the folder.
    inside = len(Path(_source(name).folder).parts) - len(base.relative_to(root).parts)
    return root.absolute().parents[inside - 1] if inside > 0 else root


def _missing(path: Path) -> str:
    return f"{path}: missing"


# --- CIFAR-10 / CIFAR-100 -----------------------------------------------------------------------


def _inspect_cifar(name: str, root: Path) -> Report:
    from samat.data import CIFAR_LAYOUT

    _, _, train_files, test_file, label_key, num_classes = CIFAR_LAYOUT[name]
    base = dataset_dir(name, root)
    problems: list[str] = []
    counts = {"train": 0, "test": 0}
    for split, files in (("train", train_files), ("test", [test_file])):
        for file in files:
            path = base / file
            if not path.is_file():
                problems.append(_missing(path))
                continue
            try:
                counts[split] += _cifar_batch(path, label_key, num_classes)
            except ValueError as error:
                problems.append(f"{path}: {error}")
    summary = f"{counts['train']} train and {counts['test']} test images, {num_classes} classes"
    return Report(base, problems, summary)


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> int:
    """The number of images in one CIFAR pickle; ValueError saying what is wrong with it."""
    import numpy as np

    from samat.safepickle import NotACifarBatch, load_cifar_batch

    try:
        # CIFAR's own distribution format, read as data.py reads it: arrays only, no code
        batch = load_cifar_batch(path)
    except NotACifarBatch as error:
        raise ValueError(f"not a CIFAR batch: it {error}; replace it") from None
    except Exception:
        raise ValueError("unreadable (truncated, or not a CIFAR pickle); re-extract it") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = ", ".join(k.decode() if isinstance(k, bytes) else str(k) for k in batch or {})
        raise ValueError(
            f"has no data/{label_key.decode()} entries (has: {keys or 'none'}); "
            "is it the other CIFAR?"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"data is {data.dtype} {list(data.shape)}, expected uint8 [N, 3072]")
    if labels.shape != (len(data),):
        raise ValueError(f"{labels.size} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}; is it the other CIFAR?")
    return len(data)


# --- Tiny-ImageNet ------------------------------------------------------------------------------


def _inspect_tinyimagenet(root: Path) -> Report:
    cached = _tiny_cache(root)
    if isinstance(cached, Report):
        return cached
    base = dataset_dir("tinyimagenet", root)
    problems = [] if cached is None else [cached]
    wnids_file = base / "wnids.txt"
    annotations = base / "val" / "val_annotations.txt"
    wnids: list[str] = []
    train = 0
    if not wnids_file.is_file():
        problems.append(_missing(wnids_file))
    else:
        wnids = sorted(wnids_file.read_text().split())
        if not wnids:
            problems.append(f"{wnids_file}: lists no classes; re-extract it")
        empty = []
        for wnid in wnids:
            count = sum(1 for _ in (base / "train" / wnid / "images").glob("*.JPEG"))
            train += count
            if not count:
                empty.append(wnid)
        if empty:
            problems.append(
                f"{base / 'train' / '<wnid>' / 'images'}/*.JPEG: missing for {len(empty)} of "
                f"{len(wnids)} classes ({_first(empty)})"
            )
    test = 0
    if not annotations.is_file():
        problems.append(_missing(annotations))
    else:
        known = set(wnids)
        absent, unknown, malformed = [], [], []
        for number, line in enumerate(annotations.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                malformed.append(str(number))
                continue
            test += 1
            if wnids and fields[1] not in known:
                unknown.append(fields[1])
            if not (base / "val" / "images" / fields[0]).is_file():
                absent.append(fields[0])
        if malformed:
            problems.append(f"{annotations}: lines {_first(malformed)} lack a tab-separated class")
        if unknown:
            problems.append(f"{annotations}: classes not in wnids.txt ({_first(sorted(unknown))})")
        if absent:
            problems.append(
                f"{base / 'val' / 'images'}: {len(absent)} of the {test} images listed in "
                f"val_annotations.txt are missing ({_first(absent)})"
            )
    summary = f"{train} train and {test} validation images, {len(wnids)} classes"
    return Report(base, problems, summary)


def _tiny_cache(root: Path) -> Report | str | None:
    """A complete Report when samat's cache is valid, a problem line when it is broken."""
    from samat.data import TINY_CACHE, TINY_CACHE_VERSION

    cache = root / TINY_CACHE
    if not cache.is_file():
        return None
    from safetensors import safe_open

    keys = ("train_images", "train_labels", "test_images", "test_labels")
    try:
        with safe_open(cache, framework="numpy") as f:
            meta = f.metadata() or {}
            shapes = {key: f.get_slice(key).get_shape() for key in keys}
    except Exception:
        # data.py would fail on it rather than decode the images again
        return f"{cache}: unreadable samat cache; delete it"
    if meta.get("version") != TINY_CACHE_VERSION:
        return None  # stale: data.py decodes the images again, so those must be there
    summary = (
        f"{shapes['train_images'][0]} train and {shapes['test_images'][0]} validation images, "
        f"{meta.get('num_classes', '?')} classes, from samat's cache {cache.name}"
    )
    return Report(root, [], summary)


def _first(items: list[str], n: int = 3) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _file_problem(path: Path) -> str | None:
    """A problem line when `path` is missing or empty (never opened: nothing is decoded)."""
    if not path.is_file():
        return _missing(path)
    if path.stat().st_size == 0:
        return f"{path}: empty (0 bytes); re-extract it"
    return None


def _capped(lines: list[str], folder: Path) -> list[str]:
    """The first MAX_LISTED problem lines about files in `folder`, then how many more there are."""
    if len(lines) <= MAX_LISTED:
        return lines
    return [*lines[:MAX_LISTED], f"and {len(lines) - MAX_LISTED} more under {folder}"]


# --- CIFAR-10-C / CIFAR-100-C -------------------------------------------------------------------


def _inspect_corruptions(name: str, root: Path) -> Report:
    import numpy as np

    base = dataset_dir(name, root)
    num_classes = _CLASSES[name]
    problems: list[str] = []
    rows: int | None = None
    labels_file = base / "labels.npy"
    if not labels_file.is_file():
        problems.append(_missing(labels_file))
    else:
        try:
            labels = np.load(labels_file, mmap_mode="r")
        except (ValueError, OSError, EOFError):
            problems.append(f"{labels_file}: unreadable (truncated?); re-extract it")
        else:
            if labels.ndim != 1 or labels.dtype.kind not in "iu":
                problems.append(
                    f"{labels_file}: is {labels.dtype} {list(labels.shape)}, expected integers [N]"
                )
            elif len(labels) % SEVERITIES:
                problems.append(
                    f"{labels_file}: {len(labels)} labels, "
                    f"not a multiple of {SEVERITIES} severities"
                )
            elif len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                problems.append(f"{labels_file}: labels outside 0..{num_classes - 1}")
            else:
                rows = len(labels)
    for corruption in CORRUPTIONS:
        path = base / f"{corruption}.npy"
        if not path.is_file():
            problems.append(_missing(path))
            continue
        try:
            images = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError):
            problems.append(f"{path}: unreadable (truncated?); re-extract it")
            continue
        expected = f"uint8 [{rows if rows is not None else 'N'}, 32, 32, 3]"
        if (
            images.dtype != np.uint8
            or images.shape[1:] != (32, 32, 3)
            or (rows is not None and images.shape[0] != rows)
        ):
            problems.append(f"{path}: is {images.dtype} {list(images.shape)}, expected {expected}")
    per = (rows or 0) // SEVERITIES
    summary = f"{len(CORRUPTIONS)} corruptions x {SEVERITIES} severities x {per} images"
    return Report(base, problems, summary)


# --- Stanford Background ------------------------------------------------------------------------


def _inspect_stanford(root: Path) -> Report:
    from samat.segmentation.data import STANFORD_CLASSES, STANFORD_TEST_FRACTION

    base = dataset_dir("stanford_background", root)
    images, labels = base / "images", base / "labels"
    problems: list[str] = []
    stems: list[str] = []
    if not images.is_dir():
        problems.append(_missing(images))
    else:
        # As load_stanford_background lists them: every images/*.jpg is one image.
        stems = sorted(p.name.removesuffix(".jpg") for p in images.glob("*.jpg"))
        if not stems:
            problems.append(f"{images}: holds no *.jpg images; re-extract it")
        found = [_file_problem(images / f"{stem}.jpg") for stem in stems]
        problems += _capped([p for p in found if p], images)
    if not labels.is_dir():
        problems.append(_missing(labels))
    else:
        found = [_file_problem(labels / f"{stem}.regions.txt") for stem in stems]
        problems += _capped([p for p in found if p], labels)
    n_test = round(STANFORD_TEST_FRACTION * len(stems))
    summary = (
        f"{len(stems) - n_test} train and {n_test} test images (the fixed split of "
        f"{len(stems)}), {len(STANFORD_CLASSES)} classes"
    )
    return Report(base, problems, summary)


# --- PASCAL VOC2012 -----------------------------------------------------------------------------


_VOC_LISTS = Path("ImageSets") / "Segmentation"


def _voc_dir(root: Path) -> Path:
    """VOC2012/ under `root` as load_voc2012 finds it; else where it would be extracted."""
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    for candidate in candidates:
        if (candidate / _VOC_LISTS).is_dir():
            return candidate
    if root.name == "VOC2012":
        return root
    if root.name == "VOCdevkit":
        return root / "VOC2012"
    return candidates[-1]


def _inspect_voc(root: Path) -> Report:
    from samat.segmentation.data import VOC_CLASSES

    base = dataset_dir("voc2012", root)
    jpegs, pngs = base / "JPEGImages", base / "SegmentationClass"
    problems: list[str] = []
    counts: dict[str, int] = {}
    stems: dict[str, None] = {}  # every listed image once, in order
    for split in ("train", "val"):
        listed = base / _VOC_LISTS / f"{split}.txt"
        if not listed.is_file():
            problems.append(_missing(listed))
            continue
        names = listed.read_text().split()
        if not names:
            problems.append(f"{listed}: lists no images; re-extract it")
        counts[split] = len(names)
        stems.update(dict.fromkeys(names))
    for folder, suffix in ((jpegs, ".jpg"), (pngs, ".png")):
        if not folder.is_dir():
            problems.append(_missing(folder))
            continue
        found = [_file_problem(folder / f"{stem}{suffix}") for stem in stems]
        problems += _capped([p for p in found if p], folder)
    summary = (
        f"{counts.get('train', 0)} train and {counts.get('val', 0)} val images, "
        f"{len(VOC_CLASSES)} classes"
    )
    return Report(base, problems, summary)


# --- Rotten Tomatoes ----------------------------------------------------------------------------


def _inspect_rotten_tomatoes(root: Path) -> Report:
    from samat.text.data import RT_FILES, SPLITS, _split_file

    raw = dataset_dir("rotten_tomatoes", root)
    paths = {key: raw / file for key, file in RT_FILES.items()}
    if any(path.is_file() for path in paths.values()):
        return _inspect_rt_release(raw, paths)
    # No release: the loader then reads the first kind of export found, all three splits of it.
    for ext in ("csv", "jsonl", "parquet"):
        files = {split: _split_file(root, split, ext) for split in SPLITS}
        if any(files.values()):
            return _inspect_rt_export(root, ext, files)
    return Report(raw, [_missing(path) for path in paths.values()], "")


def _inspect_rt_release(raw: Path, paths: dict[str, Path]) -> Report:
    problems: list[str] = []
    lines: dict[str, int] = {}
    for key, path in paths.items():
        problem = _file_problem(path)
        if problem:
            problems.append(problem)
            continue
        # As the loader reads it: latin-1 (never fails), every line counts, blank ones too.
        with path.open(encoding="latin-1") as f:
            lines[key] = sum(1 for _ in f)
    if len(lines) == 2 and lines["pos"] != lines["neg"]:
        problems.append(
            f"{raw}: {lines['pos']} positive but {lines['neg']} negative lines; the release has "
            "5,331 of each, re-extract it"
        )
    n = lines.get("pos", 0)
    # The loader's split of each file (Python's int(x + 0.5), as the Hugging Face script).
    cut1, cut2 = int(n * 0.8 + 0.5), int(n * 0.9 + 0.5)
    summary = (
        f"{2 * cut1} train, {2 * (cut2 - cut1)} validation and {2 * (n - cut2)} test sentences, "
        "2 classes"
    )
    return Report(raw, problems, summary)


def _inspect_rt_export(root: Path, ext: str, files: dict[str, Path | None]) -> Report:
    from samat.text.data import _read_table

    problems: list[str] = []
    counts: dict[str, int] = {}
    for split, path in files.items():
        if path is None:
            problems.append(_missing(root / f"{split}.{ext}"))
            continue
        try:
            # Through the loader's own reader: what it cannot read, check reports.
            counts[split] = len(_read_table(path, ext))
        except ConfigError as error:  # names the file and the fix
            problems.append(str(error))
            continue
        except Exception as error:  # csv, json, decoding and pyarrow errors alike
            reason = " ".join(str(error).split())
            problems.append(f"{path}: unreadable ({reason}); export it again")
            continue
        if not counts[split]:
            problems.append(f"{path}: no rows; export it again")
    summary = (
        f"{counts.get('train', 0)} train, {counts.get('validation', 0)} validation and "
        f"{counts.get('test', 0)} test sentences, 2 classes, from the {ext} export"
    )
    return Report(root, problems, summary)


# --- the commands -------------------------------------------------------------------------------


# NAME's choices are listed in each command's help, wrapped between names (the usage line's
# "{cifar10|...}" would be cut inside one).
_NAME = click.argument("name", type=click.Choice(NAMES), metavar="NAME")
_NAMES_HELP = f"NAME is one of: {', '.join(NAMES)}."
_ROOT = click.argument("root", type=click.Path(file_okay=False, path_type=Path))


@click.group("data")
def data() -> None:
    """Check that a data set is where samat reads it, or download it (login nodes only)."""


@data.command(
    "check",
    help="Say whether NAME under ROOT is complete; list what is missing and the fix (exit 1)."
    f"\n\n{_NAMES_HELP}",
)
@_NAME
@_ROOT
def check_command(name: str, root: Path) -> None:
    """Say whether NAME under ROOT is complete (the help is the decorator's)."""
    found = report(name, root)
    if not found.problems:
        click.echo(f"complete: {name} in {found.directory}: {found.summary}")
        return
    click.echo(f"incomplete: {name} in {found.directory}:")
    for problem in found.problems:
        click.echo(f"  {problem}")
    click.echo(f"fix: {fix(name, root)}")
    sys.exit(EXIT_INCOMPLETE)


@data.command(
    "download",
    help="Download NAME into ROOT (CIFAR-10/100 and VOC2012, through torchvision); for the others "
    f"print how to (exit 1).\n\n{_NAMES_HELP}",
)
@_NAME
@_ROOT
def download_command(name: str, root: Path) -> None:
    """Download NAME into ROOT, or print how to (the help is the decorator's)."""
    found = report(name, root)
    if not found.problems:
        click.echo(f"complete: {name} in {found.directory}: {found.summary}; nothing to download")
        return
    source = SOURCES[name]
    if name not in AUTOMATIC:
        target = _extract_root(name, root)
        click.echo(f"{source.title} has no automatic download; fetch it by hand:")
        click.echo(f"  curl -L -o {source.archive} {source.url}")
        if source.md5:
            click.echo(f"  echo '{source.md5}  {source.archive}' | md5sum -c")
        else:
            click.echo(f"  ({NO_CHECKSUM}: the archive cannot be verified)")
        click.echo(f"  {source.extract.format(archive=source.archive, root=target)}")
        click.echo(f"then: samat data check {name} {target}")
        sys.exit(EXIT_INCOMPLETE)
    target = _extract_root(name, root)
    try:
        _torchvision_download(name, target)
    except (OSError, RuntimeError) as error:
        reason = " ".join(str(getattr(error, "reason", None) or error).split())
        click.echo(
            f"error: cannot download {source.title} from {source.url} into {target} ({reason}); "
            f"fix: run this where the internet is reachable and {target} is writable (a login "
            f"node), or {_manual(name, root)}",
            err=True,
        )
        sys.exit(EXIT_ERROR)
    found = report(name, root)
    if found.problems:  # pragma: no cover - torchvision verified the archive's MD5
        click.echo(f"downloaded, but still incomplete: {'; '.join(found.problems)}", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(f"complete: {name} in {found.directory}: {found.summary}")


def _torchvision_download(name: str, target: Path) -> None:
    """torchvision's downloaders: fetch, verify the MD5, extract into `target`."""
    from torchvision import datasets

    source = SOURCES[name]
    target.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        if name == "voc2012":
            # Not datasets.VOCSegmentation: it fetches from its own mirror, not source.url.
            datasets.utils.download_and_extract_archive(
                source.url, str(target), filename=source.archive, md5=source.md5
            )
        else:
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            # The archive holds both splits; the train split's constructor verifies all files.
            cls(str(target), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)
