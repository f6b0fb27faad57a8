"""Rotten Tomatoes (Pang and Lee 2005) from staged files, tokenized into id/mask tensors.

Accepted under `data.root` (the first found wins):
1. the original release, `rt-polaritydata/rt-polarity.pos` and `rt-polarity.neg` (latin-1, one
   sentence per line; root may also be the `rt-polaritydata` folder itself). Split exactly as
   the Hugging Face `rotten_tomatoes` loading script splits it: the first round(0.8 n) lines of
   each file train, the next round(0.9 n) - round(0.8 n) validation, the rest test, positives
   first (8,530 / 1,066 / 1,066 for the 5,331 + 5,331 lines), stripped of surrounding spaces.
2. Hugging Face exports, one file per split, columns `text` and `label` (0 neg, 1 pos):
   `{train,validation,test}.csv` (`Dataset.to_csv`), `.jsonl` (`Dataset.to_json`, one object
   per line), or `.parquet` (the hub's files; needs pyarrow, which samat does not install).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samat.config import ConfigError

SPLITS = ("train", "validation", "test")
RT_FOLDER = "rt-polaritydata"
RT_FILES = {"pos": "rt-polarity.pos", "neg": "rt-polarity.neg"}
RT_SIZES = {"train": 8530, "validation": 1066, "test": 1066}  # the HF split of the full release
LABELS = ("neg", "pos")
DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class TextSplit:
    """Sentences and their labels (0 negative, 1 positive)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def examples(self) -> list[tuple[list[str], int]]:
        """(whitespace tokens, label) pairs, what the attacks take."""
        return [(t.split(), y) for t, y in zip(self.texts, self.labels, strict=True)]


@dataclass(frozen=True)
class TextDataset:
    train: TextSplit
    validation: TextSplit
    test: TextSplit
    source: str  # rt-polaritydata | csv | jsonl | parquet
    num_classes: int = 2


def load_rotten_tomatoes(root: str | os.PathLike[str]) -> TextDataset:
    """The three splits from whichever accepted layout `root` holds (see the module doc)."""
    root = Path(root)
    raw = root if (root / RT_FILES["pos"]).is_file() else root / RT_FOLDER
    if (raw / RT_FILES["pos"]).is_file() or (raw / RT_FILES["neg"]).is_file():
        return _from_release(raw)
    for ext in ("csv", "jsonl", "parquet"):
        files = {split: _split_file(root, split, ext) for split in SPLITS}
        if any(files.values()):
            missing = [f"{s}.{ext}" for s, f in files.items() if f is None]
            if missing:
                raise ConfigError(
                    f"data.root {root}: has Rotten Tomatoes {ext} files but not "
                    f"{', '.join(missing)}; export all three splits there"
                )
            splits = {split: _read_table(path, ext) for split, path in files.items()}
            return TextDataset(**splits, source=ext)
    raise ConfigError(
        f"data.root {root}: no Rotten Tomatoes found (expected {RT_FOLDER}/{RT_FILES['pos']} "
        f"and {RT_FILES['neg']}, or train/validation/test .csv/.jsonl/.parquet); stage it there "
        "or fix data.root"
    )


def _split_file(root: Path, split: str, ext: str) -> Path | None:
    for base in (root, root / "data"):
        exact = base / f"{split}.{ext}"
        if exact.is_file():
            return exact
        sharded = sorted(base.glob(f"{split}-*.{ext}"))
        if sharded:
            return sharded[0]
    return None


def _from_release(folder: Path) -> TextDataset:
    lines = {}
    for key, name in RT_FILES.items():
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"{path}: missing; extract rt-polaritydata.tar.gz again")
        # As the HF script reads it: latin-1, every line (blank ones too), stripped.
        with path.open(encoding="latin-1") as f:
            lines[key] = [line.strip() for line in f.readlines()]
    if len(lines["pos"]) != len(lines["neg"]):
        raise ConfigError(
            f"{folder}: {len(lines['pos'])} positive but {len(lines['neg'])} negative lines; "
            "the release has 5,331 of each, extract it again"
        )
    n = len(lines["pos"])
    # Python's int(x + 0.5), not round(): the HF script's rounding.
    cut1, cut2 = int(n * 0.8 + 0.5), int(n * 0.9 + 0.5)
    parts = {}
    for split, (lo, hi) in zip(SPLITS, [(0, cut1), (cut1, cut2), (cut2, n)], strict=True):
        texts = lines["pos"][lo:hi] + lines["neg"][lo:hi]
        labels = [1] * (hi - lo) + [0] * (hi - lo)
        parts[split] = TextSplit(tuple(texts), tuple(labels))
    return TextDataset(**parts, source=RT_FOLDER)


def _label(value: Any, path: Path) -> int:
    if isinstance(value, str) and value.strip() in LABELS:
        return LABELS.index(value.strip())
    try:
        label = int(value)
    except (TypeError, ValueError):
        label = -1
    if label not in (0, 1):
        raise ConfigError(f"{path}: label {value!r} is not 0/1 (neg/pos); export it again")
    return label


def _read_table(path: Path, ext: str) -> TextSplit:
    rows: list[dict[str, Any]]
    if ext == "csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    elif ext == "jsonl":
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(
                f"{path}: reading parquet needs pyarrow; pip install pyarrow, or export the "
                "splits as .csv/.jsonl"
            ) from None
        rows = pq.read_table(path, columns=["text", "label"]).to_pylist()
    if rows and not {"text", "label"} <= set(rows[0]):
        raise ConfigError(f"{path}: needs columns text and label, has {sorted(rows[0])}")
    return TextSplit(
        tuple(str(r["text"]) for r in rows), tuple(_label(r["label"], path) for r in rows)
    )


def _words(text: str) -> list[str]:
    return text.split()


# Words for the generated data set: sentiment words carry the label, the rest is filler.
POSITIVE_WORDS = _words(
    "good great fine superb charming moving delightful brilliant funny touching "
    "wonderful witty engaging clever lovely"
)
NEGATIVE_WORDS = _words(
    "bad dull awful boring tedious clumsy lifeless weak silly bland "
    "tiresome messy flat stale hollow"
)
NEUTRAL_WORDS = _words(
    "movie film story plot cast director script scene drama comedy picture actors "
    "performance ending feature"
)
FILLER_WORDS = _words("the a this its it is and but , . with of as")


def tiny_vocabulary() -> list[str]:
    """Every word `generate_rotten_tomatoes` can write (for write_tiny_model / resources)."""
    words = [*POSITIVE_WORDS, *NEGATIVE_WORDS, *NEUTRAL_WORDS, *FILLER_WORDS, "café"]
    return list(dict.fromkeys(words))


def _sentence(rng: np.random.Generator, positive: bool) -> str:
    own = POSITIVE_WORDS if positive else NEGATIVE_WORDS
    other = NEGATIVE_WORDS if positive else POSITIVE_WORDS
    n_neutral, n_own = len(NEUTRAL_WORDS), len(own)
    # One draw per sentence: article, subject, two own words, contrary word, linker, detail.
    a, s, o1, o2, c, link, d = rng.integers(0, [3, n_neutral, n_own, n_own, n_own, 2, n_neutral])
    words = [("the", "this", "a")[a], NEUTRAL_WORDS[s], "is", own[o1], "and", own[o2]]
    if rng.uniform() < 0.3:  # a contrary word now and then: not every example is trivial
        words += ["but", other[c]]
    words += [",", ("with", "as")[link], "its", NEUTRAL_WORDS[d], "."]
    return " ".join(words)


def generate_rotten_tomatoes(
    root: str | os.PathLike[str], n: int = 100, seed: int = 0, *, layout: str = RT_FOLDER
) -> Path:
    """Write a tiny Rotten Tomatoes look-alike under `root`: n positive and n negative sentences
    (lower case, tokens separated by spaces, as in the release) whose label shows in its
    sentiment words. `layout` is rt-polaritydata (latin-1 .pos/.neg files, split by load as the
    release is), csv or jsonl (train/validation/test, 80/10/10). Returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    pos = [_sentence(rng, True) for _ in range(n)]
    neg = [_sentence(rng, False) for _ in range(n)]
    if n:
        pos[0] = pos[0].replace(" its ", " its café ", 1)  # one latin-1 character
    if layout == RT_FOLDER:
        folder = root / RT_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        for key, lines in (("pos", pos), ("neg", neg)):
            # The release ends every line with a space before the newline.
            text = "".join(f"{line} \n" for line in lines)
            (folder / RT_FILES[key]).write_bytes(text.encode("latin-1"))
        return root
    if layout not in ("csv", "jsonl"):
        raise ValueError(f"layout {layout!r}: use {RT_FOLDER}, csv or jsonl")
    cut1, cut2 = int(n * 0.8 + 0.5), int(n * 0.9 + 0.5)
    root.mkdir(parents=True, exist_ok=True)
    for split, (lo, hi) in zip(SPLITS, [(0, cut1), (cut1, cut2), (cut2, n)], strict=True):
        rows = [{"text": t, "label": 1} for t in pos[lo:hi]]
        rows += [{"text": t, "label": 0} for t in neg[lo:hi]]
        path = root / f"{split}.{layout}"
        if layout == "csv":
            with path.open("w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["text", "label"])
                writer.writeheader()
                writer.writerows(rows)
        else:
            path.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
            )
    return root


@dataclass(frozen=True, eq=False)
class TokenizedSplit:
    """`inputs` int64 [N, 2, L]: token ids and attention mask packed (see model.TextClassifier),
    `labels` int64 [N]."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.inputs.dtype != torch.int64 or self.inputs.dim() != 3 or self.inputs.shape[1] != 2:
            raise ValueError(f"inputs must be int64 [N, 2, L], got {list(self.inputs.shape)}")
        if self.labels.shape != self.inputs.shape[:1]:
            raise ValueError(f"labels must be [{len(self.inputs)}], got {list(self.labels.shape)}")


def encode(
    tokenizer: Any, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH
) -> torch.Tensor:
    """Tokenize with [CLS]/[SEP], truncate and pad to `max_length`: int64 [N, 2, max_length]."""
    batch = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1).long()


def tokenize_split(
    tokenizer: Any, split: TextSplit, max_length: int = DEFAULT_MAX_LENGTH
) -> TokenizedSplit:
    return TokenizedSplit(
        encode(tokenizer, split.texts, max_length), torch.tensor(split.labels, dtype=torch.int64)
    )


class TokenLoader:
    """Batches of a tokenized split kept on the device, DeviceLoader's contract for text: order
    depends only on (seed, epoch); each batch is trimmed to its longest sequence."""

    def __init__(
        self,
        split: TokenizedSplit,
        batch_size: int,
        *,
        device: torch.device | str,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        self.inputs = split.inputs.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (int64 [B, 2, L_batch], int64 labels [B]) for one epoch, from its batch `start`
        on (a mid-epoch resume: the order is the whole epoch's, its first `start` batches
        skipped)."""
        key = hashlib.blake2b(f"{self.seed}:{epoch}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        n = len(self.labels)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.inputs.device)
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        for begin in range(start * self.batch_size, len(self) * self.batch_size, self.batch_size):
            index = order[begin : begin + self.batch_size]
            batch = self.inputs[index]
            # Padding beyond the longest sequence of the batch changes no logit: drop it.
            length = int(batch[:, 1].sum(dim=1).max().item()) if len(batch) else 0
            yield batch[:, :, : max(length, 1)], self.labels[index]
