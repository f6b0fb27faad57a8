"""Shared fixtures: one thread per test process (2-core CI) and helpers to write grids."""

from __future__ import annotations

import os
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
