"""Trackers (samat/trackers.py) with the real packages: TensorBoard event files read back with
tensorboard's EventAccumulator, W&B offline runs read from the .wandb files wandb writes."""

import copy
import shutil
import struct
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import samat.train
from samat.config import validate_run
from samat.evaluate import Interrupted, StopFlag
from samat.grid import RunSpec, run_id
from samat.store import CHECKPOINT, RunDir, prepare
from samat.train import execute
from tests.conftest import TINY_BASE

STEPS_PER_EPOCH = 16  # 512 digits in batches of 32


def make_run(tmp_path: Path, track: list[str]) -> RunDir:
    data = copy.deepcopy(TINY_BASE)
    data["eval"]["attacks"] = []
    data["track"] = track
    config = validate_run(data)
    rid = run_id(config)
    return prepare(RunSpec(rid, config, "SGD", tmp_path / "runs" / rid))


def stop_at_step(monkeypatch: pytest.MonkeyPatch, number: int) -> StopFlag:
    """A stop flag set during the `number`-th training step (a time-limit signal then)."""
    stop, real_create = StopFlag(), samat.train.methods.create

    def create(*args, **kwargs):
        method = real_create(*args, **kwargs)
        step, calls = method.step, []

        def counted(model, images, labels):
            calls.append(1)
            if len(calls) == number:
                stop.set(15)
            return step(model, images, labels)

        method.step = counted
        return method

    monkeypatch.setattr(samat.train.methods, "create", create)
    return stop


def requeue_after_epoch_1(run: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt 1 trains epoch 1 and is stopped in epoch 2's first step; attempt 2 finishes."""
    with monkeypatch.context() as patch:
        stop = stop_at_step(patch, STEPS_PER_EPOCH + 1)
        with pytest.raises(Interrupted):
            execute(run.path, stop=stop)
    assert [m["epoch"] for m in run.metrics()] == [1]
    execute(run.path)


def tensorboard_scalars(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def metrics_scalars(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in run.metrics():
        for key, value in line.items():
            if key != "epoch":
                out.setdefault(key, []).append((line["epoch"], value))
    return out


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: wandb's LevelDB-style log (a 7-byte file header,
    32 KiB blocks of chunks with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, chunks, out = path.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunks += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def test_tensorboard_and_wandb_mirror_metrics_jsonl_across_a_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "samat-test")
    run = make_run(tmp_path, ["tensorboard", "wandb"])
    requeue_after_epoch_1(run, monkeypatch)
    expected = metrics_scalars(run)
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    # TensorBoard: every number of every metrics.jsonl line, at its epoch (float32 on disk)
    logged = tensorboard_scalars(run)
    assert set(logged) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6)
    # W&B: one offline folder per attempt, both the W&B run whose id is the run id
    folders = sorted((run.path / "wandb").glob(f"offline-run-*-{run.run_id}"))
    assert len(folders) == 2
    history: dict[int, dict[str, float]] = {}
    for folder in folders:
        records = wandb_records(folder / f"run-{run.run_id}.wandb")
        (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (started.run_id, started.project) == (run.run_id, "samat-test")
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = r.history.item
                history[r.history.step.num] = {
                    i.key or "/".join(i.nested_key): float(i.value_json) for i in items
                }
    assert sorted(history) == [1, 2]  # attempt 1 logged epoch 1, attempt 2 epoch 2
    for key, points in expected.items():
        assert [history[step][key] for step, _ in points] == [v for _, v in points], key


def test_a_resume_past_lost_events_purges_them_in_tensorboard(tmp_path, monkeypatch):
    """A kill after epoch 2's metrics and events but before its checkpoint: epoch 2 trains
    again, and TensorBoard keeps only the new epoch 2, as metrics.jsonl does."""
    run = make_run(tmp_path, ["tensorboard"])
    with monkeypatch.context() as patch:
        stop = stop_at_step(patch, STEPS_PER_EPOCH + 1)
        with pytest.raises(Interrupted):
            execute(run.path, stop=stop)
    shutil.copy(run.file(CHECKPOINT), tmp_path / "epoch1.safetensors")
    execute(run.path)
    shutil.copy(tmp_path / "epoch1.safetensors", run.file(CHECKPOINT))  # the lost rename
    execute(run.path)
    logged, expected = tensorboard_scalars(run), metrics_scalars(run)
    assert [s for s, _ in logged["loss"]] == [1, 2]
    assert [v for _, v in logged["seconds"]] == pytest.approx([v for _, v in expected["seconds"]])


def test_a_tracker_that_cannot_write_never_fails_the_run(tmp_path):
    run = make_run(tmp_path, ["tensorboard"])
    run.file("tensorboard").write_text("a file where the event folder goes\n")
    result = execute(run.path)
    assert run.state()["state"] == "done" and result["epochs"] == 2
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    log = run.file("log").read_text()
    assert "tracker tensorboard did not start" in log and "training goes on without it" in log


def test_track_is_not_part_of_the_run_id_and_absent_from_config_yaml_when_off(tmp_path):
    tracked, plain = make_run(tmp_path / "a", ["wandb"]), make_run(tmp_path / "b", [])
    assert tracked.run_id == plain.run_id
    assert "track" not in plain.file("config.yaml").read_text()
    assert tracked.config().track == ["wandb"]
    with pytest.raises(Exception, match="track"):
        validate_run({"track": ["mlflow"]})
