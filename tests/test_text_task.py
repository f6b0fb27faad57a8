"""samat.text.task: generation, build, the loader's resume, evaluation records and their resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from samat import attacks
from samat.config import ConfigError, validate_run
from samat.evaluate import Interrupted, StopFlag
from samat.store import RunDir, record_keys
from samat.text import (
    PSO,
    EmbeddingSynonyms,
    IGAConfig,
    PSOConfig,
    SememeSynonyms,
    TextVictim,
    TokenLoader,
    attack_dataset,
    load_counterfitted,
    load_hownet_candidates,
    load_rotten_tomatoes,
    make_adamw,
    require_model_dir,
    summarize,
)
from samat.text.iga import IGA
from samat.text.task import TASK, _publish, generate_staged

ATTACKS = [
    {"attack": "pso", "options": {"pop_size": 6, "max_iters": 3}},
    {"attack": "iga", "options": {"pop_size": 6, "max_iters": 3}},
]


def text_config(root: Path, **overrides: Any):
    data = {
        "data": {
            "name": "rotten_tomatoes",
            "root": str(root / "data"),
            "max_length": 24,
            "generate": {"n_examples": 40, "seed": 0},
        },
        "model": {"name": "distilbert", "pretrained": str(root / "model")},
        "train": {"epochs": 1, "batch_size": 16},
        "eval": {"n_examples": 8, "batch_size": 64, "attacks": copy.deepcopy(ATTACKS)},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_run(data)


def strip_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("seconds", "finished")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """A generated root, built, and the model trained to a clean accuracy above chance."""
    root = tmp_path_factory.mktemp("text-task")
    config = text_config(root)
    written = generate_staged(config)
    dataset, model = TASK.build(config, "cpu")
    torch.manual_seed(0)
    optimizer = make_adamw(model, 5e-3)
    loader = TASK.loader(config, dataset, "cpu")
    for epoch in range(4):
        for inputs, labels in loader.epoch(epoch):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    run = RunDir(root / "run")
    records = TASK.evaluate(run, config, model, dataset, checkpoint="last", stop=None)
    return {
        "root": root,
        "config": config,
        "written": written,
        "dataset": dataset,
        "model": model,
        "run": run,
        "records": records,
    }


# -- generation ----------------------------------------------------------------------------------


def test_generation_writes_the_real_layouts(built: dict, tmp_path: Path) -> None:
    root = built["root"]
    data, model = root / "data", root / "model"
    assert built["written"] == [
        data / "rt-polaritydata",
        model,
        data / "hownet-candidates.json",
        data / "counter-fitted-vectors.txt",
    ]
    assert sorted(p.name for p in (data / "rt-polaritydata").iterdir()) == [
        "rt-polarity.neg",
        "rt-polarity.pos",
    ]
    # the real loaders read it: 40 per polarity split 32 / 4 / 4, positives first
    loaded = load_rotten_tomatoes(data)
    assert (len(loaded.train), len(loaded.validation), len(loaded.test)) == (64, 8, 8)
    assert loaded.source == "rt-polaritydata" and loaded.test.labels == (1,) * 4 + (0,) * 4
    require_model_dir(model)
    hownet, vectors = load_hownet_candidates(data), load_counterfitted(data)
    assert hownet["good"] and set(EmbeddingSynonyms(vectors)("good")) == set(hownet["good"])
    # nothing is left behind, and a second call writes nothing
    assert not [p for p in (*data.iterdir(), *root.iterdir()) if p.name.startswith(".")]
    assert generate_staged(built["config"]) == []
    # the same seed elsewhere writes the same bytes; an option's path is where its file goes
    other = text_config(
        tmp_path,
        eval={"attacks": [{"attack": "iga", "options": {"embeddings": str(tmp_path / "v.txt")}}]},
    )
    assert generate_staged(other)[-1] == tmp_path / "v.txt"
    for a, b in [
        ("data/rt-polaritydata/rt-polarity.pos", "data/rt-polaritydata/rt-polarity.pos"),
        ("model/model.safetensors", "model/model.safetensors"),
        ("model/tokenizer.json", "model/tokenizer.json"),
        ("data/counter-fitted-vectors.txt", "v.txt"),
    ]:
        assert (root / a).read_bytes() == (tmp_path / b).read_bytes(), a
    reseeded = text_config(tmp_path / "s", data={"generate": {"n_examples": 40, "seed": 1}})
    generate_staged(reseeded)
    pos = "data/rt-polaritydata/rt-polarity.pos"
    assert (tmp_path / "s" / pos).read_bytes() != (root / pos).read_bytes()


def test_publish_keeps_what_a_concurrent_run_placed_first(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def make(scratch: Path) -> Path:
        (scratch / "mine").mkdir()
        (scratch / "mine" / "f").write_text("mine")
        target.mkdir()  # the other run renames its copy into place meanwhile
        (target / "f").write_text("theirs")
        return scratch / "mine"

    assert _publish(target, make) is False
    assert (target / "f").read_text() == "theirs" and sorted(tmp_path.iterdir()) == [target]
    assert _publish(tmp_path / "new", lambda s: (s / "x").mkdir() or s / "x") is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]


# -- build and loader ----------------------------------------------------------------------------


def test_build_tokenizes_the_generated_root(built: dict, tmp_path: Path) -> None:
    dataset, model = built["dataset"], built["model"]
    assert dataset.train.inputs.shape == (64, 2, 24) and dataset.test.inputs.shape == (8, 2, 24)
    assert dataset.validation is None and dataset.num_classes == 2
    assert dataset.test.labels.tolist() == list(dataset.sentences.test.labels)
    first = dataset.tokenizer(dataset.sentences.test.texts[0])["input_ids"]
    assert dataset.test.inputs[0, 0, : len(first)].tolist() == first
    assert next(model.parameters()).device.type == "cpu"
    # train_size / test_size: a fixed draw (both classes), not the first (all positive) ones
    config = text_config(built["root"], data={"train_size": 10, "test_size": 6})
    small, again = TASK.build(config, "cpu")[0], TASK.build(config, "cpu")[0]
    assert len(small.train.labels) == 10 and len(small.test.labels) == 6
    assert set(small.train.labels.tolist()) == {0, 1}  # the first 10 are all positive
    assert small.sentences.test == again.sentences.test
    assert set(small.sentences.train.texts) <= set(dataset.sentences.train.texts)
    with pytest.raises(ConfigError, match=r"data.test_size 9 exceeds the 8 examples"):
        TASK.build(text_config(built["root"], data={"test_size": 9}), "cpu")
    # without generate, a missing model directory is the loader's one-line error
    plain = text_config(tmp_path, data={"root": str(built["root"] / "data"), "generate": None})
    with pytest.raises(ConfigError, match=r"^model.pretrained .*: no such directory") as error:
        TASK.build(plain, "cpu")
    assert "\n" not in str(error.value)


def test_token_loader_start_skips_exactly(built: dict) -> None:
    loader = TokenLoader(built["dataset"].train, 10, device="cpu", shuffle=True, seed=3)
    full = list(loader.epoch(2))
    assert len(full) == 7
    for start in (0, 1, 4, 6):
        rest = list(loader.epoch(2, start))
        assert len(rest) == 7 - start
        for (a, y), (b, z) in zip(rest, full[start:], strict=True):
            assert torch.equal(a, b) and torch.equal(y, z)
    assert list(loader.epoch(2, 7)) == []


# -- evaluation ----------------------------------------------------------------------------------


def _reference(built: dict, make, settings, resource) -> list:
    """The attack run by hand over the subset (the first 8: seeds by test index = position)."""
    config, dataset = built["config"], built["dataset"]
    examples = dataset.sentences.test.examples()[: config.eval.n_examples]
    victim = TextVictim(built["model"], dataset.tokenizer, max_length=24)
    return attack_dataset(make(resource, settings), examples, victim, seed=config.seed)


def test_evaluate_stores_one_record_per_attack(built: dict) -> None:
    records, run, config = built["records"], built["run"], built["config"]
    assert list(records) == ["natural", "natural_subset", "PSO", "IGA"]
    keys = record_keys(config)
    for label, record in records.items():
        assert run.eval_record(keys[label]) == record
    assert records["natural"]["total"] == 8 and records["natural"]["accuracy"] >= 0.75
    data = built["root"] / "data"
    pso = _reference(
        built, PSO, PSOConfig(pop_size=6, max_iters=3), SememeSynonyms(load_hownet_candidates(data))
    )
    iga = _reference(
        built, IGA, IGAConfig(pop_size=6, max_iters=3), EmbeddingSynonyms(load_counterfitted(data))
    )
    for label, results in (("PSO", pso), ("IGA", iga)):
        record, summary = records[label], summarize(results)
        assert record["success_rate"] == summary.success_rate / 100
        assert record["queries"] == summary.mean_queries
        assert record["perturbed_rate"] == summary.mean_perturbed_rate
        assert record["accuracy"] == summary.robust_accuracy / 100 == record["correct"] / 8
        assert record["clean_accuracy"] == records["natural_subset"]["accuracy"]
        assert (record["succeeded"], record["failed"], record["skipped"]) == (
            summary.n_succeeded,
            summary.n_failed,
            summary.n_skipped,
        )
        assert [e["status"] for e in record["examples"]] == [r.status for r in results]
        assert [e["adversarial"] for e in record["examples"]] == [
            list(r.adversarial) for r in results
        ]
        assert 0 < record["success_rate"] < 1 and record["kind"] == "attack"
        spec = attacks.resolve(config.eval.attacks)[0 if label == "PSO" else 1]
        assert record["attack"] == attacks.canonical(spec)
    summary = TASK.summary(records)
    assert summary["robust"] == {
        "PSO": records["PSO"]["success_rate"],
        "IGA": records["IGA"]["success_rate"],
    }
    assert summary["natural"] == records["natural"]["accuracy"]
    assert summary["average_robust"] is None and summary["robust_examples"] == 8
    assert summary["text_attacks"]["IGA"] == {
        "success_rate": records["IGA"]["success_rate"],
        "queries": records["IGA"]["queries"],
        "perturbed_rate": records["IGA"]["perturbed_rate"],
        "robust_accuracy": records["IGA"]["accuracy"],
    }
    assert built["model"].training  # evaluation leaves the mode as it found it


def test_evaluate_resumes_after_an_interruption(built: dict, tmp_path: Path, monkeypatch) -> None:
    attacked: list[tuple[str, ...]] = []
    stop = StopFlag()
    real = PSO.__call__

    def counting(self, tokens, label, victim, *, seed=0):
        attacked.append(tuple(tokens))
        if len(attacked) == 3:
            stop.set(15)  # a time-limit signal during the third example
        return real(self, tokens, label, victim, seed=seed)

    monkeypatch.setattr(PSO, "__call__", counting)
    config, dataset, model = built["config"], built["dataset"], built["model"]
    run = RunDir(tmp_path / "run")
    with pytest.raises(Interrupted):
        TASK.evaluate(run, config, model, dataset, checkpoint="last", stop=stop)
    keys = record_keys(config)
    assert run.eval_record(keys["PSO"]) is None and run.eval_record(keys["natural"]) is not None
    assert len(run.eval_progress(keys["PSO"])["results"]) == 3
    records = TASK.evaluate(run, config, model, dataset, checkpoint="last", stop=StopFlag())
    tokens = [t.split() for t in dataset.sentences.test.texts[:8]]
    assert attacked == [tuple(t) for t in tokens]  # 3 before the stop, 5 after: none twice
    assert run.eval_progress(keys["PSO"]) == {}
    for label in ("PSO", "IGA"):
        assert strip_times(records[label]) == strip_times(built["records"][label])
    # a finished record is reused: nothing is attacked again
    monkeypatch.setattr(PSO, "__call__", None)
    monkeypatch.setattr(IGA, "__call__", None)
    assert TASK.evaluate(run, config, model, dataset, checkpoint="last", stop=None) == records


def test_attack_options_and_resources_are_one_line_errors(built: dict, tmp_path: Path) -> None:
    def config(attack: dict, generate: bool = False):
        overrides: dict[str, Any] = {"eval": {"attacks": [attack]}}
        if not generate:
            overrides["data"] = {"root": str(built["root"] / "data"), "generate": None}
            overrides["model"] = {"pretrained": str(built["root"] / "model")}
        return text_config(tmp_path, **overrides)

    missing = tmp_path / "nowhere" / "vectors.txt"
    cases = [
        (
            {"attack": "iga", "options": {"embeddings": str(missing)}},
            rf"^attack 'IGA': options.embeddings {missing}: no counter-fitted-vectors.txt there",
        ),
        (
            {"attack": "pso", "options": {"pop_size": 0}},
            r"^attack 'PSO': options.pop_size 0 is not a valid integer \(default 60\)",
        ),
        (
            {"attack": "iga", "options": {"max_rate": 1.5}},
            r"^attack 'IGA': options.max_rate 1.5 is not a valid number",
        ),
        ({"attack": "pso", "options": {"embeddings": "x"}}, r"unknown options \['embeddings'\]"),
    ]
    for attack, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            TASK.build(config(attack), "cpu")
        assert "\n" not in str(error.value)
    # an unset option's default under data.root, named as such
    bare = tmp_path / "bare"
    generate_staged(text_config(bare, eval={"attacks": []}))
    unset = text_config(bare, data={"generate": None}, eval={"attacks": [{"attack": "pso"}]})
    with pytest.raises(ConfigError, match=r"options.hownet \(unset: its default under data.root"):
        TASK.build(unset, "cpu")


def test_a_text_run_refuses_adversarial_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="perturbs pixels; a text run's inputs are tokens"):
        text_config(tmp_path, method={"name": "pgd_at"})


def test_records_are_json(built: dict) -> None:
    for record in built["records"].values():
        assert json.loads(json.dumps(record)) == record


# -- end to end ----------------------------------------------------------------------------------


def test_text_tiny_grid_runs_and_resumes_bit_identically(tmp_path: Path, monkeypatch) -> None:
    """configs/examples/text_tiny.yaml, shrunk (8 examples attacked, not 20), through
    samat.train.execute: generated files, training, both attacks, result.json; SAM stopped
    mid-epoch and resumed ends with the uninterrupted run's weights and numbers."""
    import yaml

    from samat.grid import RunSpec, run_id, set_dotted
    from samat.store import CHECKPOINT, prepare, read_checkpoint
    from samat.text import data as text_data
    from samat.train import execute

    example = Path(__file__).resolve().parents[1] / "configs" / "examples" / "text_tiny.yaml"
    grid = yaml.safe_load(example.read_text())
    monkeypatch.chdir(tmp_path)  # the example's relative data.root and model.pretrained
    base = grid["base"]
    base["eval"]["n_examples"] = 8

    def make_run(variant: dict, out: str) -> RunDir:
        data = copy.deepcopy(base)
        for key, value in variant.items():
            set_dotted(data, key, value)
        config = validate_run({**data, "seed": grid["seeds"][0]})
        rid = run_id(config)
        return prepare(RunSpec(rid, config, variant["method.name"], tmp_path / out / rid))

    standard, sam = (make_run(v, "a") for v in grid["variants"])
    results = [execute(standard.path), execute(sam.path)]
    for result in results:
        assert result["task"] == "text" and result["metric"] == "accuracy"
        assert result["natural"] >= 0.75 and set(result["robust"]) == {"PSO", "IGA"}
        for label, rate in result["robust"].items():
            assert 0 <= rate <= 1 and result["text_attacks"][label]["success_rate"] == rate
    assert (tmp_path / "data/generated/text-tiny/rotten_tomatoes/rt-polaritydata").is_dir()

    stop = StopFlag()
    real = text_data.TokenLoader.epoch

    def epoch(self, number: int, start: int = 0):
        for i, batch in enumerate(real(self, number, start), start):
            if (number, i) == (1, 1):
                stop.set(15)  # a time-limit signal during epoch 2's second step
            yield batch

    monkeypatch.setattr(text_data.TokenLoader, "epoch", epoch)
    resumed = make_run(grid["variants"][1], "b")
    with pytest.raises(Interrupted):
        execute(resumed.path, stop=stop)
    assert read_checkpoint(resumed.file(CHECKPOINT))[1]["step"] == 2
    result = execute(resumed.path)
    assert "resumed from epoch 1 step 2" in resumed.file("log").read_text()
    a, b = (read_checkpoint(r.file(CHECKPOINT))[0] for r in (sam, resumed))
    weights = [k for k in a if k.startswith("model.")]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)
    assert result["natural"] == results[1]["natural"] and result["robust"] == results[1]["robust"]
