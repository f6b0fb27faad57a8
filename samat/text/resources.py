"""Substitution candidates for the word-level attacks: counter-fitted embeddings and HowNet.

IGA (Wang et al. 2019, as TextAttack's `IGAWang2019` recipe builds it) swaps a word for one of
its 50 nearest neighbours in the counter-fitted embedding space (Mrkšić et al. 2016), keeping
those whose squared Euclidean distance to the word is at most 0.5 (TextAttack's
`WordEmbeddingDistance(max_mse_dist=0.5)`, which is the sum of squared differences).
PSO (Zang et al. 2020, TextAttack's `PSOZang2020`) swaps a word for one that shares a sense with
exactly the same sememes in HowNet, per part of speech.

Staged files (nothing is downloaded):

- `counter-fitted-vectors.txt`: the released vectors (github nmrksic/counter-fitting,
  `word_vectors/counter-fitted-vectors.txt.zip`, unzipped), one `word v1 ... v300` per line.
- `hownet-candidates.json`: `{word: {pos: [substitute, ...]}}` (pos one of noun, verb, adj,
  adv) or `{word: [substitute, ...]}`. Make it on a machine with internet either from TextAttack's
  own candidate bank (`convert_textattack_hownet`, the exact candidates the papers' attack used)
  or from OpenHowNet (`export_hownet_candidates`); both are in this module.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from samat.config import ConfigError

COUNTERFITTED_FILE = "counter-fitted-vectors.txt"
HOWNET_FILE = "hownet-candidates.json"
HOWNET_POS = ("noun", "verb", "adj", "adv")

# NLTK's English stop-word list (179 words), which TextAttack's StopwordModification uses
# (`nltk.corpus.stopwords.words("english")`); fixed here so that no NLTK data is needed.
STOPWORDS: frozenset[str] = frozenset(
    str.split(
        """
    i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
    yourselves he him his himself she she's her hers herself it it's its itself they them their
    theirs themselves what which who whom this that that'll these those am is are was were be
    been being have has had having do does did doing a an the and but if or because as until
    while of at by for with about against between into through during before after above below
    to from up down in out on off over under again further then once here there when where why
    how all any both each few more most other some such no nor not only own same so than too
    very s t can will just don don't should should've now d ll m o re ve y ain aren aren't
    couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma
    mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren
    weren't won won't wouldn wouldn't
    """
    )
)

_WORD = re.compile(r"\w")


def is_word(token: str) -> bool:
    """A token that counts as a word (has a letter or digit); punctuation tokens do not."""
    return bool(_WORD.search(token))


def recover_case(word: str, reference: str) -> str:
    """`word` in the case of `reference` (lower, UPPER or Capitalised; else unchanged)."""
    if reference.islower():
        return word.lower()
    if reference.isupper() and len(reference) > 1:
        return word.upper()
    if reference[:1].isupper() and reference[1:].islower():
        return word.capitalize()
    return word


class WordEmbedding:
    """Word vectors with Euclidean nearest neighbours, as TextAttack's counter-fitted ones."""

    def __init__(self, words: Sequence[str], vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or len(words) != len(vectors):
            raise ValueError(f"{len(words)} words for vectors of shape {vectors.shape}")
        self.words = list(words)
        self.index = {word: i for i, word in enumerate(self.words)}
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._sq_norms = np.einsum("ij,ij->i", self.vectors, self.vectors)

    def __contains__(self, word: object) -> bool:
        return word in self.index

    def __len__(self) -> int:
        return len(self.words)

    def sq_distance(self, a: str, b: str) -> float:
        """Squared Euclidean distance (TextAttack's "mse_dist"); KeyError for unknown words."""
        diff = self.vectors[self.index[a]].astype(np.float64) - self.vectors[self.index[b]]
        return float(diff @ diff)

    def neighbours(self, word: str, k: int) -> list[tuple[str, float]]:
        """The k nearest other words with their squared distances, nearest first (ties: file
        order); [] for a word not in the embedding."""
        i = self.index.get(word)
        if i is None or k <= 0:
            return []
        v = self.vectors[i]
        sq = self._sq_norms + self._sq_norms[i] - 2.0 * (self.vectors @ v)
        sq[i] = np.inf
        k = min(k, len(self.words) - 1)
        top = np.argpartition(sq, k - 1)[:k] if k < len(sq) else np.arange(len(sq))
        top = top[np.lexsort((top, sq[top]))]
        return [(self.words[j], max(float(sq[j]), 0.0)) for j in top[:k]]


def load_counterfitted(path: str | os.PathLike[str]) -> WordEmbedding:
    """Read `counter-fitted-vectors.txt` (a file, or a folder holding it): `word v1 ... vD`."""
    path = Path(path)
    if path.is_dir():
        path = path / COUNTERFITTED_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path}: no counter-fitted vectors; stage {COUNTERFITTED_FILE} (github "
            "nmrksic/counter-fitting, word_vectors/) there"
        )
    words: list[str] = []
    rows: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            head, _, rest = line.rstrip("\n").partition(" ")
            if head and rest:
                words.append(head)
                rows.append(rest)
    if not words:
        raise ConfigError(f"{path}: no vectors in it; expected 'word v1 ... vD' lines")
    flat = np.array(" ".join(rows).split(), dtype=np.float32)
    if flat.size % len(words):
        raise ConfigError(f"{path}: lines have different numbers of values; re-extract it")
    return WordEmbedding(words, flat.reshape(len(words), -1))


class EmbeddingSynonyms:
    """IGA's candidates: up to `max_candidates` nearest neighbours of a word whose squared
    distance to it is at most `max_sq_distance` (TextAttack IGAWang2019: 50 and 0.5)."""

    def __init__(
        self, embedding: WordEmbedding, max_candidates: int = 50, max_sq_distance: float = 0.5
    ) -> None:
        self.embedding = embedding
        self.max_candidates = max_candidates
        self.max_sq_distance = max_sq_distance
        self._cache: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        key = word.lower()
        if key not in self._cache:
            self._cache[key] = [
                other
                for other, sq in self.embedding.neighbours(key, self.max_candidates)
                if sq <= self.max_sq_distance
            ]
        return [recover_case(other, word) for other in self._cache[key]]


class SememeSynonyms:
    """PSO's candidates from a staged HowNet table, the parts of speech merged in the order
    noun, verb, adj, adv (no POS tagger here; TextAttack keeps those of the tagged POS only)."""

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self.table = table

    def __call__(self, word: str) -> list[str]:
        subs = self.table.get(word.lower(), ())
        return [recover_case(s, word) for s in subs if " " not in s and s != word.lower()]


def _merge_pos(entry: object, word: str, path: Path) -> list[str]:
    if isinstance(entry, list):
        lists = [entry]
    elif isinstance(entry, dict):
        lists = [entry.get(pos, []) for pos in HOWNET_POS]
    else:
        raise ConfigError(f"{path}: entry for {word!r} is neither a list nor a {{pos: list}}")
    merged: dict[str, None] = {}
    for subs in lists:
        for sub in subs:
            if not isinstance(sub, str):
                raise ConfigError(f"{path}: substitute {sub!r} of {word!r} is not a string")
            merged.setdefault(sub.lower(), None)
    merged.pop(word.lower(), None)
    return list(merged)


def load_hownet_candidates(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read the staged HowNet table (a file, or a folder holding `hownet-candidates.json`)."""
    path = Path(path)
    if path.is_dir():
        path = path / HOWNET_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path}: no HowNet candidates; stage {HOWNET_FILE} there (see "
            "samat.text.resources.convert_textattack_hownet / export_hownet_candidates)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error}); stage it again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object {{word: [substitutes]}}")
    return {word.lower(): _merge_pos(entry, word, path) for word, entry in data.items()}


def _write_json(path: Path, data: object) -> None:
    from samat.files import write_atomic

    text = json.dumps(data, ensure_ascii=False, sort_keys=True)
    write_atomic(path, text.encode("utf-8"), sync=False)


def sememe_candidates(
    words: Iterable[str], senses: Callable[[str], Iterable[tuple[str, frozenset[str]]]]
) -> dict[str, dict[str, list[str]]]:
    """Zang et al.'s rule: w2 substitutes w1 as POS p when a sense of w1 and a sense of w2, both
    tagged p, carry exactly the same set of sememes. `senses(word)` lists (pos, sememes) pairs;
    POS outside noun/verb/adj/adv and senses without sememes are ignored. (The original script
    also maps inflected forms to their lemma first; that step is left out.)"""
    vocab = list(dict.fromkeys(w.lower() for w in words))
    groups: dict[tuple[str, frozenset[str]], list[str]] = {}
    word_keys: dict[str, list[tuple[str, frozenset[str]]]] = {}
    for word in vocab:
        keys = []
        for pos, sememes in senses(word):
            key = (pos, frozenset(sememes))
            if pos in HOWNET_POS and key[1] and key not in keys:
                keys.append(key)
                groups.setdefault(key, []).append(word)
        word_keys[word] = keys
    table: dict[str, dict[str, list[str]]] = {}
    for word in vocab:
        by_pos: dict[str, list[str]] = {}
        for pos, sememes in word_keys[word]:
            subs = by_pos.setdefault(pos, [])
            subs.extend(w for w in groups[(pos, sememes)] if w != word and w not in subs)
        if any(by_pos.values()):
            table[word] = {pos: subs for pos, subs in by_pos.items() if subs}
    return table


def openhownet_senses() -> Callable[[str], list[tuple[str, frozenset[str]]]]:
    """(pos, sememes) of each English sense, from OpenHowNet (`pip install OpenHowNet`, then
    `OpenHowNet.download()` once: needs internet; not exercised by the tests)."""
    import OpenHowNet

    hownet = OpenHowNet.HowNetDict()

    def senses(word: str) -> list[tuple[str, frozenset[str]]]:
        found = []
        for sense in hownet.get_sense(word, language="en"):
            sememes = frozenset(str(s) for s in sense.get_sememe_list())
            found.append((str(sense.en_grammar), sememes))
        return found

    return senses


def export_hownet_candidates(
    words: Iterable[str],
    out_path: str | os.PathLike[str],
    senses: Callable[[str], Iterable[tuple[str, frozenset[str]]]] | None = None,
) -> Path:
    """Write `hownet-candidates.json` for `words` (e.g. the counter-fitted or data set vocabulary)
    from sense data; by default OpenHowNet's. Returns the file written."""
    out = Path(out_path)
    if out.is_dir():
        out = out / HOWNET_FILE
    _write_json(out, sememe_candidates(words, senses or openhownet_senses()))
    return out


def convert_textattack_hownet(
    pkl_path: str | os.PathLike[str], out_path: str | os.PathLike[str]
) -> Path:
    """Turn TextAttack's HowNet bank (`word_candidates_sense.pkl`, which `WordSwapHowNet`
    downloads into ~/.cache/textattack/transformations/hownet/) into `hownet-candidates.json`.

    That file is a Python pickle: convert only your own download of it.
    """
    with Path(pkl_path).open("rb") as f:
        bank = pickle.load(f)
    table = {
        str(word): {str(pos): [str(s) for s in subs] for pos, subs in by_pos.items() if subs}
        for word, by_pos in bank.items()
        if isinstance(by_pos, dict)
    }
    out = Path(out_path)
    if out.is_dir():
        out = out / HOWNET_FILE
    _write_json(out, {w: entry for w, entry in table.items() if entry})
    return out


def write_tiny_resources(
    root: str | os.PathLike[str],
    vocab_words: Iterable[str],
    seed: int = 0,
    *,
    cluster_size: int = 3,
) -> Path:
    """Write both staged files for the given words, for tests and the tiny example.

    Non-stop words are shuffled (seeded) into clusters of `cluster_size`; members of a cluster
    lie within squared distance 0.04 of each other and words of different clusters more than 1.4
    apart, so each word's IGA candidates and its HowNet substitutes are its cluster mates. Stop
    words get vectors of their own. Returns `root`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = list(dict.fromkeys(w.lower() for w in vocab_words if is_word(w)))
    content = [w for w in words if w not in STOPWORDS]
    order = rng.permutation(len(content))
    clusters = [
        [content[j] for j in order[i : i + cluster_size]]
        for i in range(0, len(content), cluster_size)
    ]
    if len(clusters) > 1 and len(clusters[-1]) == 1:  # no word without a substitute
        last = clusters.pop()
        clusters[-1] += last
    # Orthonormal centres (sqrt(2) apart), one per cluster and one per stop word.
    n_centres = len(clusters) + len(words) - len(content)
    centres = np.linalg.qr(rng.standard_normal((n_centres, n_centres)))[0]
    vectors: dict[str, np.ndarray] = {}
    for c, members in enumerate(clusters):
        for w in members:
            noise = rng.standard_normal(n_centres)
            vectors[w] = centres[c] + 0.1 * noise / np.linalg.norm(noise)
    for k, w in enumerate(w for w in words if w not in vectors):
        vectors[w] = centres[len(clusters) + k]
    lines = [w + " " + " ".join(f"{x:.6f}" for x in vectors[w]) for w in words]
    (root / COUNTERFITTED_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = {
        w: {"adj": [o for o in members if o != w]}
        for members in clusters
        for w in members
        if len(members) > 1
    }
    _write_json(root / HOWNET_FILE, table)
    return root


def max_perturbed_words(n_words: int, ratio: float) -> int:
    """TextAttack's MaxWordsPerturbed bound: ceil(ratio * number of words)."""
    return math.ceil(n_words * ratio)
