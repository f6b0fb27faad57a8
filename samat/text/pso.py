"""The sememe + particle swarm attack (PSO) of Zang et al. (2020), as TextAttack builds it.

TextAttack's `PSOZang2020` recipe, which the papers ran: HowNet sememe substitutes, stop words
untouched, each position substituted at most once (RepeatModification: a position holds its
original word or one of that word's substitutes), no bound on the number of changed words,
population 60, at most 20 iterations, inertia omega from 0.8 down to 0.2, V_max = 3 (turn
probabilities sigmoid(v) between 0.047 and 0.953), C1 from 0.8 down to 0.2 and C2 from 0.2 up to
0.8 (the reference code's values).

The search, per TextAttack's ParticleSwarmOptimization:
- the best neighbours of a text: for each position that may still change, its best substitute;
  one is drawn with probability proportional to the score gain (uniformly if none gains);
- 60 particles start as draws from the original's best neighbours, each with one velocity drawn
  uniformly in [-3, 3] for all its positions;
- each iteration: v = omega v + (1 - omega) (e(x, local elite) + e(x, global elite)), with e = -3
  where the words agree and +3 where they differ; with probability C1 the particle becomes its
  local elite with each position taken from the particle with probability sigmoid(v), then the
  same with the global elite and C2; all particles are scored; each then mutates with
  probability 1 - 2 * (fraction of words changed) into a draw from its best neighbours; elites
  are updated.
Differences from TextAttack: the search stops at the first successful query (TextAttack checks
after the turn and mutation steps). TextAttack's turn is the reverse of the reference code's
(see `_turn`); it is kept, since the papers' numbers come from TextAttack, and
`reference_turn=True` gives the reference code's.
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
from samat.text.resources import STOPWORDS, is_word


@dataclass(frozen=True)
class PSOConfig:
    """PSOZang2020's settings (TextAttack / the reference code)."""

    pop_size: int = 60
    max_iters: int = 20
    omega_1: float = 0.8
    omega_2: float = 0.2
    c1: float = 0.8
    c2: float = 0.2
    v_max: float = 3.0
    # TextAttack's turn keeps the particle's word where sigmoid(v) is high, the reference code
    # (SememePSO-Attack) takes the elite's there; see PSO._turn.
    reference_turn: bool = False


@dataclass
class _Particle:
    words: list[str]
    score: float


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class PSO:
    """`PSO(candidates)(tokens, label, predict_proba, seed=...) -> AttackResult`.

    `candidates(word)` lists HowNet substitutes (e.g. resources.SememeSynonyms) or is a
    {word: [substitutes]} mapping.
    """

    name = "pso"

    def __init__(
        self,
        candidates: Candidates,
        config: PSOConfig | None = None,
        stopwords: frozenset[str] = STOPWORDS,
    ) -> None:
        self.subs = Substitutions(candidates, stopwords)
        self.config = config or PSOConfig()

    def __call__(
        self, tokens: Sequence[str], label: int, predict_proba: PredictProba, *, seed: int = 0
    ) -> AttackResult:
        return attack_example(self._search, tokens, label, predict_proba, seed)

    def _best_neighbours(
        self, current: _Particle, original: list[str], positions: list[int], goal: Goal
    ) -> tuple[list[_Particle], np.ndarray]:
        """Per word position, its best single substitution (the particle itself where none is
        allowed), and the draw probabilities: score gains clipped at 0 and normalised, uniform
        over the word positions if none gains."""
        texts: list[list[str]] = []
        owner: list[int] = []
        for k, i in enumerate(positions):
            word = current.words[i]
            if word != original[i]:
                continue  # RepeatModification: a substituted position stays as it is
            for sub in self.subs(word):
                texts.append([*current.words[:i], sub, *current.words[i + 1 :]])
                owner.append(k)
        best = [current] * len(positions)
        gains = np.zeros(len(positions))
        if texts:
            scores = goal.scores(texts)
            for j, k in enumerate(owner):
                if best[k] is current or scores[j] > best[k].score:
                    best[k] = _Particle(texts[j], float(scores[j]))
            for k, particle in enumerate(best):
                if particle is not current:
                    gains[k] = particle.score - current.score
        gains = np.clip(gains, 0.0, None)
        total = gains.sum()
        probs = gains / total if total > 0 else np.full(len(gains), 1.0 / len(gains))
        return best, probs

    def _draw(self, best: list[_Particle], probs: np.ndarray, rng: np.random.Generator):
        return best[int(rng.choice(len(best), p=probs))]

    def _turn(
        self, elite: _Particle, particle: _Particle, prob: np.ndarray, rng: np.random.Generator
    ) -> _Particle:
        """TextAttack: the elite's words, each replaced by the particle's with probability
        prob[i]; reference code (`reference_turn`): the particle's words, each replaced by the
        elite's with probability prob[i]. Scored afterwards with the whole swarm."""
        take = rng.uniform(size=len(prob)) < prob
        source, target = (particle, elite) if self.config.reference_turn else (elite, particle)
        words = [t if k else s for s, t, k in zip(source.words, target.words, take, strict=True)]
        return _Particle(words, float("nan"))

    def _search(self, original: list[str], goal: Goal, rng: np.random.Generator) -> list[str]:
        cfg = self.config
        positions = [i for i, t in enumerate(original) if is_word(t)]
        if not positions:
            return list(original)
        n_words = len(positions)
        start = _Particle(list(original), goal.initial_score)
        best, probs = self._best_neighbours(start, original, positions, goal)
        population = [self._draw(best, probs, rng) for _ in range(cfg.pop_size)]
        population = [_Particle(list(p.words), p.score) for p in population]
        v_init = rng.uniform(-cfg.v_max, cfg.v_max, cfg.pop_size)
        velocities = np.repeat(v_init[:, None], len(original), axis=1)
        global_elite = max(population, key=lambda p: p.score)
        local_elites = [_Particle(list(p.words), p.score) for p in population]
        for it in range(cfg.max_iters):
            omega = (cfg.omega_1 - cfg.omega_2) * (cfg.max_iters - it) / cfg.max_iters
            omega += cfg.omega_2
            c1 = cfg.c1 - it / cfg.max_iters * (cfg.c1 - cfg.c2)
            c2 = cfg.c2 + it / cfg.max_iters * (cfg.c1 - cfg.c2)
            for k, particle in enumerate(population):
                words = np.array(particle.words, dtype=object)
                local = np.array(local_elites[k].words, dtype=object)
                glob = np.array(global_elite.words, dtype=object)
                pull = np.where(words == local, -cfg.v_max, cfg.v_max) + np.where(
                    words == glob, -cfg.v_max, cfg.v_max
                )
                velocities[k] = omega * velocities[k] + (1 - omega) * pull
                turn = _sigmoid(velocities[k])
                if rng.uniform() < c1:
                    population[k] = self._turn(local_elites[k], population[k], turn, rng)
                if rng.uniform() < c2:
                    population[k] = self._turn(global_elite, population[k], turn, rng)
            scores = goal.scores([p.words for p in population])
            for particle, score in zip(population, scores, strict=True):
                particle.score = float(score)
            for k, particle in enumerate(population):
                changed = sum(a != b for a, b in zip(particle.words, original, strict=True))
                if rng.uniform() < 1 - 2 * changed / n_words:
                    best, probs = self._best_neighbours(particle, original, positions, goal)
                    drawn = self._draw(best, probs, rng)
                    population[k] = _Particle(list(drawn.words), drawn.score)
            for k, particle in enumerate(population):
                if particle.score > local_elites[k].score:
                    local_elites[k] = _Particle(list(particle.words), particle.score)
            top = max(population, key=lambda p: p.score)
            if top.score > global_elite.score:
                global_elite = _Particle(list(top.words), top.score)
        return global_elite.words
