"""samat.text: Rotten Tomatoes files, the staged DistilBERT, attack resources, IGA and PSO."""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samat.config import ConfigError, SAMMethod, StandardMethod
from samat.methods import create
from samat.store import read_checkpoint, write_checkpoint
from samat.text import (
    IGA,
    PSO,
    STOPWORDS,
    AttackResult,
    EmbeddingSynonyms,
    IGAConfig,
    PSOConfig,
    SememeSynonyms,
    TextVictim,
    TokenLoader,
    attack_dataset,
    check_model_dir,
    convert_textattack_hownet,
    encode,
    export_hownet_candidates,
    generate_rotten_tomatoes,
    linear_schedule,
    load_counterfitted,
    load_hownet_candidates,
    load_pretrained,
    load_rotten_tomatoes,
    load_tokenizer,
    make_adamw,
    summarize,
    tiny_vocabulary,
    tokenize_split,
    write_tiny_model,
    write_tiny_resources,
)
from samat.text.attack import SKIPPED, SUCCEEDED, Goal, example_seed
from samat.text.data import RT_SIZES
from samat.text.resources import sememe_candidates


def toks(text: str) -> list[str]:
    return text.split()


# --- a hand-made victim --------------------------------------------------------------------


class Victim:
    """p(positive) = fn(tokens); records every distinct text it is asked about."""

    def __init__(self, fn: Callable[[list[str]], float]) -> None:
        self.fn = fn
        self.seen: list[tuple[str, ...]] = []

    def __call__(self, texts: list[list[str]]) -> np.ndarray:
        self.seen.extend(tuple(t) for t in texts)
        p = np.array([self.fn(t) for t in texts], dtype=np.float64)
        return np.stack([1 - p, p], axis=1)


def bag(weights: dict[str, float], bias: float = 0.0) -> Callable[[list[str]], float]:
    return lambda t: 1 / (1 + np.exp(-(bias + sum(weights.get(w, 0.0) for w in t))))


SENTENCE = toks("the movie is good and the cast is great , not a dull scene in it .")
CANDIDATES = {
    "movie": ["film", "picture"],
    "good": ["fine", "okay"],
    "fine": ["superb"],  # a second hop: IGA may take it, PSO may not
    "great": ["grand", "big"],
    "cast": ["actors"],
    "dull": ["flat", "slow"],
    "scene": ["shot"],
    "the": ["a"],  # a stop word: never changed
    "not": ["hardly"],
}
ORIGINAL_WORDS = {"movie", "good", "cast", "great", "dull", "scene"}


def robust(tokens: list[str]) -> float:
    """Never flips (p >= 0.6) but every substitution raises the score: a full-budget search."""
    return 0.6 + 0.05 * sum(w in ORIGINAL_WORDS for w in tokens)


def reachable(word: str, hops: int) -> set[str]:
    found, frontier = {word}, {word}
    for _ in range(hops):
        frontier = {c for w in frontier for c in CANDIDATES.get(w, [])} - found
        found |= frontier
    return found


def check_text(text: Sequence[str], hops: int) -> int:
    """Assert what any queried text may differ by; returns the number of changed words."""
    assert len(text) == len(SENTENCE)
    changed = 0
    for orig, new in zip(SENTENCE, text, strict=True):
        if new != orig:
            assert orig not in STOPWORDS and orig not in {",", "."}
            assert new in reachable(orig, hops) - {orig}, (orig, new)
            changed += 1
    return changed


# --- resources ------------------------------------------------------------------------------


def test_stopwords_are_nltk_english_list() -> None:
    assert len(STOPWORDS) == 179
    assert {"the", "not", "no", "don't", "wouldn't", "very"} <= STOPWORDS
    assert not {"good", "movie", "dull"} & STOPWORDS


def test_counterfitted_vectors_neighbours_and_distance_bound(tmp_path: Path) -> None:
    rows = {
        "good": [1.0, 0.0, 0.0],
        "fine": [0.8, 0.3, 0.0],  # sq distance 0.13
        "great": [0.6, 0.0, 0.5],  # 0.41
        "okay": [0.5, 0.6, 0.0],  # 0.61: a neighbour, beyond IGA's 0.5
        "bad": [-1.0, 0.0, 0.0],  # 4.0
    }
    path = tmp_path / "counter-fitted-vectors.txt"
    path.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in rows.items()))
    emb = load_counterfitted(tmp_path)
    assert len(emb) == 5 and emb.vectors.shape == (5, 3)
    near = emb.neighbours("good", 3)
    assert [w for w, _ in near] == ["fine", "great", "okay"]
    np.testing.assert_allclose([d for _, d in near], [0.13, 0.41, 0.61], atol=1e-6)
    assert emb.sq_distance("good", "bad") == pytest.approx(4.0)
    assert emb.neighbours("unknown", 3) == []
    assert EmbeddingSynonyms(emb)("good") == ["fine", "great"]
    assert EmbeddingSynonyms(emb, max_candidates=1)("Good") == ["Fine"]
    assert EmbeddingSynonyms(emb, max_sq_distance=1.0)("good") == ["fine", "great", "okay"]
    path.write_text("good 1 2 3\nbad 1 2\n")
    with pytest.raises(ConfigError, match="different numbers of values"):
        load_counterfitted(path)
    with pytest.raises(ConfigError, match="counter-fitted-vectors.txt"):
        load_counterfitted(tmp_path / "absent")


def test_hownet_table_formats(tmp_path: Path) -> None:
    path = tmp_path / "hownet-candidates.json"
    table = {"Good": {"adv": ["well"], "adj": ["fine", "good", "fine"], "noun": ["benefit"]}}
    path.write_text(json.dumps({**table, "film": ["movie", "picture"]}))
    loaded = load_hownet_candidates(tmp_path)
    assert loaded == {"good": ["benefit", "fine", "well"], "film": ["movie", "picture"]}
    assert SememeSynonyms(loaded)("Film") == ["Movie", "Picture"]
    assert SememeSynonyms(loaded)("the") == []
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hownet_candidates(path)
    with pytest.raises(ConfigError, match="hownet-candidates.json"):
        load_hownet_candidates(tmp_path / "elsewhere")


def test_sememe_rule_and_exports(tmp_path: Path) -> None:
    senses = {
        "film": [("noun", {"shows"})],
        "movie": [("noun", {"shows"}), ("verb", {"shows"})],
        "picture": [("noun", {"image"}), ("noun", {"shows"})],
        "image": [("noun", {"image"})],
        "run": [("verb", {"SelfMove"})],
        "jog": [("verb", {"SelfMove", "slow"})],  # not the same set: no substitute of run
        "of": [("prep", {"relation"})],  # not a noun/verb/adj/adv
        "with": [("prep", {"relation"})],
    }
    lookup = lambda w: [(pos, frozenset(s)) for pos, s in senses.get(w, [])]  # noqa: E731
    table = sememe_candidates(senses, lookup)
    assert table == {
        "film": {"noun": ["movie", "picture"]},
        "movie": {"noun": ["film", "picture"]},
        "picture": {"noun": ["image", "film", "movie"]},
        "image": {"noun": ["picture"]},
    }
    out = export_hownet_candidates(senses, tmp_path, senses=lookup)
    assert out == tmp_path / "hownet-candidates.json"
    assert load_hownet_candidates(out)["picture"] == ["image", "film", "movie"]
    # TextAttack's bank has the same {word: {pos: [...]}} shape, pickled.
    bank = tmp_path / "word_candidates_sense.pkl"
    bank.write_bytes(pickle.dumps({"good": {"adj": ["fine"], "noun": []}, "the": {}}))
    converted = convert_textattack_hownet(bank, tmp_path / "ta.json")
    assert json.loads(converted.read_text()) == {"good": {"adj": ["fine"]}}


def test_tiny_resources_agree(tmp_path: Path) -> None:
    write_tiny_resources(tmp_path, tiny_vocabulary(), seed=3)
    emb, hownet = load_counterfitted(tmp_path), load_hownet_candidates(tmp_path)
    synonyms = EmbeddingSynonyms(emb)
    content = [w for w in tiny_vocabulary() if w not in STOPWORDS and w not in ",."]
    assert set(hownet) == set(content)
    for word in content:
        assert set(synonyms(word)) == set(hownet[word]) and 2 <= len(hownet[word]) <= 3
        assert all(emb.sq_distance(word, o) < 0.05 for o in hownet[word])
    assert synonyms("the") == [] and "the" in emb


# --- data -------------------------------------------------------------------------------------


def test_release_split_is_the_hf_script(tmp_path: Path) -> None:
    generate_rotten_tomatoes(tmp_path, n=5331, seed=1)
    raw = (tmp_path / "rt-polaritydata" / "rt-polarity.pos").read_bytes()
    assert raw.endswith(b" . \n") and "café".encode("latin-1") in raw
    ds = load_rotten_tomatoes(tmp_path)
    sizes = {s: len(getattr(ds, s)) for s in ("train", "validation", "test")}
    assert sizes == RT_SIZES == {"train": 8530, "validation": 1066, "test": 1066}
    pos = raw.decode("latin-1").splitlines()
    assert ds.train.texts[0] == pos[0].strip() and "café" in ds.train.texts[0]
    assert ds.train.labels[:4265] == (1,) * 4265 and ds.train.labels[4265:] == (0,) * 4265
    assert ds.validation.texts[0] == pos[4265].strip() and ds.test.texts[532] == pos[5330].strip()
    assert ds.source == "rt-polaritydata"


def test_split_exports_give_the_same_data(tmp_path: Path) -> None:
    loaded = []
    for layout in ("rt-polaritydata", "csv", "jsonl"):
        generate_rotten_tomatoes(tmp_path / layout, n=21, seed=2, layout=layout)
        loaded.append(load_rotten_tomatoes(tmp_path / layout))
    for other in loaded[1:]:
        for split in ("train", "validation", "test"):
            assert getattr(other, split) == getattr(loaded[0], split)
    assert [len(loaded[0].train), len(loaded[0].validation), len(loaded[0].test)] == [34, 4, 4]
    assert [d.source for d in loaded] == ["rt-polaritydata", "csv", "jsonl"]
    tokens, label = loaded[0].train.examples()[0]
    assert label == 1 and tokens == loaded[0].train.texts[0].split()
    (tmp_path / "csv" / "test.csv").unlink()
    with pytest.raises(ConfigError, match=r"not test\.csv; export all three"):
        load_rotten_tomatoes(tmp_path / "csv")
    with pytest.raises(ConfigError, match="no Rotten Tomatoes found"):
        load_rotten_tomatoes(tmp_path / "nothing")
    (tmp_path / "rt-polaritydata" / "rt-polaritydata" / "rt-polarity.neg").write_text("x\n")
    with pytest.raises(ConfigError, match="21 positive but 1 negative"):
        load_rotten_tomatoes(tmp_path / "rt-polaritydata")


def test_parquet_without_pyarrow_says_so(tmp_path: Path, monkeypatch) -> None:
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match="needs pyarrow"):
        load_rotten_tomatoes(tmp_path)


# --- the staged model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> dict:
    """Tiny data, a tiny DistilBERT directory, its tokenizer and the tokenized splits."""
    root = tmp_path_factory.mktemp("text")
    generate_rotten_tomatoes(root / "data", n=60, seed=0)
    model_dir = write_tiny_model(root / "model", tiny_vocabulary(), seed=0)
    data = load_rotten_tomatoes(root / "data")
    tokenizer = load_tokenizer(model_dir)
    return {
        "root": root,
        "model_dir": model_dir,
        "data": data,
        "tokenizer": tokenizer,
        "train": tokenize_split(tokenizer, data.train, max_length=32),
    }


def test_model_dir_checks(staged: dict, tmp_path: Path) -> None:
    model_dir = staged["model_dir"]
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    assert check_model_dir(model_dir) == []
    assert check_model_dir(tmp_path) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json or vocab.txt",
    ]
    with pytest.raises(ConfigError, match="missing config.json, model.safetensors, tokenizer"):
        load_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no such directory"):
        load_tokenizer(tmp_path / "absent")
    # The WordPiece vocab.txt alone is a tokenizer too, and encodes the same.
    vocab_only = tmp_path / "vocab-only"
    vocab_only.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        (vocab_only / name).write_bytes((model_dir / name).read_bytes())
    assert check_model_dir(vocab_only) == []
    text = ["the movie is good , with its café ."]
    assert torch.equal(
        encode(load_tokenizer(vocab_only), text, 16), encode(staged["tokenizer"], text, 16)
    )
    ids = encode(staged["tokenizer"], text, 16)
    assert ids.shape == (1, 2, 16) and ids[0, 1].sum() == 11  # [CLS] 9 tokens [SEP]
    assert staged["tokenizer"].unk_token_id not in ids[0, 0].tolist()  # café -> cafe
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "vocab.txt"):
        (bad / name).write_bytes((model_dir / name).read_bytes())
    (bad / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ConfigError, match="cannot load it"):
        load_pretrained(bad)
    config = json.loads((model_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type 'bert', expected 'distilbert'"):
        load_pretrained(bad)


def test_load_pretrained_seeds_head_and_checkpoints(staged: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    rng_before = torch.get_rng_state()
    a, b, c = (load_pretrained(staged["model_dir"], seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.training and a.num_classes == 2
    saved = load_file(staged["model_dir"] / "model.safetensors")
    emb = "distilbert.embeddings.word_embeddings.weight"
    assert torch.equal(a.net.state_dict()[emb], saved[emb])
    head = "classifier.weight"
    assert torch.equal(a.net.state_dict()[head], b.net.state_dict()[head])
    assert not torch.equal(a.net.state_dict()[head], c.net.state_dict()[head])
    a.eval()
    batch = staged["train"].inputs[:5]
    logits = a(batch)
    assert logits.shape == (5, 2)
    assert torch.equal(logits, a(batch[:, 0], batch[:, 1]))
    # samat's checkpoint format takes the state dict as it is.
    write_checkpoint(tmp_path / "ckpt.safetensors", a.state_dict(), {"epoch": 1})
    tensors, meta = read_checkpoint(tmp_path / "ckpt.safetensors")
    c.load_state_dict(tensors)
    c.eval()
    assert meta == {"epoch": 1} and torch.equal(c(batch), logits)
    with pytest.raises(ValueError, match=r"\[N, 2, L\]"):
        a(batch[:, 0])


def full_loss(model, split) -> float:
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(split.inputs), split.labels).item()
    model.train()
    return loss


@pytest.fixture(scope="module")
def trained(staged: dict) -> dict:
    """Each method, 48 AdamW steps each from the same start: losses before and after."""
    out = {}
    for name, cfg in (
        ("standard", StandardMethod()),
        ("sam", SAMMethod(name="sam", rho=0.05)),
        ("asam", SAMMethod(name="asam", rho=0.5)),
    ):
        model = load_pretrained(staged["model_dir"], seed=0)
        torch.manual_seed(0)  # dropout
        method = create(cfg, make_adamw(model, 3e-3))
        loader = TokenLoader(staged["train"], 16, device="cpu", shuffle=True, seed=0)
        before = full_loss(model, staged["train"])
        for epoch in range(8):
            for inputs, labels in loader.epoch(epoch):
                result = method.step(model, inputs, labels)
        out[name] = (model, before, full_loss(model, staged["train"]), result)
    return out


def test_methods_step_the_text_model(trained: dict) -> None:
    for name in ("standard", "sam", "asam"):
        _, before, after, result = trained[name]
        assert before == pytest.approx(0.693, abs=0.01)  # a random head: chance
        assert after < 0.5 * before, (name, before, after)
        assert result.logits.shape[1] == 2 and result.loss.ndim == 0
    # SAM's and ASAM's second passes move the weights elsewhere than plain AdamW does.
    assert trained["standard"][2] != trained["sam"][2] != trained["asam"][2]


def test_token_loader_and_adamw_schedule(staged: dict) -> None:
    split = staged["train"]
    loader = TokenLoader(split, 40, device="cpu", shuffle=True, seed=5)
    first = list(loader.epoch(0))
    assert len(loader) == len(first) == 3
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == sorted(split.labels.tolist())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, loader.epoch(0), strict=True))
    assert not torch.equal(first[0][1], next(iter(loader.epoch(1)))[1])
    for inputs, _ in first:  # trimmed to the longest sequence of the batch
        assert inputs.shape[2] == int(inputs[:, 1].sum(1).max()) < 32
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = make_adamw(model, 1e-3, weight_decay=0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    schedule = linear_schedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    np.testing.assert_allclose(
        lrs, [0, 5e-4, 1e-3, 8.75e-4, 7.5e-4, 6.25e-4, 5e-4, 3.75e-4, 2.5e-4, 1.25e-4]
    )


def test_victim_probabilities(trained: dict, staged: dict) -> None:
    model = trained["standard"][0]
    victim = TextVictim(model, staged["tokenizer"], max_length=32, batch_size=3)
    texts = [t.split() for t in staged["data"].test.texts[:5]]
    probs = victim(texts)
    assert probs.shape == (5, 2) and model.training
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(
            model(encode(staged["tokenizer"], [" ".join(t) for t in texts], 32)), -1
        )
    model.train()
    np.testing.assert_allclose(probs, expected.double().numpy(), atol=1e-5)


# --- the attacks --------------------------------------------------------------------------------


def test_goal_counts_queries_like_textattack() -> None:
    victim = Victim(bag({"good": 1.0}))
    goal = Goal(victim, label=1)
    scores = goal.scores([["good"], ["good"], ["fine", "good"]])
    np.testing.assert_allclose(scores, [1 - 1 / (1 + np.exp(-1))] * 3)
    assert goal.n_queries == 3 and victim.seen == [("good",), ("fine", "good")]
    goal.scores([["good"]])
    assert goal.n_queries == 4 and len(victim.seen) == 2


@pytest.mark.parametrize("make", [IGA, PSO], ids=["iga", "pso"])
def test_attack_finds_the_one_flipping_synonym(make) -> None:
    victim = Victim(bag({"good": 2.0, "fine": 1.5, "nice": 1.0, "okay": -1.0, "film": 0.5}))
    attack = make({"good": ["fine", "nice", "okay"], "movie": ["film"], "the": ["a"]})
    result = attack(toks("the movie is good ."), 1, victim, seed=0)
    assert result.status == SUCCEEDED and result.adversarial == tuple(toks("the movie is okay ."))
    # The original, film, and the three substitutes of good: it stops at the success.
    assert result.n_queries == 5
    assert result.n_words == 4 and result.n_perturbed == 1 and result.perturbed_rate == 0.25
    assert victim.seen[0] == tuple(toks("the movie is good ."))


@pytest.mark.parametrize("make", [IGA, PSO], ids=["iga", "pso"])
def test_attack_obeys_its_constraints_and_seed(make) -> None:
    attack = make(CANDIDATES)
    victim = Victim(robust)
    result = attack(SENTENCE, 1, victim, seed=7)
    assert result.status == "failed"
    # IGA replaces a position up to 5 times (a substitute's substitutes too); PSO only once.
    hops = 5 if make is IGA else 1
    changed = [check_text(text, hops) for text in victim.seen]
    assert max(changed) >= 2 and check_text(result.adversarial, hops) >= 1
    if make is PSO:
        assert all("superb" not in text for text in victim.seen)
    else:
        assert any("superb" in text for text in victim.seen)
    again = make(CANDIDATES)(SENTENCE, 1, Victim(robust), seed=7)
    assert again == result
    other = make(CANDIDATES)(SENTENCE, 1, Victim(robust), seed=8)
    assert other.n_queries != result.n_queries or other.adversarial != result.adversarial
    # An easy victim (any substitution flips it) stops the search early.
    easy = make(CANDIDATES)(SENTENCE, 1, Victim(lambda t: 0.9 if t == SENTENCE else 0.1), seed=7)
    assert easy.success and easy.n_queries < 20 < result.n_queries / 10


def test_iga_respects_the_perturbed_words_bound() -> None:
    # 15 words: at most ceil(0.2 * 15) = 3 may differ; with the post-crossover check, no text
    # IGA asks about differs in more (TextAttack's recipe leaves that check off).
    victim = Victim(robust)
    config = IGAConfig(post_crossover_check=True)
    result = IGA(CANDIDATES, config)(SENTENCE, 1, victim, seed=1)
    counts = [check_text(text, 5) for text in victim.seen]
    assert max(counts) == 3 and result.n_perturbed == 3
    assert IGAConfig() == IGAConfig(60, 20, 5, 0.2, 0.3, False, 20, False)
    assert PSOConfig() == PSOConfig(60, 20, 0.8, 0.2, 0.8, 0.2, 3.0, False)


def test_pso_reference_turn_and_skips() -> None:
    victim = Victim(robust)
    result = PSO(CANDIDATES, PSOConfig(reference_turn=True, max_iters=5))(
        SENTENCE, 1, victim, seed=0
    )
    assert result.status == "failed" and all(check_text(t, 1) >= 0 for t in victim.seen)
    skipped = PSO(CANDIDATES)(SENTENCE, 0, Victim(robust), seed=0)
    assert skipped.status == SKIPPED and skipped.n_queries == 1


def test_summary_and_dataset_runner() -> None:
    words = ("a", "good", "film", ",", "really")
    results = [
        AttackResult(words, 1, SUCCEEDED, ("a", "fine", "film", ",", "really"), 10),
        AttackResult(words, 1, SUCCEEDED, ("a", "fine", "movie", ",", "really"), 30),
        AttackResult(words, 1, "failed", words, 50),
        AttackResult(words, 0, SKIPPED, words, 1),
    ]
    summary = summarize(results)
    assert (summary.n_succeeded, summary.n_failed, summary.n_skipped) == (2, 1, 1)
    assert summary.success_rate == pytest.approx(200 / 3)
    assert summary.clean_accuracy == 75.0 and summary.robust_accuracy == 25.0
    assert summary.mean_queries == 30.0 and summary.mean_perturbed_rate == pytest.approx(0.375)
    examples = [(toks("the movie is good ."), 1), (SENTENCE, 1)]
    attack = PSO(CANDIDATES)
    runs = attack_dataset(attack, examples, Victim(robust), seed=3)
    alone = attack(SENTENCE, 1, Victim(robust), seed=example_seed(3, 1))
    assert runs[1] == alone and example_seed(3, 0) != example_seed(3, 1)


def test_attacks_on_the_tiny_model(trained: dict, staged: dict) -> None:
    model = trained["sam"][0]
    root = write_tiny_resources(staged["root"] / "resources", tiny_vocabulary(), seed=0)
    victim = TextVictim(model, staged["tokenizer"], max_length=32)
    examples = staged["data"].test.examples()[:6:2] + staged["data"].test.examples()[6::2]
    for attack in (
        IGA(EmbeddingSynonyms(load_counterfitted(root))),
        PSO(SememeSynonyms(load_hownet_candidates(root))),
    ):
        results = attack_dataset(attack, examples, victim, seed=0)
        summary = summarize(results)
        assert summary.n_examples == 6 and summary.n_succeeded >= 1
        for r in results:
            if r.success:  # the model really is fooled, and only non-stop words changed
                assert np.argmax(victim([list(r.adversarial)])[0]) != r.label
                assert all(
                    a == b or (a not in STOPWORDS and b not in STOPWORDS)
                    for a, b in zip(r.original, r.adversarial, strict=True)
                )
