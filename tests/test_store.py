import json
import os

import pytest
import torch

from samat.config import ConfigError, validate_run
from samat.grid import RunSpec, run_id
from samat.store import (
    CheckpointError,
    RunDir,
    find_runs,
    prepare,
    read_checkpoint,
    write_atomic,
    write_checkpoint,
    write_json,
)
from tests.conftest import set_state


def spec(tmp_path, seed=0):
    config = validate_run({"seed": seed})
    rid = run_id(config)
    return RunSpec(rid, config, "SGD", tmp_path / "runs" / rid)


def test_prepare_writes_config_and_pending_state(tmp_path):
    run = prepare(spec(tmp_path))
    assert run.config() == spec(tmp_path).config
    state = run.state()
    assert state["state"] == "pending" and state["attempts"] == 0 and state["label"] == "SGD"
    set_state(run, state="done")
    assert prepare(spec(tmp_path)).state()["state"] == "done"  # existing state kept


def test_result_counts_only_when_complete(tmp_path):
    run = prepare(spec(tmp_path))
    assert not run.is_complete()
    run.file("result.json").write_text('{"run_id": "x", "natu')  # killed mid-write
    assert not run.is_complete()
    result = {"run_id": "x", "natural": 0.9, "robust": {}, "average_robust": None}
    write_json(run.file("result.json"), result)
    assert not run.is_complete()  # answers no request
    write_json(run.file("result.json"), {**result, "request": run.request_key()})
    assert run.is_complete()
    # a new evaluation request makes the old result stale
    run.set_eval_request(run.eval_request().model_copy(update={"n_examples": 7}))
    assert not run.is_complete()


def test_find_runs(tmp_path):
    for seed in (0, 1):
        prepare(spec(tmp_path, seed))
    assert len(find_runs(tmp_path)) == 2
    assert find_runs(tmp_path / "missing") == []
    one = find_runs(tmp_path)[0].path
    assert [r.path for r in find_runs(one)] == [one]


def test_an_unknown_state_reads_as_pending(tmp_path):
    write_json(tmp_path / "state.json", {"state": "exploded", "attempts": 2})
    state = RunDir(tmp_path).state()
    assert (state.state, state.attempts) == ("pending", 2)


def test_state_transitions(tmp_path):
    run = prepare(spec(tmp_path))
    run.mark_submitted("5_1")
    assert (run.state().state, run.state().job_id) == ("pending", "5_1")
    run.mark_running("node1", None)  # a run claims only a job id its launcher gave it
    state = run.state()
    assert (state.state, state.attempts, state.host, state.job_id) == ("running", 1, "node1", "5_1")
    run.mark_running("node2", "6_0")
    assert (run.state().attempts, run.state().job_id) == (2, "6_0")
    run.mark_requeued()
    run.mark_requeued()
    assert run.state().requeues == 2
    run.mark_failed("loss became nan", deterministic=True)
    assert (run.state().state, run.state().failure) == ("failed", "deterministic")
    run.mark_failed("node died", deterministic=False)
    assert run.state().failure == "infra"
    run.mark_pending()
    state = run.state()
    assert (state.state, state.error, state.failure, state.label) == ("pending", None, None, "SGD")
    run.mark_trained()
    run.mark_done()
    assert (run.state().state, run.state().trained) == ("done", True)
    run.mark_cancelled()
    assert run.state().state == "cancelled"
    run.record_overfitting(7)
    assert run.state().catastrophic_overfitting_epoch == 7
    assert run.state().requeues == 2 and run.state().attempts == 2  # kept through it all


def test_force_moves_training_aside_and_the_run_is_no_longer_done(tmp_path):
    run = prepare(spec(tmp_path))
    for name in ("checkpoint.safetensors", "metrics.jsonl", "log"):
        run.file(name).write_text(name)
    run.write_eval_record({"key": "k", "accuracy": 0.5})
    write_json(
        run.file("result.json"),
        {
            "run_id": "x",
            "natural": 0.9,
            "robust": {},
            "average_robust": None,
            "request": run.request_key(),
        },
    )
    run.mark_trained()
    run.mark_done()
    moved = run.move_training_aside()
    assert moved is not None and moved.name.startswith("replaced-")
    assert sorted(p.name for p in moved.iterdir()) == [
        "checkpoint.safetensors",
        "evals",
        "log",
        "metrics.jsonl",
        "result.json",
    ]
    assert not run.file("checkpoint.safetensors").exists() and run.eval_records() == []
    state = run.state()
    assert (state.state, state.trained, state.label) == ("pending", False, "SGD")
    assert not run.is_complete()
    assert [r.path for r in find_runs(tmp_path)] == [run.path]  # the old copy is no run


def test_metrics_lines_are_not_duplicated_after_a_resume(tmp_path):
    run = prepare(spec(tmp_path))
    for epoch in (1, 2, 2, 3):
        run.append_metrics({"epoch": epoch, "loss": float(epoch)})
    assert [m["epoch"] for m in run.metrics()] == [1, 2, 3]
    run.truncate_metrics(2)  # the checkpoint says epoch 2: line 3 was written before a kill
    assert [m["epoch"] for m in run.metrics()] == [1, 2]


def test_files_are_group_readable_and_temp_files_are_cleaned(tmp_path):
    old = os.umask(0o022)
    try:
        run = prepare(spec(tmp_path))
    finally:
        os.umask(old)
    assert run.file("state.json").stat().st_mode & 0o777 == 0o644
    (run.path / ".state.json.abc.tmp").write_text("half")
    run.clean_temp_files()
    assert not (run.path / ".state.json.abc.tmp").exists()


def test_old_layout_is_a_one_line_error(tmp_path):
    run = prepare(spec(tmp_path))
    run.file("config.yaml").write_text("eval: {n_examples: 5}\nseed: 0\n")
    with pytest.raises(ConfigError, match="samat 0.1.*new output directory"):
        run.config()


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "c.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    write_checkpoint(path, tensors, {"epoch": 3, "nested": {"x": [1, 2]}})
    loaded, meta = read_checkpoint(path)
    assert meta == {"epoch": 3, "nested": {"x": [1, 2]}}
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_one_line_error(tmp_path, damage):
    path = tmp_path / "c.safetensors"
    write_checkpoint(path, {"a": torch.ones(100)}, {"epoch": 1})
    raw = path.read_bytes()
    path.write_bytes(
        {"truncate": raw[: len(raw) // 2], "garbage": b"\x00nonsense" * 9, "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert "corrupt" in str(info.value) and "delete it" in str(info.value)
    assert "\n" not in str(info.value)


def test_interrupted_write_never_replaces_the_good_file(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    write_checkpoint(path, {"a": torch.ones(4)}, {"epoch": 1})
    good = path.read_bytes()

    def crash(fd):
        raise OSError("disk full (simulated crash mid-write)")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        write_checkpoint(path, {"a": torch.zeros(4)}, {"epoch": 2})
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left
    assert read_checkpoint(path)[1] == {"epoch": 1}


def test_write_atomic_creates_parents(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_atomic(target, json.dumps({"k": 1}).encode())
    assert json.loads(target.read_text()) == {"k": 1}
