"""Guards for samat.evaluate and samat.attacks.kinds found by mutation testing
(docs/mutation.md): each test fails on a change that the other tests let through."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from samat.attacks import canonical
from samat.attacks.kinds import default_alpha
from samat.config import AttackSpec, validate_run
from samat.data import Split
from samat.evaluate import Interrupted, StopFlag, evaluate_run, subset_indices
from samat.grid import RunSpec, run_id
from samat.store import RunDir, prepare, record_keys
from tests.conftest import TINY_BASE

N, CLASSES = 20, 4
LABELS = torch.arange(N) % CLASSES
# the model below is wrong exactly on the images whose number is a multiple of 5
WRONG = {0, 5, 10, 15}


class Lookup(nn.Module):
    """Reads each image's number from its first pixel (3 * i / 255) and answers its label,
    except on WRONG; a pixel off the 1/255 grid gets a wrong answer. Counts its forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        levels = x.flatten(1)[:, 0] * 255
        numbers = (levels / 3).round().long()
        right = (numbers % 5 != 0) & ((levels - levels.round()).abs() < 0.01)
        answers = torch.where(right, numbers % CLASSES, (numbers + 1) % CLASSES)
        one_hot = nn.functional.one_hot(answers, CLASSES).float() * 10
        return one_hot + x.sum() * 0 + self.weight * 0  # differentiable in x


def split() -> Split:
    images = torch.zeros(N, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(N, dtype=torch.uint8) * 3
    return Split(images, LABELS.clone())


def expected_accuracy(index: list[int]) -> float:
    return sum(i not in WRONG for i in index) / len(index)


# eps 0: the attacked images are the clean ones, so robust accuracy = clean accuracy
FGSM = {"attack": "fgsm", "norm": "linf", "eps": 0.0, "label": "F"}


def make_run(tmp_path: Path, attacks: list[dict], **eval_changes: Any) -> RunDir:
    data = copy.deepcopy(TINY_BASE)
    data["eval"] = {**data["eval"], "attacks": attacks, "batch_size": 3, **eval_changes}
    config = validate_run(data)
    rid = run_id(config)
    return prepare(RunSpec(rid, config, "SGD", tmp_path / rid))


@pytest.mark.parametrize("subset_seed", [None, 3])
def test_records_count_right_answers_and_say_what_they_measured(
    tmp_path, caplog, subset_seed
) -> None:
    run = make_run(tmp_path, [FGSM], n_examples=10, subset_seed=subset_seed)
    config = run.config()
    model = Lookup()
    with caplog.at_level(logging.INFO, logger="samat.evaluate"):
        records = evaluate_run(run, config, model, split(), num_classes=CLASSES, checkpoint="last")
    keys = record_keys(config)
    index = subset_indices(N, 10, subset_seed).tolist()
    assert list(records) == ["natural", "natural_subset", "F"]

    natural = records["natural"]
    assert natural["key"] == keys["natural"] and natural["label"] == "Natural"
    assert (natural["kind"], natural["images"], natural["checkpoint"]) == ("clean", "all", "last")
    assert (natural["correct"], natural["total"]) == (N - len(WRONG), N)
    assert natural["accuracy"] == expected_accuracy(list(range(N)))

    images_key = {"n_examples": 10, "subset_seed": subset_seed, "seed": 0, "checkpoint": "last"}
    subset = records["natural_subset"]
    assert subset["key"] == keys["natural_subset"]
    assert subset["label"] == "Natural (attacked images)" and subset["kind"] == "clean"
    assert {k: subset[k] for k in images_key} == images_key
    assert subset["total"] == 10 and subset["accuracy"] == expected_accuracy(index)

    attack = records["F"]
    assert attack["key"] == keys["F"] and attack["label"] == "F" and attack["kind"] == "attack"
    assert attack["attack"] == canonical(AttackSpec(**FGSM))
    assert {k: attack[k] for k in images_key} == images_key
    assert attack["total"] == 10 and attack["accuracy"] == expected_accuracy(index)
    assert attack["correct"] == round(10 * expected_accuracy(index))
    assert f"robust accuracy F: {attack['accuracy']:.4f}" in caplog.messages
    progress = [m for m in caplog.messages if m.startswith("attack F: ")]
    assert progress == ["attack F: 3/10", "attack F: 6/10", "attack F: 9/10", "attack F: 10/10"]
    for record in records.values():
        assert 0 <= record["seconds"] < 60 and record["finished"] > 0
        assert run.eval_record(record["key"]) == {k: v for k, v in record.items()}
    assert not (run.eval_dir() / f"{keys['F']}.partial.json").exists()


def test_stored_records_are_reused_not_recomputed(tmp_path) -> None:
    run = make_run(tmp_path, [FGSM], n_examples=10)
    first = evaluate_run(
        run, run.config(), Lookup(), split(), num_classes=CLASSES, checkpoint="last"
    )
    model = Lookup()
    again = evaluate_run(run, run.config(), model, split(), num_classes=CLASSES, checkpoint="last")
    assert model.calls == 0
    assert again == first


class StopAfter(Lookup):
    """Sets the stop flag during its `after`-th forward (a signal arriving mid-attack)."""

    def __init__(self, stop: StopFlag, after: int) -> None:
        super().__init__()
        self.stop, self.after = stop, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.calls == self.after:
            self.stop.set(15)
        return out


def test_a_stop_mid_attack_keeps_the_finished_batches_and_resumes(tmp_path, caplog) -> None:
    run = make_run(tmp_path, [FGSM], n_examples=10, subset_seed=3)
    config, key = run.config(), record_keys(run.config())["F"]
    stop = StopFlag()
    # forwards: 7 + 4 clean batches (20 and 10 images by 3), then per attacked batch one for
    # the gradient and one for counting: the 12th forward is in the first attacked batch
    model = StopAfter(stop, after=12)
    with pytest.raises(Interrupted) as stopped:
        evaluate_run(run, config, model, split(), num_classes=CLASSES, checkpoint="last", stop=stop)
    assert stopped.value.signum == 15 and "signal 15" in str(stopped.value)
    progress = run.eval_progress(key)
    assert progress["key"] == key and list(progress["batches"]) == ["0"]
    assert run.eval_record(key) is None

    assert progress["seconds"] > 0
    # the time spent before the stop counts: pretend it was long
    run.save_eval_progress(key, {**progress, "seconds": 1000.0})
    model = Lookup()
    with caplog.at_level(logging.INFO, logger="samat.evaluate"):
        resumed = evaluate_run(run, config, model, split(), num_classes=CLASSES, checkpoint="last")
    assert "attack F: resuming at 1 of 4 batches" in caplog.messages
    assert model.calls == 2 * 3  # the three missing batches only, clean records reused
    assert resumed["F"]["accuracy"] == expected_accuracy(subset_indices(N, 10, 3).tolist())
    assert 1000 <= resumed["F"]["seconds"] < 1060


def test_progress_of_another_key_is_ignored(tmp_path) -> None:
    """Kills: a progress file whose key differs (another request) taken as this one's."""
    run = make_run(tmp_path, [FGSM], n_examples=10)
    key = record_keys(run.config())["F"]
    run.save_eval_progress(key, {"key": "other", "batches": {"0": 3, "1": 3}, "seconds": 1000.0})
    records = evaluate_run(
        run, run.config(), Lookup(), split(), num_classes=CLASSES, checkpoint="last"
    )
    assert records["F"]["accuracy"] == expected_accuracy(list(range(10)))
    assert records["F"]["seconds"] < 60


def test_a_stop_during_the_last_but_one_batch_stops_before_the_last(tmp_path) -> None:
    """Kills: the stop check skipped for more than the last batch."""
    run = make_run(tmp_path, [FGSM], n_examples=10, subset_seed=3)
    stop = StopFlag()
    model = StopAfter(stop, after=11 + 2 * 2 + 1)  # the gradient forward of batch 2 of 0..3
    with pytest.raises(Interrupted):
        evaluate_run(
            run, run.config(), model, split(), num_classes=CLASSES, checkpoint="last", stop=stop
        )
    assert list(run.eval_progress(record_keys(run.config())["F"])["batches"]) == ["0", "1", "2"]


def test_a_stop_during_the_last_batch_lets_the_attack_finish(tmp_path) -> None:
    """Kills: the stop check also made after the last batch (the finished attack would then
    be left unrecorded)."""
    run = make_run(tmp_path, [FGSM], n_examples=10)
    stop = StopFlag()
    model = StopAfter(stop, after=11 + 2 * 3 + 1)  # the gradient forward of the last batch
    records = evaluate_run(
        run, run.config(), model, split(), num_classes=CLASSES, checkpoint="last", stop=stop
    )
    assert stop.signum == 15
    assert run.eval_record(records["F"]["key"])["total"] == 10


def test_a_stop_before_an_attack_raises_before_attacking(tmp_path) -> None:
    run = make_run(tmp_path, [FGSM], n_examples=10)
    stop = StopFlag()
    stop.set(10)
    model = Lookup()
    with pytest.raises(Interrupted):
        evaluate_run(
            run, run.config(), model, split(), num_classes=CLASSES, checkpoint="last", stop=stop
        )
    assert model.calls == 7 + 4  # the two clean records only
    assert run.eval_progress(record_keys(run.config())["F"]) == {}


def test_stop_flag() -> None:
    stop = StopFlag()
    assert stop.signum is None
    stop.check()
    stop.set(2, frame=None)
    assert stop.signum == 2
    with pytest.raises(Interrupted) as error:
        stop.check()
    assert error.value.signum == 2 and str(error.value) == "stopped by signal 2"


def test_corruptions_are_one_whole_subset_record(tmp_path) -> None:
    spec = {
        "attack": "corruptions",
        "label": "C",
        "options": {"corruptions": ["brightness"], "severities": [1]},
    }
    run = make_run(tmp_path, [spec], n_examples=6)
    images = torch.zeros(N, 3, 8, 8, dtype=torch.uint8)
    labels = torch.zeros(N, dtype=torch.int64)
    labels[[3, 4]] = 1  # two of the six attacked images are of class 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))  # always class 0: every answer right
    records = evaluate_run(
        run, run.config(), model, Split(images, labels), num_classes=2, checkpoint="best"
    )
    record = records["C"]
    assert record["key"] == record_keys(run.config())["C"] and record["label"] == "C"
    assert record["kind"] == "attack" and record["checkpoint"] == "best"
    assert record["accuracy"] == pytest.approx(4 / 6) and record["total"] == 6
    assert record["details"]["per_corruption"] == {"brightness": {1: pytest.approx(4 / 6)}}
    assert record["details"]["source"] == "generated"
    assert 0 <= record["seconds"] < 60 and record["finished"] > 0
    stored = run.eval_record(record["key"])
    assert stored["accuracy"] == record["accuracy"] and stored["label"] == "C"


def test_default_alpha_is_a_quarter_for_linf_and_an_eighth_for_l2() -> None:
    assert default_alpha("linf", 0.4) == pytest.approx(0.1)
    assert default_alpha("l2", 0.4) == pytest.approx(0.05)


def test_attack_builders_get_the_runs_classes_seed_batch_size_and_positions(
    tmp_path, monkeypatch
) -> None:
    """Kills: the per-batch attack built without the task's class count or the run's seed
    (AutoAttack, FAB and Square read them); corruptions evaluated at another batch size, with
    seed 0, or without the test-set positions of the subset (CIFAR-10-C rows are read by them)."""
    from samat.attacks import corruptions, runner

    corruption = {"attack": "corruptions", "label": "C", "options": {"severities": [1]}}
    run = make_run(tmp_path, [FGSM, corruption], n_examples=6, subset_seed=3)
    config = run.config().model_copy(update={"seed": 7})
    built, measured = [], []
    real_build = runner.build

    def build(spec, model, **kwargs):
        built.append(kwargs)
        return real_build(spec, model, **kwargs)

    def corruption_accuracy(model, images, labels, **kwargs):
        measured.append(kwargs)
        return {"accuracy": 0.5, "source": "generated"}

    monkeypatch.setattr(runner, "build", build)
    monkeypatch.setattr(corruptions, "corruption_accuracy", corruption_accuracy)
    evaluate_run(run, config, Lookup(), split(), num_classes=CLASSES, checkpoint="last")
    assert built == [{"num_classes": CLASSES, "seed": 7}]
    assert measured == [
        {
            "indices": subset_indices(N, 6, 3).tolist(),
            "batch_size": 3,
            "seed": 7,
            "severities": [1],
        }
    ]
    assert subset_indices(N, 6, 3).tolist() != list(range(6))


def test_an_attack_reports_no_more_seconds_than_it_took(tmp_path) -> None:
    """Kills: a fresh attack's time starting at 1 s instead of 0 (the bound is the wall time of
    the whole call, so a loaded machine cannot make it fail)."""
    for warm_up in (True, False):  # the first call imports the attack modules
        run = make_run(tmp_path / str(warm_up), [FGSM], n_examples=6)
        began = time.perf_counter()
        records = evaluate_run(
            run, run.config(), Lookup(), split(), num_classes=CLASSES, checkpoint="last"
        )
    assert 0 < records["F"]["seconds"] <= time.perf_counter() - began
