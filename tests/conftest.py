"""Shared fixtures: one thread per test process (2-core CI) and helpers to write grids."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

# Tiny models run fastest on one thread; two OpenMP threads on a busy 2-core machine spin-wait.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("SAMAT_NUM_THREADS", "1")


@pytest.fixture
def write_yaml(tmp_path: Path):
    """Write a mapping as YAML into tmp_path and return its path."""

    def write(data: dict[str, Any], name: str = "grid.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


TINY_BASE: dict[str, Any] = {
    "data": {"name": "digits", "train_size": 512, "test_size": 64},
    "model": {"name": "small_cnn", "width": 16},
    "train": {
        "epochs": 2,
        "batch_size": 32,
        "deterministic": True,
        "optimizer": {"name": "sgd", "lr": 0.05},
    },
    "eval": {
        "n_examples": 32,
        "batch_size": 64,
        "attacks": [{"attack": "fgsm", "norm": "linf", "eps": 0.1, "label": "FGSM"}],
    },
}


def set_state(run, **fields: Any) -> None:
    """Write state.json fields directly, as a scheduler's side effects would leave them (tests
    only: samat itself changes a run's state through RunDir's transitions)."""
    from samat.store import write_json

    write_json(run.file("state.json"), {**run.state().to_json(), **fields})


def finish(run, accuracy: float = 0.5) -> dict[str, Any]:
    """Leave a run directory as a finished task does: trained, one record per requested
    evaluation, and a result.json answering the current request."""
    from samat.store import record_keys, write_json

    config = run.config()
    keys = record_keys(config)
    for label, key in keys.items():
        run.write_eval_record({"key": key, "label": label, "accuracy": accuracy, "total": 10})
    robust = {label: accuracy for label in keys if label not in ("natural", "natural_subset")}
    result = {
        "run_id": run.run_id,
        "natural": 0.9,
        "natural_subset": 0.9,
        "robust": robust,
        "average_robust": accuracy if robust else None,
        "request": run.request_key(),
        "train_seconds": 1.0,
        "eval_seconds": 1.0,
    }
    write_json(run.file("result.json"), result)
    set_state(run, trained=True, state="done")
    return result


def signal_when(ready: Path, signum: int, deadline_s: float = 300) -> threading.Thread:
    """Send this process `signum` once `ready` exists (the child is up and in place), whatever
    the machine's load: an event, not a timer."""

    def wait_then_signal() -> None:
        deadline = time.monotonic() + deadline_s
        while not ready.exists():
            if time.monotonic() > deadline:
                return  # the test then fails on the child's own 600 s sleep being cut short
            time.sleep(0.02)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=wait_then_signal, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def slurm_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Stand-ins for SLURM's commands: slurm_bin(name, shell_body); PATH holds only them."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", str(directory))

    def install(name: str, body: str) -> Path:
        path = directory / name
        path.write_text(f"#!/bin/sh\nPATH=/usr/bin:/bin\n{body}\n")
        path.chmod(0o755)
        return path

    return install
