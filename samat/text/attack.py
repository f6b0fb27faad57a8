"""What both word-level attacks share: the victim's query interface, results and their summary.

A victim is any `predict_proba(list of token lists) -> float array [N, num_classes]`; a text is a
list of whitespace tokens (Rotten Tomatoes comes tokenized). The goal is TextAttack's
`UntargetedClassification`: the score of a text is 1 - p(true label) and an attack succeeds as
soon as the arg-max class is another. Queries are counted as TextAttack counts them: every text
handed to the goal function, the original included, repeated texts too (they are cached, so the
victim sees each distinct text once). An attack stops at the first query that succeeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from samat.text.resources import STOPWORDS, is_word

PredictProba = Callable[[list[list[str]]], np.ndarray]
Candidates = Callable[[str], Sequence[str]] | Mapping[str, Sequence[str]]

SUCCEEDED, FAILED, SKIPPED = "succeeded", "failed", "skipped"


@dataclass(frozen=True)
class AttackResult:
    """One example: `status` is succeeded, failed, or skipped (misclassified to begin with)."""

    original: tuple[str, ...]
    label: int
    status: str
    adversarial: tuple[str, ...]
    n_queries: int

    @property
    def success(self) -> bool:
        return self.status == SUCCEEDED

    @property
    def n_words(self) -> int:
        return sum(is_word(t) for t in self.original)

    @property
    def n_perturbed(self) -> int:
        return sum(a != b for a, b in zip(self.original, self.adversarial, strict=True))

    @property
    def perturbed_rate(self) -> float:
        """Fraction of the words that differ from the original."""
        return self.n_perturbed / max(self.n_words, 1)

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "status": self.status,
            "original": " ".join(self.original),
            "adversarial": " ".join(self.adversarial),
            "n_queries": self.n_queries,
            "n_perturbed": self.n_perturbed,
            "n_words": self.n_words,
        }


@dataclass(frozen=True)
class AttackSummary:
    """TextAttack's summary: the success rate counts only originally correct examples."""

    n_examples: int
    n_succeeded: int
    n_failed: int
    n_skipped: int
    mean_queries: float  # over attacked (succeeded + failed) examples
    mean_perturbed_rate: float  # over successful attacks, in [0, 1]

    @property
    def success_rate(self) -> float:
        """Attack success rate in %: succeeded / (succeeded + failed)."""
        attacked = self.n_succeeded + self.n_failed
        return 100.0 * self.n_succeeded / attacked if attacked else 0.0

    @property
    def clean_accuracy(self) -> float:
        return 100.0 * (self.n_succeeded + self.n_failed) / max(self.n_examples, 1)

    @property
    def robust_accuracy(self) -> float:
        """Accuracy under attack in %: the examples the attack failed on."""
        return 100.0 * self.n_failed / max(self.n_examples, 1)

    def to_json(self) -> dict:
        return {
            "n_examples": self.n_examples,
            "n_succeeded": self.n_succeeded,
            "n_failed": self.n_failed,
            "n_skipped": self.n_skipped,
            "success_rate": self.success_rate,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "mean_queries": self.mean_queries,
            "mean_perturbed_rate": self.mean_perturbed_rate,
        }


def summarize(results: Sequence[AttackResult]) -> AttackSummary:
    """Aggregate per-example results."""
    attacked = [r for r in results if r.status != SKIPPED]
    won = [r for r in results if r.success]
    return AttackSummary(
        n_examples=len(results),
        n_succeeded=len(won),
        n_failed=len(attacked) - len(won),
        n_skipped=len(results) - len(attacked),
        mean_queries=float(np.mean([r.n_queries for r in attacked])) if attacked else 0.0,
        mean_perturbed_rate=float(np.mean([r.perturbed_rate for r in won])) if won else 0.0,
    )


class Succeeded(Exception):
    """Raised by `Goal.scores` at the first successful text: the search is over."""

    def __init__(self, tokens: list[str]) -> None:
        super().__init__("attack succeeded")
        self.tokens = tokens


class Goal:
    """Untargeted goal on one example, with TextAttack's query count and a cache."""

    def __init__(self, predict_proba: PredictProba, label: int) -> None:
        self.predict_proba = predict_proba
        self.label = label
        self.n_queries = 0
        self.initial_score = float("nan")  # the original's score, set by attack_example
        self._cache: dict[tuple[str, ...], np.ndarray] = {}

    def probabilities(self, texts: Sequence[Sequence[str]]) -> np.ndarray:
        """Class probabilities [N, C]; counts N queries, asks the victim only for new texts."""
        keys = [tuple(t) for t in texts]
        new = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if new:
            probs = np.asarray(self.predict_proba([list(k) for k in new]), dtype=np.float64)
            if probs.ndim != 2 or len(probs) != len(new):
                raise ValueError(f"predict_proba returned shape {probs.shape} for {len(new)} texts")
            self._cache.update(zip(new, probs, strict=True))
        self.n_queries += len(keys)
        return np.stack([self._cache[k] for k in keys]) if keys else np.zeros((0, 2))

    def scores(self, texts: Sequence[Sequence[str]]) -> np.ndarray:
        """1 - p(label) per text; raises Succeeded at the first text classified otherwise."""
        probs = self.probabilities(texts)
        for text, p in zip(texts, probs, strict=True):
            if int(np.argmax(p)) != self.label:
                raise Succeeded(list(text))
        return 1.0 - probs[:, self.label] if len(probs) else np.zeros(0)


class Substitutions:
    """Which positions may change and to what: word tokens that are not stop words (checked on
    the current word, as TextAttack's StopwordModification does), with their candidates."""

    def __init__(self, candidates: Candidates, stopwords: frozenset[str] = STOPWORDS) -> None:
        if isinstance(candidates, Mapping):
            table = candidates
            self._lookup: Callable[[str], Sequence[str]] = lambda w: table.get(w, ())
        else:
            self._lookup = candidates
        self.stopwords = stopwords
        self._cache: dict[str, list[str]] = {}

    def modifiable(self, word: str) -> bool:
        return is_word(word) and word.lower() not in self.stopwords

    def __call__(self, word: str) -> list[str]:
        """Substitutes for `word` (never `word` itself); [] where it may not change."""
        if not self.modifiable(word):
            return []
        if word not in self._cache:
            subs = dict.fromkeys(s for s in self._lookup(word) if s != word and s.strip())
            self._cache[word] = list(subs)
        return self._cache[word]


class AttackFn(Protocol):
    def __call__(
        self, tokens: Sequence[str], label: int, predict_proba: PredictProba, *, seed: int
    ) -> AttackResult: ...


def attack_example(
    search: Callable[[list[str], Goal, np.random.Generator], list[str]],
    tokens: Sequence[str],
    label: int,
    predict_proba: PredictProba,
    seed: int,
) -> AttackResult:
    """Run `search(tokens, goal, rng)` (which returns its best text) on an originally correct
    example, with `goal.initial_score` set; a Succeeded raised anywhere inside ends it."""
    original = tuple(tokens)
    goal = Goal(predict_proba, label)
    rng = np.random.default_rng(seed)
    try:
        goal.initial_score = float(goal.scores([list(original)])[0])
    except Succeeded:
        return AttackResult(original, label, SKIPPED, original, goal.n_queries)
    try:
        best = search(list(original), goal, rng)
    except Succeeded as done:
        return AttackResult(original, label, SUCCEEDED, tuple(done.tokens), goal.n_queries)
    return AttackResult(original, label, FAILED, tuple(best), goal.n_queries)


def example_seed(seed: int, index: int) -> int:
    """The seed of the example at position `index` of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def attack_dataset(
    attack: AttackFn,
    examples: Sequence[tuple[Sequence[str], int]],
    predict_proba: PredictProba,
    *,
    seed: int = 0,
    progress: Callable[[int, AttackResult], None] | None = None,
) -> list[AttackResult]:
    """Attack each (tokens, label); the i-th is seeded with example_seed(seed, i), so a result
    does not depend on the examples before it."""
    results = []
    for i, (tokens, label) in enumerate(examples):
        result = attack(tokens, label, predict_proba, seed=example_seed(seed, i))
        results.append(result)
        if progress is not None:
            progress(i, result)
    return results
