"""Guards for samat.train found by mutation testing (docs/mutation.md): each test fails on a
change that the other tests let through, and says which."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import samat.train
from samat.attacks import canonical, label
from samat.config import AttackSpec, ConfigError, OptimizerConfig, ScheduleConfig, validate_run
from samat.data import DeviceLoader, Split
from samat.evaluate import Interrupted, StopFlag
from samat.grid import RunSpec, run_id
from samat.methods import create
from samat.store import CHECKPOINT, CHECKPOINT_BEST, prepare, read_checkpoint
from samat.tasks import accuracy_summary
from samat.train import (
    Position,
    TrainingError,
    _method_state,
    _nan_guard,
    _restore_method,
    _result,
    _resume,
    _save,
    _select_checkpoint,
    _set_determinism,
    _validate,
    accuracy,
    checkpoint_tensors,
    execute,
    lr_factor,
    make_optimizer,
    restore_checkpoint,
    slurm_job_id,
    thread_count,
    validation_attack,
)
from tests.conftest import TINY_BASE, set_state


def run_config(**changes: object):
    data = copy.deepcopy(TINY_BASE)
    data.update(changes)
    return validate_run(data)


# -- lr schedule ----------------------------------------------------------------------------------


def test_multistep_drops_by_gamma_at_each_milestone_fraction() -> None:
    schedule = ScheduleConfig(name="multistep", milestones=[0.5, 0.8], gamma=0.2)
    factors = [lr_factor(schedule, epoch, 10) for epoch in range(10)]
    assert factors == pytest.approx([1] * 5 + [0.2] * 3 + [0.04] * 2)


def test_cosine_and_constant_schedules() -> None:
    cosine = ScheduleConfig(name="cosine")
    for epoch in range(8):
        expected = 0.5 * (1 + math.cos(math.pi * epoch / 8))
        assert lr_factor(cosine, epoch, 8) == pytest.approx(expected)
    constant = ScheduleConfig(name="constant")
    assert [lr_factor(constant, e, 8) for e in range(8)] == [1.0] * 8


def test_warmup_ramps_then_hands_over_to_the_schedule() -> None:
    schedule = ScheduleConfig(name="constant", warmup_epochs=2)
    assert [lr_factor(schedule, e, 10) for e in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    # the first epoch after the warm-up is the schedule's own, not the end of the ramp
    cosine = ScheduleConfig(name="cosine", warmup_epochs=2)
    assert lr_factor(cosine, 2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 10)))


# -- optimizer ------------------------------------------------------------------------------------


def test_sgd_step_with_momentum_weight_decay_and_nesterov_by_hand() -> None:
    """Kills: weight decay, momentum or nesterov not reaching SGD (two steps tell them apart)."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    config = OptimizerConfig(name="sgd", lr=0.1, momentum=0.5, weight_decay=0.2, nesterov=True)
    optimizer = make_optimizer(config, model)
    w, buf = 1.0, 0.0
    for _ in range(2):
        model.weight.grad = torch.full_like(model.weight, 0.3)
        optimizer.step()
        d = 0.3 + 0.2 * w  # gradient plus weight decay
        buf = 0.5 * buf + d if buf else d
        w -= 0.1 * (d + 0.5 * buf)  # nesterov
    assert model.weight.item() == pytest.approx(w)


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        # Adam: the first step moves by lr * sign(g + wd * w) whatever the size of g + wd * w
        ("adam", torch.optim.Adam, 1.0 - 0.01),
        # AdamW: a zero gradient makes no Adam move, only the decoupled decay w <- w (1 - lr wd)
        ("adamw", torch.optim.AdamW, 1.0 - 0.01 * 0.5),
    ],
)
def test_adam_and_adamw_get_their_params_lr_and_weight_decay(name, kind, expected) -> None:
    """Kills: Adam or AdamW built without the model's parameters, its lr or its weight decay."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    optimizer = make_optimizer(OptimizerConfig(name=name, lr=0.01, weight_decay=0.5), model)
    assert type(optimizer) is kind
    model.weight.grad = torch.zeros_like(model.weight)
    optimizer.step()
    assert model.weight.item() == pytest.approx(expected)


# -- threads and determinism ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samat", "slurm", "expected"),
    [("3", "5", 3), ("", "5", 5), ("0", "4", 4), ("x", "", 0), ("", "", 0), ("-2", "2", 2)],
)
def test_thread_count_reads_samat_then_slurm(monkeypatch, samat, slurm, expected) -> None:
    monkeypatch.setenv("SAMAT_NUM_THREADS", samat)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", slurm)
    assert thread_count() == expected


def test_thread_count_without_either_variable_is_torchs_default(monkeypatch) -> None:
    monkeypatch.delenv("SAMAT_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert thread_count() == 0
    threads = torch.get_num_threads()
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    try:
        torch.set_num_threads(3)
        _set_determinism(run_config())  # 0: leaves torch's thread count alone
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("SAMAT_NUM_THREADS", "1")
        _set_determinism(run_config())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cudnn.benchmark = flags[1]


@pytest.mark.parametrize("deterministic", [True, False])
def test_set_determinism_seeds_and_sets_the_flags(monkeypatch, deterministic: bool) -> None:
    monkeypatch.setenv("SAMAT_NUM_THREADS", "2")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    train = {**TINY_BASE["train"], "deterministic": deterministic}
    config = run_config(seed=11, train=train)
    threads = torch.get_num_threads()
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    try:
        # from the opposite settings: a process whose earlier run was deterministic turns it off
        torch.use_deterministic_algorithms(not deterministic)
        torch.backends.cudnn.benchmark = deterministic
        _set_determinism(config)
        assert torch.get_num_threads() == 2
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert torch.backends.cudnn.benchmark is not deterministic
        assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") is deterministic
        drawn = torch.rand(3)
        torch.manual_seed(11)
        assert torch.equal(drawn, torch.rand(3))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cudnn.benchmark = flags[1]


# -- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_tensor_and_scalar_optimizer_state() -> None:
    """Kills: the non-tensor optimizer slots (metadata "optim_scalars") lost on restore."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = torch.ones_like(model.bias)
    optimizer.step()
    optimizer.state[model.weight]["count"] = 3  # a Python scalar, as some optimizers keep
    frozen = nn.Parameter(torch.zeros(1))  # no gradient, so no tensor state: scalars only
    optimizer.add_param_group({"params": [frozen]})
    optimizer.state[frozen]["count"] = 5
    tensors, meta = checkpoint_tensors(model, optimizer)
    assert meta["optim_scalars"] == {"0": {"count": 3}, "2": {"count": 5}}

    fresh = nn.Linear(2, 1)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    fresh_frozen = nn.Parameter(torch.zeros(1))
    fresh_optimizer.add_param_group({"params": [fresh_frozen]})
    restore_checkpoint(tensors, meta, fresh, fresh_optimizer)
    assert fresh_optimizer.state[fresh_frozen] == {"count": 5}
    assert torch.equal(fresh.weight, model.weight)
    state = fresh_optimizer.state[fresh.weight]
    assert state["count"] == 3
    assert torch.equal(state["momentum_buffer"], torch.ones_like(model.weight))
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1


def test_method_state_is_prefixed_and_restored() -> None:
    model = nn.Linear(2, 2)
    method = create(
        validate_run({**copy.deepcopy(TINY_BASE), "method": {"name": "looksam", "k": 2}}).method,
        torch.optim.SGD(model.parameters(), lr=0.1),
    )
    images, labels = torch.rand(4, 2), torch.tensor([0, 1, 0, 1])
    method.step(model, images, labels)
    state = _method_state(method)
    assert set(state) == {"method.step", "method.g_v.0", "method.g_v.1"}
    other = create(
        validate_run({**copy.deepcopy(TINY_BASE), "method": {"name": "looksam", "k": 2}}).method,
        torch.optim.SGD(model.parameters(), lr=0.1),
    )
    _restore_method(other, {**state, "model.weight": torch.zeros(1)})
    assert other.steps == 1 and set(other.stored) == {0, 1}
    assert all(torch.equal(other.stored[i], method.stored[i]) for i in (0, 1))
    # a method without state ignores the prefix-free rest
    standard = create(run_config().method, torch.optim.SGD(model.parameters(), lr=0.1))
    assert _method_state(standard) == {}
    _restore_method(standard, {"model.weight": torch.zeros(1)})


# -- epochs, accuracy, NaN guard ------------------------------------------------------------------


def test_accuracy_is_the_fraction_correct() -> None:
    split = Split(
        torch.zeros(5, 1, 1, 1, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 1], dtype=torch.int64)
    )
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))  # always class 0
    assert accuracy(model, DeviceLoader(split, 2, device="cpu", shuffle=False)) == 0.6


def test_nan_guard_names_the_epoch_and_step() -> None:
    _nan_guard(torch.tensor(-1), 0)
    with pytest.raises(TrainingError, match=r"at epoch 3 step 5; lower train\.optimizer\.lr"):
        _nan_guard(torch.tensor(4), 2)
    with pytest.raises(TrainingError, match="at epoch 1 step 1;"):
        _nan_guard(torch.tensor(0), 0)


# -- validation attack ----------------------------------------------------------------------------


def test_adversarial_training_validates_with_pgd_10_at_its_budget() -> None:
    method = {"name": "pgd_at", "norm": "l2", "eps": 0.5, "steps": 3}
    spec = validation_attack(run_config(method=method))
    assert canonical(spec) == canonical(AttackSpec(attack="pgd", norm="l2", eps=0.5, steps=10))
    assert label(spec) == "PGD-10 l2 0.5"


def test_a_chosen_validation_attack_wins_and_plain_methods_get_none() -> None:
    train = {**TINY_BASE["train"], "validation": {"size": 10, "attack": "fgsm_linf_1"}}
    chosen = validation_attack(run_config(method={"name": "pgd_at", "eps": 0.1}, train=train))
    assert chosen is not None and chosen.attack == "fgsm"
    assert validation_attack(run_config(method={"name": "sam"})) is None


# -- SLURM job id ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "15"}, "12_3"),
        ({"SLURM_ARRAY_JOB_ID": "12", "SLURM_JOB_ID": "15"}, "15"),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "15"}, "15"),
        ({"SLURM_JOB_ID": "15"}, "15"),
        ({"SLURM_JOB_ID": ""}, None),
        ({}, None),
    ],
)
def test_slurm_job_id(monkeypatch, env: dict[str, str], expected: str | None) -> None:
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert slurm_job_id() == expected


def _checkpoint_setup(tmp_path):
    """A prepared SGD run directory and a tiny model, optimizer and method to checkpoint."""
    config = run_config()
    rid = run_id(config)
    run = prepare(RunSpec(rid, config, "SGD", tmp_path / rid))
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return config, run, model, optimizer, create(config.method, optimizer)


def test_a_mid_epoch_checkpoint_resumes_at_its_step(tmp_path) -> None:
    """Kills: the step of a mid-epoch checkpoint not written under "step" (the resumed run
    would replay the epoch from its first batch)."""
    config, run, model, optimizer, method = _checkpoint_setup(tmp_path)
    partial = {"loss": 1.5, "correct": 3, "seen": 6, "seconds": 0.5}
    _save(run, config, model, optimizer, method, Position(epoch=1, step=3, partial=partial))
    position = _resume(run, config, model, optimizer, method, config.train.epochs)
    assert (position.epoch, position.step, position.partial) == (1, 3, partial)


def _validation_setup(tmp_path, epochs: int = 3, every: int = 2):
    train = {**TINY_BASE["train"], "epochs": epochs, "validation": {"size": 6, "every": every}}
    config = run_config(method={"name": "pgd_at", "eps": 0.1, "steps": 2}, train=train)
    rid = run_id(config)
    run = prepare(RunSpec(rid, config, "SGD", tmp_path / rid))
    labels = torch.tensor([0, 1, 0, 2, 1, 1])
    images = torch.arange(24, dtype=torch.uint8).view(6, 1, 2, 2)
    dataset = SimpleNamespace(validation=Split(images, labels), num_classes=3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))  # always class 0, attack or not
    return run, config, dataset, model


def test_validation_runs_every_n_epochs_and_at_the_last(tmp_path) -> None:
    """Kills: the last-epoch exception to `every` inverted; the robust column (PGD at the AT
    budget) not computed on the held-out images."""
    run, config, dataset, model = _validation_setup(tmp_path)
    assert _validate(run, config, dataset, model, Position(epoch=1)) == {}
    position = Position(epoch=3)
    out = _validate(run, config, dataset, model, position)
    assert out == {"val_accuracy": pytest.approx(2 / 6), "val_robust": pytest.approx(2 / 6)}
    assert position.best == {"epoch": 3, "score": pytest.approx(2 / 6)}
    assert read_checkpoint(run.file(CHECKPOINT_BEST))[1]["epoch"] == 3
    assert run.state().catastrophic_overfitting_epoch is None


def test_a_robust_accuracy_collapse_is_recorded_once_and_keeps_the_best(tmp_path, caplog) -> None:
    run, config, dataset, model = _validation_setup(tmp_path, every=1)
    position = Position(epoch=2, best={"epoch": 1, "score": 0.9})
    with caplog.at_level(logging.WARNING, logger="samat.train"):
        _validate(run, config, dataset, model, position)  # 2/6 < 0.5 * 0.9
    assert caplog.messages == [
        "validation robust accuracy collapsed at epoch 2 (0.3333, best 0.9000): "
        "catastrophic overfitting"
    ]
    assert run.state().catastrophic_overfitting_epoch == 2
    assert position.best == {"epoch": 1, "score": 0.9}
    assert not run.file(CHECKPOINT_BEST).exists()
    position.epoch = 3
    _validate(run, config, dataset, model, position)
    assert run.state().catastrophic_overfitting_epoch == 2


def test_the_best_epoch_is_chosen_by_robust_accuracy(tmp_path, monkeypatch) -> None:
    """Kills: the clean accuracy taken as the score where a robust one exists."""
    run, config, dataset, model = _validation_setup(tmp_path)
    monkeypatch.setattr(samat.train.attacks, "evaluate", lambda *a, **k: {"PGD-10 linf 0.1": 0.25})
    position = Position(epoch=3)
    out = _validate(run, config, dataset, model, position)
    assert out["val_robust"] == 0.25 and position.best == {"epoch": 3, "score": 0.25}


def test_best_checkpoint_selection(tmp_path, caplog) -> None:
    run, config, dataset, model = _validation_setup(tmp_path)
    best = run_config(
        method=config.method.model_dump(),
        train=config.train.model_dump(),
        eval={**TINY_BASE["eval"], "checkpoint": "best"},
    )
    with pytest.raises(ConfigError) as error:
        _select_checkpoint(run, best, model)
    assert str(error.value) == (
        f"{run.file(CHECKPOINT_BEST)} is missing: eval.checkpoint 'best' needs "
        "train.validation.size > 0 and keep 'best' when the run trains"
    )
    _validate(run, config, dataset, model, Position(epoch=3))  # writes checkpoint-best
    with torch.no_grad():
        model[1].bias.fill_(7.0)
    with caplog.at_level(logging.INFO, logger="samat.train"):
        assert _select_checkpoint(run, best, model) == "best"
    assert caplog.messages == ["evaluating the validation-best weights of epoch 3"]
    assert model[1].bias.tolist() == [1.0, 0.0, 0.0]
    assert _select_checkpoint(run, config, model) == "last"


def test_result_json_fields(tmp_path) -> None:
    """Kills: renamed or miscounted fields of result.json."""
    config = run_config(method={"name": "sam", "rho": 0.1})
    rid = run_id(config)
    run = prepare(RunSpec(rid, config, "SAM", tmp_path / rid))
    records = {
        "natural": {"key": "k0", "accuracy": 0.9, "total": 64, "seconds": 1.0},
        "natural_subset": {"key": "k1", "accuracy": 0.8, "total": 32, "seconds": 0.5},
        "FGSM": {"key": "k2", "accuracy": 0.4, "total": 32, "seconds": 2.0},
    }
    totals = {"train_seconds": 10.0, "images": 1000, "steps": 20}
    method = create(config.method, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    summary = accuracy_summary(records)
    result = _result(run, config, summary, records, totals, method, "last", torch.device("cpu"))
    expected = {
        "run_id": rid,
        "task": "image",
        "seed": 0,
        "method": "sam",
        "metric": "accuracy",
        "natural": 0.9,
        "natural_subset": 0.8,
        "robust": {"FGSM": 0.4},
        "average_robust": 0.4,
        "robust_examples": 32,
        "checkpoint": "last",
        "checkpoint_epoch": 2,
        "catastrophic_overfitting_epoch": None,
        "train_seconds": 10.0,
        "eval_seconds": 3.5,
        "images_per_second": 100.0,
        "forward_backward_passes": 40,
        "passes_per_step": 2,
        "epochs": 2,
        "steps": 20,
        "device": "cpu",
        "records": {"natural": "k0", "natural_subset": "k1", "FGSM": "k2"},
        "request": run.request_key(),
    }
    assert {k: result[k] for k in expected} == expected
    assert run.result() == result


def _one_epoch_run(tmp_path):
    data = copy.deepcopy(TINY_BASE)
    data["data"] = {**data["data"], "train_size": 96, "test_size": 16}
    data["train"]["epochs"] = 1
    data["eval"]["attacks"] = []
    config = validate_run(data)
    rid = run_id(config)
    return prepare(RunSpec(rid, config, "SGD", tmp_path / rid))


def _wrapped_create(monkeypatch, on_step=None, after=None):
    """methods.create, with `on_step(number, labels)` called before each training step and
    `after(number, out, labels)` given its result (what `after` returns is the step's result)."""
    real_create = samat.train.methods.create

    def create_(*args, **kwargs):
        method = real_create(*args, **kwargs)
        step, calls = method.step, []

        def counted(model, images, labels):
            calls.append(1)
            if on_step is not None:
                on_step(len(calls), labels)
            out = step(model, images, labels)
            return out if after is None else after(len(calls), out, labels)

        method.step = counted
        return method

    monkeypatch.setattr(samat.train.methods, "create", create_)


def test_a_stop_mid_epoch_resumes_at_the_next_batch(tmp_path, monkeypatch) -> None:
    """Kills: an unset stop flag taken as a stop; a resumed epoch counting its steps from 0 (a
    second stop in it would store the wrong step) or replaying batches it had trained on."""
    straight = _one_epoch_run(tmp_path / "a")
    execute(straight.path, stop=StopFlag())  # a flag that is never set changes nothing
    run = _one_epoch_run(tmp_path / "b")
    for expected_step in (1, 2):  # stopped during the first step of each attempt
        stop = StopFlag()
        _wrapped_create(monkeypatch, lambda n, _, s=stop: s.set(15) if n == 1 else None)
        with pytest.raises(Interrupted):
            execute(run.path, stop=stop)
        assert read_checkpoint(run.file(CHECKPOINT))[1]["step"] == expected_step
    monkeypatch.undo()
    execute(run.path)
    a, b = (read_checkpoint(r.file(CHECKPOINT))[0] for r in (straight, run))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))
    assert run.metrics()[0]["train_accuracy"] == straight.metrics()[0]["train_accuracy"]


def test_each_epoch_gets_its_own_batch_order(tmp_path, monkeypatch) -> None:
    """Kills: the loader asked for another epoch number than the one being trained."""
    run = _one_epoch_run(tmp_path)
    config = run.config()
    twice = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2})})
    run = prepare(RunSpec(run_id(twice), twice, "SGD", tmp_path / "two"))
    seen: list[list[int]] = []
    _wrapped_create(monkeypatch, lambda n, labels: seen.append(labels.tolist()))
    execute(run.path)
    assert len(seen) == 6  # 96 images in batches of 32, two epochs
    assert seen[:3] != seen[3:]
    first, second = ([x for batch in epoch for x in batch] for epoch in (seen[:3], seen[3:]))
    assert sorted(first) == sorted(second)  # the same images, in another order
    # the images of both epochs counted (images/s is taken from this total)
    result = run.result()
    assert result["steps"] == 6
    assert result["images_per_second"] * result["train_seconds"] == pytest.approx(2 * 96)
    assert result["train_seconds"] == pytest.approx(sum(m["seconds"] for m in run.metrics()))


def test_a_checkpoint_keeps_the_totals_the_best_epoch_and_the_samat_version(
    tmp_path, caplog
) -> None:
    """Kills: the running totals or the best epoch stored under another key (a resumed run would
    report only the time since the resume and forget its best epoch); the version unrecorded;
    the resume log line of an epoch boundary naming a step."""
    config, run, model, optimizer, method = _checkpoint_setup(tmp_path)
    totals = {"train_seconds": 12.5, "images": 640, "steps": 20}
    best = {"epoch": 1, "score": 0.75}
    _save(run, config, model, optimizer, method, Position(epoch=1, totals=totals, best=best))
    assert read_checkpoint(run.file(CHECKPOINT))[1]["samat"] == samat.__version__
    with caplog.at_level(logging.INFO, logger="samat.train"):
        position = _resume(run, config, model, optimizer, method, config.train.epochs)
    assert (position.epoch, position.totals, position.best) == (1, totals, best)
    assert caplog.messages == [f"resumed from epoch 1 (checkpoint {run.file(CHECKPOINT)})"]


def test_result_json_times_and_device(tmp_path, monkeypatch, caplog) -> None:
    """Kills: a record without `seconds` counted as anything but 0; the images/s floor of 1e-9 s
    raised to 1 s; the GPU's name not asked of the run's device; torch's build left out; the
    closing log line without its metric."""
    config = run_config()
    rid = run_id(config)
    run = prepare(RunSpec(rid, config, "SGD", tmp_path / rid))
    records = {
        "natural": {"key": "k0", "accuracy": 0.9, "total": 64},  # written before `seconds` was
        "FGSM": {"key": "k2", "accuracy": 0.4, "total": 32, "seconds": 2.0},
    }
    totals = {"train_seconds": 0.5, "images": 100, "steps": 4}
    method = create(config.method, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU of {device}")
    summary = {"metric": "accuracy", "natural": 0.9}
    with caplog.at_level(logging.INFO, logger="samat.train"):
        device = torch.device("cuda:1")
        result = _result(run, config, summary, records, totals, method, "last", device)
    assert caplog.messages == ["natural accuracy 0.9000; done in 0.5s train + 2.0s eval"]
    assert result["eval_seconds"] == 2.0
    assert result["images_per_second"] == 200.0
    assert result["device"] == "GPU of cuda:1"
    assert result["versions"]["torch_build"] == torch.__version__


def test_build_carves_the_validation_split_and_passes_size_width_and_layout() -> None:
    """Kills: the training set keeping the validation images; the image size or width not
    passed to the model (DeiT's patch size and embedding follow them); channels_last dropped."""
    train = {**TINY_BASE["train"], "validation": {"size": 32}, "channels_last": True}
    dataset, model = samat.train.build(run_config(train=train), torch.device("cpu"))
    assert (len(dataset.train.labels), len(dataset.validation.labels)) == (512 - 32, 32)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)
    _, deit = samat.train.build(run_config(model={"name": "deit_tiny", "width": 64}), "cpu")
    proj = deit[1].patch_embed.proj  # after the Normalize layer
    assert (proj.kernel_size, proj.out_channels) == ((1, 1), 64)  # 8x8 digits, 8x8 patches


def _fake_validation_attack(monkeypatch, score: float) -> list[dict]:
    """attacks.evaluate replaced: records what it was given and returns `score`."""
    calls: list[dict] = []

    def evaluate(model, images, labels, specs, **kwargs):
        calls.append({"images": images, "labels": labels, **kwargs})
        return {label(specs[0]): score}

    monkeypatch.setattr(samat.train.attacks, "evaluate", evaluate)
    return calls


def test_validation_attacks_the_held_out_images_scaled_to_0_1(tmp_path, monkeypatch) -> None:
    """Kills: the held-out images divided by 256, or the class count not passed to the attack;
    the best checkpoint's score, run id or samat version stored under another key."""
    run, config, dataset, model = _validation_setup(tmp_path, every=1)
    calls = _fake_validation_attack(monkeypatch, 0.5)
    _validate(run, config, dataset, model, Position(epoch=1))
    (call,) = calls
    assert torch.equal(call["images"], dataset.validation.images.float() / 255)
    assert torch.equal(call["labels"], dataset.validation.labels)
    assert call["num_classes"] == 3
    meta = read_checkpoint(run.file(CHECKPOINT_BEST))[1]
    assert {k: meta[k] for k in ("epoch", "score", "run_id", "samat")} == {
        "epoch": 1,
        "score": 0.5,
        "run_id": run_id(config),
        "samat": samat.__version__,
    }


def test_a_tie_keeps_the_earlier_best_and_the_collapse_is_strictly_below(
    tmp_path, monkeypatch
) -> None:
    """Kills: a tie with the best score taking over the best epoch; a score of exactly
    collapse_ratio x best counted as a collapse; the ratio divided by the best score."""
    run, config, dataset, model = _validation_setup(tmp_path, every=1)
    _fake_validation_attack(monkeypatch, 0.25)
    position = Position(epoch=2, best={"epoch": 1, "score": 0.5})  # 0.25 == 0.5 x 0.5
    _validate(run, config, dataset, model, position)
    assert run.state().catastrophic_overfitting_epoch is None
    position = Position(epoch=3, best={"epoch": 1, "score": 0.25})
    _validate(run, config, dataset, model, position)
    assert position.best == {"epoch": 1, "score": 0.25}
    assert not run.file(CHECKPOINT_BEST).exists()
    _fake_validation_attack(monkeypatch, 0.5)  # 0.5 >= 0.5 x 0.9, but below 0.5 / 0.9
    _validate(run, config, dataset, model, Position(epoch=4, best={"epoch": 1, "score": 0.9}))
    assert run.state().catastrophic_overfitting_epoch is None


def test_validation_runs_at_the_last_epoch_of_an_iterations_run(tmp_path, monkeypatch) -> None:
    """Kills: the last epoch taken from `train.epochs` when the run counts iterations (5 steps
    of 2 batches an epoch: 3 epochs, the third validated although `every` is 2)."""
    run, config, dataset, model = _validation_setup(tmp_path)
    train = {**config.train.model_dump(exclude={"epochs"}), "iterations": 5}
    counted = run_config(method=config.method.model_dump(), train=train)
    _fake_validation_attack(monkeypatch, 0.5)
    loader = [None, None]  # only its length is read
    assert _validate(run, counted, dataset, model, Position(epoch=1), loader) == {}
    assert _validate(run, counted, dataset, model, Position(epoch=3), loader) != {}


# -- survivors of a full train.py mutmut run (2026-11-27, fourth session) -------------------------


def test_linear_decay_after_a_one_step_warmup() -> None:
    """Kills: the linear decay's denominator floored at 2 (steps 2, warm-up 1: the second step
    is the decay's first, at the full lr)."""
    schedule = ScheduleConfig(name="linear", warmup_ratio=0.5)
    assert [lr_factor(schedule, 0, 1, step, 2) for step in range(2)] == [0.0, 1.0]


def _many_step_run(tmp_path, **train: object):
    data = copy.deepcopy(TINY_BASE)
    data["data"] = {**data["data"], "train_size": 96, "test_size": 16}
    data["train"] = {**data["train"], "epochs": 1, "batch_size": 4, **train}
    data["eval"]["attacks"] = []
    config = validate_run(data)
    rid = run_id(config)
    return prepare(RunSpec(rid, config, "SGD", tmp_path / rid))


def _poisoned_losses(monkeypatch) -> list[int]:
    """Every training step's loss made NaN (after the step); returns the step count so far."""
    steps: list[int] = []

    def poison(number, out, labels):
        steps.append(number)
        return type(out)(out.loss * math.nan, out.logits)

    _wrapped_create(monkeypatch, after=poison)
    return steps


@pytest.mark.parametrize("batch_size, taken", [(4, 8), (32, 3)])
def test_a_nan_loss_stops_training_within_the_check_interval(
    tmp_path, monkeypatch, batch_size: int, taken: int
) -> None:
    """Kills: the device-side NaN flag read only at the end of the epoch (24 steps) instead of
    every NAN_CHECK_EVERY (8) steps, or not at the last step of a shorter epoch (3 steps); a later
    NaN overwriting the first one's step; an exception without a message recorded under another
    name."""
    assert samat.train.NAN_CHECK_EVERY == 8
    run = _many_step_run(tmp_path, batch_size=batch_size)
    steps = _poisoned_losses(monkeypatch)
    with pytest.raises(TrainingError, match="epoch 1 step 1;"):
        execute(run.path)
    assert len(steps) == taken
    assert (run.state().state, run.state().failure) == ("failed", "deterministic")

    class Silent(RuntimeError):
        pass

    def fail():
        raise Silent()

    monkeypatch.setattr(samat.train, "pick_device", fail)
    with pytest.raises(Silent):
        execute(run.path)
    assert (run.state().error, run.state().failure) == ("Silent", "infra")


def test_a_stop_checkpoints_the_method_and_logs_its_signal(tmp_path, monkeypatch, caplog) -> None:
    """Kills: the signal number dropped from the Interrupted a mid-epoch stop raises or from its
    log line, the line's step off by one; the method's state (LookSAM's stored gradient
    component) left out of the mid-epoch checkpoint; its seconds stored under another key or
    with a sign flipped; execute's closing log line."""
    run = _many_step_run(tmp_path, batch_size=32)
    config = run.config()
    looksam = config.model_copy(
        update={"method": run_config(method={"name": "looksam", "k": 2}).method}
    )
    run = prepare(RunSpec(run_id(looksam), looksam, "LookSAM", tmp_path / "looksam"))
    stop = StopFlag()
    _wrapped_create(monkeypatch, lambda n, _: stop.set(10) if n == 1 else None)
    with caplog.at_level(logging.INFO, logger="samat.train"), pytest.raises(Interrupted) as raised:
        execute(run.path, stop=stop)
    assert raised.value.signum == 10
    assert "checkpointed at epoch 0 step 1 on signal 10" in caplog.messages
    assert caplog.messages[-1] == "stopped: progress is stored; the next attempt resumes from it"
    tensors, meta = read_checkpoint(run.file(CHECKPOINT))
    assert any(key.startswith("method.") for key in tensors)
    assert 0 < meta["partial"]["seconds"] < 60


def _epoch_setup(tmp_path, labels: list[int]):
    """A prepared run, a linear model on 1x1x2 images that are all zero, and a loader of
    `labels` in batches of 4, to call `_epoch` on directly: (run, config, model, optimizer,
    loader)."""
    config, run, *_ = _checkpoint_setup(tmp_path)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    split = Split(torch.zeros(len(labels), 1, 1, 2, dtype=torch.uint8), torch.tensor(labels))
    return run, config, model, optimizer, DeviceLoader(split, 4, device="cpu", shuffle=False)


def test_a_stop_during_the_last_step_lets_the_epoch_finish(tmp_path, monkeypatch) -> None:
    """Kills: a stop during an epoch's last step checkpointing mid-epoch (at step n of n) instead
    of letting the epoch end; a NaN seen at a stop reported without its epoch."""
    run, config, model, optimizer, loader = _epoch_setup(tmp_path, [0, 1] * 4)
    stop, position = StopFlag(), Position()
    stop.set(15)  # already set: the epoch's first step stops it, its second (last) does not

    def epoch(method):
        return samat.train._epoch(
            run, config, model, optimizer, method, loader, position, stop, (None, None)
        )

    with pytest.raises(Interrupted):
        epoch(create(config.method, optimizer))
    assert (position.epoch, position.step) == (0, 1)
    record = epoch(create(config.method, optimizer))
    assert (record["epoch"], position.epoch, position.step) == (1, 1, 0)

    steps = _poisoned_losses(monkeypatch)
    method = samat.train.methods.create(config.method, optimizer)
    with pytest.raises(TrainingError, match="at epoch 2 step 1;"):
        epoch(method)
    assert len(steps) == 1


def test_compile_wraps_the_model_and_the_wrapper_takes_every_step(tmp_path, monkeypatch) -> None:
    """Kills: torch.compile handed something else than the model; the compiled module not the
    one the method steps (train.compile would then compile and never use it)."""
    run = _many_step_run(tmp_path, batch_size=32, compile=True)
    compiled, calls = [], []

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(len(x))
            return self.inner(x)

    def compile_(model, *args, **kwargs):
        compiled.append(model)
        return Wrapper(model)

    monkeypatch.setattr(torch, "compile", compile_)
    execute(run.path)
    assert len(compiled) == 1 and isinstance(compiled[0], nn.Module)
    assert not isinstance(compiled[0], Wrapper)
    assert calls == [32, 32, 32]  # every training step, and nothing else (eval uses the module)
    tensors = read_checkpoint(run.file(CHECKPOINT))[0]
    assert any(k.startswith("model.") for k in tensors)  # the plain module's keys
    assert not any("inner" in k for k in tensors)


def test_a_final_checkpoint_without_the_trained_mark_gets_it(tmp_path) -> None:
    """Kills: the trained mark set only when it was already set (a task killed between the last
    checkpoint and the mark would otherwise stay untrained); a complete run trained again from
    its last epoch."""
    run = _one_epoch_run(tmp_path)
    execute(run.path)
    set_state(run, trained=False)
    execute(run.path)
    assert run.state().trained
    # the second task found training complete: no second "run ...: N epochs from epoch" line,
    # and no "resumed from" line for a checkpoint that is final
    log_text = run.file("log").read_text()
    assert log_text.count(" epochs from epoch ") == 1 and "resumed from" not in log_text


def test_execute_logs_to_the_run_and_records_host_and_checkpoint(tmp_path, monkeypatch) -> None:
    """Kills: the data set's name left out of the run's opening log line; the log file's lines
    without their time and level; the file handler put on the root logger (other libraries'
    lines in the run's log) or left there after the run; the epoch lines lost when the samat
    logger is at WARNING; the host not recorded; evaluation not told which checkpoint."""
    import socket

    samat_logger = logging.getLogger("samat")
    monkeypatch.setattr(samat_logger, "level", logging.WARNING)
    handlers = list(samat_logger.handlers)
    _wrapped_create(monkeypatch, lambda n, _: logging.getLogger("other").warning("not samat's"))
    run = _one_epoch_run(tmp_path)
    execute(run.path, job_id="4242_3")
    assert run.state().job_id == "4242_3"
    lines = run.file("log").read_text().splitlines()
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO run {run.run_id}: "
        r"standard on digits, 1 epochs from epoch 0, device cpu, threads \d+",
        lines[0],
    )
    assert any(" INFO epoch 1/1 loss " in line for line in lines)
    assert not any("not samat's" in line for line in lines)
    assert samat_logger.handlers == handlers
    assert run.state().host == socket.gethostname()
    assert [r["checkpoint"] for r in run.eval_records()] == ["last", "last"]


def test_an_iterations_run_validates_at_its_last_epoch(tmp_path) -> None:
    """Kills: training's validation not told the loader (the last epoch then taken from
    train.epochs, not from the iterations); the epoch log line without its validation figures."""
    data = copy.deepcopy(TINY_BASE)
    data["data"] = {**data["data"], "train_size": 96, "test_size": 16}
    data["train"] = {k: v for k, v in data["train"].items() if k != "epochs"}
    fgsm = {"attack": "fgsm", "norm": "linf", "eps": 0.1}
    data["train"].update(iterations=7, validation={"size": 16, "every": 2, "attack": fgsm})
    data["eval"]["attacks"] = []
    config = validate_run(data)
    run = prepare(RunSpec(run_id(config), config, "SGD", tmp_path / run_id(config)))
    execute(run.path)  # 80 images in batches of 32: 3 steps an epoch, 3 epochs
    assert [("val_accuracy" in m) for m in run.metrics()] == [False, True, True]
    # the epoch lines of the log end with the validated epochs' figures
    epochs = [line for line in run.file("log").read_text().splitlines() if " INFO epoch " in line]
    assert [line.split(" INFO ")[1].split(" loss ")[0] for line in epochs] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    assert epochs[0].endswith(" img/s)")
    number = r"\d\.\d{4}"
    assert re.search(rf" img/s\) val_accuracy {number} val_robust {number}$", epochs[1])


def test_a_terminal_gets_a_transient_bar_that_training_advances_and_stops(
    tmp_path, monkeypatch
) -> None:
    """Kills: a bar drawn into a batch job's log (no terminal) or none on a terminal; the elapsed
    time column or `transient` dropped; the bar not advanced per step or left running; a
    resumed run's bar counting the steps done before the stop."""
    import io
    import sys

    from rich.progress import BarColumn, Progress, TimeElapsedColumn

    assert samat.train._progress_bar() is None  # pytest's captured stdout is no terminal

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    run = _one_epoch_run(tmp_path)
    stop = StopFlag()
    _wrapped_create(monkeypatch, lambda n, _: stop.set(15) if n == 1 else None)
    with pytest.raises(Interrupted):
        execute(run.path, stop=stop)  # stopped after the first of 3 steps
    monkeypatch.undo()
    monkeypatch.setattr(sys, "stdout", Terminal())
    real, bars = samat.train._progress_bar, []
    monkeypatch.setattr(samat.train, "_progress_bar", lambda: bars.append(real()) or bars[-1])
    execute(run.path)
    (bar,) = bars
    assert isinstance(bar, Progress) and bar.live.transient is True
    assert not bar.live.is_started
    assert any(isinstance(column, TimeElapsedColumn) for column in bar.columns)
    assert any(isinstance(column, BarColumn) for column in bar.columns)  # rich's defaults too
    (task,) = bar.tasks
    assert (task.completed, task.total, task.description) == (2, 2, "epoch 1/1")


def test_the_epoch_loss_and_accuracy_are_over_every_batch(tmp_path, monkeypatch) -> None:
    """Kills: the epoch's loss sum, correct count or counted examples replaced by the last
    batch's; the accuracy's argmax taken over the flattened logits."""
    outs = []

    def keep(number, out, labels):
        outs.append((float(out.loss), int((out.logits.argmax(1) == labels).sum()), len(labels)))
        return out

    _wrapped_create(monkeypatch, after=keep)
    run = _many_step_run(tmp_path, batch_size=40)  # 96 images: batches of 40, 40 and 16
    execute(run.path)
    assert [n for *_, n in outs] == [40, 40, 16]
    (record,) = run.metrics()
    assert record["loss"] == pytest.approx(sum(loss * n for loss, _, n in outs) / 96, rel=1e-6)
    assert record["train_accuracy"] == sum(hits for _, hits, _ in outs) / 96
    assert 0 < record["train_accuracy"] < 1
    assert record["images_per_second"] == pytest.approx(96 / record["seconds"])


def test_a_resumed_epoch_adds_the_seconds_spent_before_the_stop(tmp_path, monkeypatch) -> None:
    """Kills: the seconds an interrupted epoch had spent dropped on resume (read under another
    key), or a fresh epoch starting at 1 s instead of 0."""
    from samat.store import write_checkpoint

    run = _one_epoch_run(tmp_path)
    stop = StopFlag()
    _wrapped_create(monkeypatch, lambda n, _: stop.set(15) if n == 1 else None)
    with pytest.raises(Interrupted):
        execute(run.path, stop=stop)
    monkeypatch.undo()
    tensors, meta = read_checkpoint(run.file(CHECKPOINT))
    meta["partial"]["seconds"] = 100.0
    write_checkpoint(run.file(CHECKPOINT), tensors, meta)
    execute(run.path)
    assert 100 < run.metrics()[0]["seconds"] < 160

    run, config, model, optimizer, loader = _epoch_setup(tmp_path / "fresh", [0, 1] * 4)
    method = create(config.method, optimizer)
    began = time.perf_counter()
    record = samat.train._epoch(
        run, config, model, optimizer, method, loader, Position(), None, (None, None)
    )
    assert record["seconds"] <= time.perf_counter() - began


def test_an_epoch_of_one_example_reports_its_accuracy(tmp_path) -> None:
    """Kills: the accuracy's denominator floored at 2 instead of 1."""
    run, config, model, optimizer, loader = _epoch_setup(tmp_path, [1])
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([0.0, 5.0]))  # class 1, before and after the step
    method = create(config.method, optimizer)
    record = samat.train._epoch(
        run, config, model, optimizer, method, loader, Position(), None, (None, None)
    )
    assert record["train_accuracy"] == 1.0


def test_a_stop_at_the_last_step_reaches_evaluation(tmp_path, monkeypatch) -> None:
    """Kills: evaluation not given the stop flag (a stop that came during the last training step
    must end the task before the first attack, not after all of them)."""
    data = copy.deepcopy(TINY_BASE)
    data["data"] = {**data["data"], "train_size": 96, "test_size": 16}
    data["train"]["epochs"] = 1
    config = validate_run(data)
    run = prepare(RunSpec(run_id(config), config, "SGD", tmp_path / run_id(config)))
    stop = StopFlag()
    _wrapped_create(monkeypatch, lambda n, _: stop.set(15) if n == 3 else None)
    with pytest.raises(Interrupted):
        execute(run.path, stop=stop)
    assert run.state().trained
    assert [r["kind"] for r in run.eval_records()] == ["clean", "clean"]  # FGSM never started


def test_train_without_a_loader_uses_the_image_tasks(tmp_path) -> None:
    """Kills: `train` called without a loader (the library entry point) not building the image
    task's from the config and data set."""
    run = _one_epoch_run(tmp_path)
    config = run.config()
    dataset, model = samat.train.tasks.get(config.task).build(config, torch.device("cpu"))
    totals, _ = samat.train.train(run, config, dataset, model, torch.device("cpu"))
    assert (totals["steps"], totals["images"]) == (3, 96)
    assert run.state().trained


def test_a_run_without_a_checkpoint_drops_stale_metrics(tmp_path, monkeypatch) -> None:
    """Kills: metrics lines left from a lost checkpoint kept when training starts over (all of
    them must go, not those past epoch 1: a stop during epoch 1 would leave the stale one)."""
    run = _one_epoch_run(tmp_path)
    stale = "".join(json.dumps({"epoch": e, "loss": 99.0}) + "\n" for e in (1, 2))
    run.file("metrics.jsonl").write_text(stale)
    stop = StopFlag()
    _wrapped_create(monkeypatch, lambda n, _: stop.set(15) if n == 1 else None)
    with pytest.raises(Interrupted):
        execute(run.path, stop=stop)
    assert run.metrics() == []
    monkeypatch.undo()
    execute(run.path)
    (record,) = run.metrics()
    assert record["epoch"] == 1 and record["loss"] != 99.0


def test_a_checkpoint_of_another_config_names_its_run(tmp_path) -> None:
    """Kills: the refusal of another config's checkpoint not naming the run it came from, or
    its fix."""
    config, run, model, optimizer, method = _checkpoint_setup(tmp_path)
    _save(run, config, model, optimizer, method, Position(epoch=1))
    other = run_config(seed=1)
    expected = (
        f"another config \\(run {run_id(config)}\\);.*delete it or use a fresh output directory$"
    )
    with pytest.raises(ConfigError, match=expected):
        _resume(run, other, model, optimizer, method, other.train.epochs)
