"""`samat data check NAME ROOT` and `samat data download NAME ROOT`.

`check` tells whether a data set lies under ROOT where samat (samat/data.py) reads it, before a job
is queued on compute nodes that never download anything; `download` fetches it where the internet
is reachable (a login node). ROOT is the folder that holds the extracted data set (what the run
configs call `data.root`) or the extracted folder itself, as samat/data.py accepts both.

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

The image counts are reported, not required to be the official ones (50,000 / 10,000 for CIFAR,
100,000 / 10,000 for Tiny-ImageNet, 5 x 10,000 per corruption): a file that loads is whole, and
the counts are in the "complete:" line for the user to see.

Exit statuses: check: 0 complete, 1 incomplete (each missing piece on its own line, then the fix).
download: 0 complete (downloaded, or already there), 1 no automatic download exists (Tiny-ImageNet,
CIFAR-C: the official URL, its MD5 and the extraction command are printed), 2 the download failed
(offline, unreachable, unwritable ROOT, corrupt archive): one line naming the problem and the fix.
"""

from __future__ import annotations

import pickle
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


@dataclass(frozen=True)
class Source:
    """Where a data set comes from and the folder its archive extracts to."""

    title: str
    folder: str
    url: str
    md5: str
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
}
NAMES = tuple(SOURCES)
# The file whose presence in ROOT itself means that ROOT is the extracted folder (as in data.py).
_MARKERS = {
    "cifar10": "data_batch_1",
    "cifar100": "train",
    "tinyimagenet": "wnids.txt",
    "cifar10c": "labels.npy",
    "cifar100c": "labels.npy",
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
    if root.name == source.folder or (root / _MARKERS[name]).is_file():
        return root
    return root / source.folder


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
    return _inspect_corruptions(name, root)


def fix(name: str, root: str | Path) -> str:
    """One line: how to get `name` into `root`."""
    target = _extract_root(name, Path(root))
    if name in ("cifar10", "cifar100"):
        return (
            f'run "samat data download {name} {target}" where the internet is reachable (a login '
            f"node, not a compute node), or {_manual(name, root)}"
        )
    return _manual(name, root)


def _manual(name: str, root: str | Path) -> str:
    source = _source(name)
    command = source.extract.format(archive=source.archive, root=_extract_root(name, Path(root)))
    return f'download {source.url} (MD5 {source.md5}) and extract it with "{command}"'


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise ConfigError(f"data set {name!r} is unknown; use one of: {', '.join(NAMES)}")
    return SOURCES[name]


def _extract_root(name: str, root: Path) -> Path:
    """The folder that the archive is extracted into (the parent of the data set's folder)."""
    return root.absolute().parent if dataset_dir(name, root) == root else root


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

    try:
        # CIFAR's own distribution format; read only from the user's data root, as data.py does.
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
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


# --- the commands -------------------------------------------------------------------------------


_NAME = click.argument("name", type=click.Choice(NAMES))
_ROOT = click.argument("root", type=click.Path(file_okay=False, path_type=Path))


@click.group("data")
def data() -> None:
    """Check that a data set is where samat reads it, or download it (login nodes only)."""


@data.command("check")
@_NAME
@_ROOT
def check_command(name: str, root: Path) -> None:
    """Say whether NAME under ROOT is complete; list what is missing and the fix (exit 1)."""
    found = report(name, root)
    if not found.problems:
        click.echo(f"complete: {name} in {found.directory}: {found.summary}")
        return
    click.echo(f"incomplete: {name} in {found.directory}:")
    for problem in found.problems:
        click.echo(f"  {problem}")
    click.echo(f"fix: {fix(name, root)}")
    sys.exit(EXIT_INCOMPLETE)


@data.command("download")
@_NAME
@_ROOT
def download_command(name: str, root: Path) -> None:
    """Download NAME into ROOT (CIFAR-10/100 through torchvision); else print how (exit 1)."""
    found = report(name, root)
    if not found.problems:
        click.echo(f"complete: {name} in {found.directory}: {found.summary}; nothing to download")
        return
    source = SOURCES[name]
    if name not in ("cifar10", "cifar100"):
        target = _extract_root(name, root)
        click.echo(f"{source.title} has no automatic download; fetch it by hand:")
        click.echo(f"  curl -L -o {source.archive} {source.url}")
        click.echo(f"  echo '{source.md5}  {source.archive}' | md5sum -c")
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
    """torchvision's CIFAR downloader: fetch, verify the MD5, extract into `target`."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    target.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        # The archive holds both splits; the train split's constructor verifies all files.
        cls(str(target), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)
