"""The improved genetic algorithm attack (IGA) of Wang, Jin and He (2019), as TextAttack builds it.

TextAttack's `IGAWang2019` recipe, which the papers ran: counter-fitted embedding neighbours
(N = 50) within squared distance 0.5 of the current word, stop words untouched, at most
ceil(20%) of the words different from the original, population S = 60, M = 20 generations, each
position replaced at most lambda = 5 times, no constraint check after crossover.

The search, per TextAttack's ImprovedGeneticAlgorithm:
- initial population, one member per word position (the first S; fewer for a short sentence,
  as in TextAttack): the original with the best substitution at that position if it raises
  the score (else the original itself);
- each generation keeps the best member and breeds the rest anew: two parents drawn with
  probabilities softmax(-score / 0.3) (TextAttack's sign; `select_fitter_parents=True` uses
  +score, as Alzantot et al.'s GA does), a one-point crossover (prefix of one parent, suffix of
  the other), then a mutation: a position drawn in proportion to its remaining replacements,
  replaced by its best substitute if that raises the score, else the next position is drawn.
Differences from TextAttack: the search stops at the first successful query (TextAttack
finishes the generation, and misses a success in the last one); a position without valid
substitutes is never drawn again; the crossover point is drawn over token positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from samat.text.attack import (
    AttackResult,
    Candidates,
    Goal,
    PredictProba,
    Substitutions,
    attack_example,
)
from samat.text.resources import STOPWORDS, is_word, max_perturbed_words


@dataclass(frozen=True)
class IGAConfig:
    """IGAWang2019's settings (TextAttack), which the papers' attack used."""

    pop_size: int = 60
    max_iters: int = 20
    max_replacements: int = 5  # lambda: times one position may be replaced
    max_perturb_ratio: float = 0.2
    temp: float = 0.3
    post_crossover_check: bool = False
    max_crossover_retries: int = 20
    select_fitter_parents: bool = False


@dataclass
class _Member:
    words: list[str]
    left: np.ndarray  # replacements left per position
    score: float


class IGA:
    """`IGA(candidates)(tokens, label, predict_proba, seed=...) -> AttackResult`.

    `candidates(word)` lists the substitutes of a word (e.g. resources.EmbeddingSynonyms, already
    filtered by the distance bound) or is a {word: [substitutes]} mapping.
    """

    name = "iga"

    def __init__(
        self,
        candidates: Candidates,
        config: IGAConfig | None = None,
        stopwords: frozenset[str] = STOPWORDS,
    ) -> None:
        self.subs = Substitutions(candidates, stopwords)
        self.config = config or IGAConfig()

    def __call__(
        self, tokens: Sequence[str], label: int, predict_proba: PredictProba, *, seed: int = 0
    ) -> AttackResult:
        return attack_example(self._search, tokens, label, predict_proba, seed)

    # -- constraints ---------------------------------------------------------------------------

    def _valid(self, words: list[str], i: int, original: list[str], bound: int) -> list[str]:
        """Substitutes allowed at position i of `words` (max-perturbed bound included)."""
        subs = self.subs(words[i])
        if not subs:
            return []
        others = sum(w != o for j, (w, o) in enumerate(zip(words, original, strict=True)) if j != i)
        room = bound - others
        return [s for s in subs if (s != original[i]) <= room]

    def _n_diff(self, words: list[str], original: list[str]) -> int:
        return sum(w != o for w, o in zip(words, original, strict=True))

    # -- operators -----------------------------------------------------------------------------

    def _perturb(
        self,
        member: _Member,
        original: list[str],
        bound: int,
        goal: Goal,
        rng: np.random.Generator,
        index: int | None = None,
    ) -> _Member:
        if index is not None:
            order: list[int] | None = [index]
            weights = None
        else:
            order = None
            weights = np.where([bool(self.subs(w)) for w in member.words], member.left, 0).astype(
                np.float64
            )
        tries = 1 if order is not None else int(np.count_nonzero(weights))
        for _ in range(tries):
            if order is not None:
                i = order[0]
            else:
                i = int(rng.choice(len(weights), p=weights / weights.sum()))
            valid = self._valid(member.words, i, original, bound)
            if valid:
                texts = [[*member.words[:i], s, *member.words[i + 1 :]] for s in valid]
                scores = goal.scores(texts)
                best = int(np.argmax(scores))
                if scores[best] - member.score > 0:
                    left = member.left.copy()
                    left[i] -= 1
                    return _Member(texts[best], left, float(scores[best]))
            if weights is not None:
                weights[i] = 0.0
        return member

    def _crossover(
        self,
        a: _Member,
        b: _Member,
        original: list[str],
        bound: int,
        goal: Goal,
        rng: np.random.Generator,
    ) -> _Member:
        cfg = self.config
        n = len(a.words)
        for _ in range(cfg.max_crossover_retries + 1 if cfg.post_crossover_check else 1):
            cut = int(rng.integers(0, n))
            words = a.words[:cut] + b.words[cut:]
            if not cfg.post_crossover_check or self._n_diff(words, original) <= bound:
                left = np.concatenate([a.left[:cut], b.left[cut:]])
                return _Member(words, left, float(goal.scores([words])[0]))
        return a if rng.uniform() < 0.5 else b

    # -- search --------------------------------------------------------------------------------

    def _search(self, original: list[str], goal: Goal, rng: np.random.Generator) -> list[str]:
        cfg = self.config
        bound = max_perturbed_words(sum(is_word(t) for t in original), cfg.max_perturb_ratio)
        start = _Member(
            list(original),
            np.full(len(original), cfg.max_replacements),
            goal.initial_score,
        )
        positions = [i for i, t in enumerate(original) if is_word(t)][: cfg.pop_size]
        population = [self._perturb(start, original, bound, goal, rng, index=i) for i in positions]
        if not population:
            return list(original)
        sign = 1.0 if cfg.select_fitter_parents else -1.0
        for _ in range(cfg.max_iters):
            population.sort(key=lambda m: -m.score)
            size = len(population)
            if size < 2:
                break
            logits = sign * np.array([m.score for m in population]) / cfg.temp
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            first = rng.choice(size, size=size - 1, p=probs)
            second = rng.choice(size, size=size - 1, p=probs)
            children = []
            for i, j in zip(first, second, strict=True):
                child = self._crossover(population[i], population[j], original, bound, goal, rng)
                children.append(self._perturb(child, original, bound, goal, rng))
            population = [population[0], *children]
        return max(population, key=lambda m: m.score).words
