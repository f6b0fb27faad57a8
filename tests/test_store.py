import json
import os

import pytest
import torch

from samat.config import validate_run
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


def spec(tmp_path, seed=0):
    config = validate_run({"seed": seed})
    rid = run_id(config)
    return RunSpec(rid, config, "SGD", tmp_path / "runs" / rid)


def test_prepare_writes_config_and_pending_state(tmp_path):
    run = prepare(spec(tmp_path))
    assert run.config() == spec(tmp_path).config
    state = run.state()
    assert state["state"] == "pending" and state["attempts"] == 0 and state["label"] == "SGD"
    run.update_state(state="done")
    assert prepare(spec(tmp_path)).state()["state"] == "done"  # existing state kept


def test_result_counts_only_when_complete(tmp_path):
    run = prepare(spec(tmp_path))
    assert not run.is_complete()
    run.file("result.json").write_text('{"run_id": "x", "natu')  # killed mid-write
    assert not run.is_complete()
    write_json(
        run.file("result.json"),
        {"run_id": "x", "natural": 0.9, "robust": {}, "average_robust": None},
    )
    assert run.is_complete()


def test_find_runs(tmp_path):
    for seed in (0, 1):
        prepare(spec(tmp_path, seed))
    assert len(find_runs(tmp_path)) == 2
    assert find_runs(tmp_path / "missing") == []
    one = find_runs(tmp_path)[0].path
    assert [r.path for r in find_runs(one)] == [one]


def test_unknown_state_rejected(tmp_path):
    with pytest.raises(ValueError):
        RunDir(tmp_path).update_state(state="exploded")


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
