"""The run directory: atomic writes, run state, safetensors checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from samat.config import ConfigError, RunConfig, load_run

if TYPE_CHECKING:
    import torch

    from samat.grid import RunSpec

CONFIG, STATE, CHECKPOINT, METRICS, RESULT, LOG = (
    "config.yaml",
    "state.json",
    "checkpoint.safetensors",
    "metrics.jsonl",
    "result.json",
    "log",
)
STATES = ("pending", "running", "done", "failed")
# Keys a result.json must have to count as complete (a run killed mid-write leaves none of it).
RESULT_KEYS = ("run_id", "natural", "robust", "average_robust")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON; key order kept (result.json lists attacks in the grid's order)."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json(path: Path) -> Any | None:
    """JSON content, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class RunDir:
    """One run's directory: `<output>/runs/<run_id>/`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    def config(self) -> RunConfig:
        return load_run(self.file(CONFIG))

    def state(self) -> dict[str, Any]:
        state = read_json(self.file(STATE)) or {}
        return {
            "state": "pending",
            "attempts": 0,
            "requeues": 0,
            "job_id": None,
            "error": None,
            "updated": None,
            **state,
        }

    def update_state(self, **fields: Any) -> dict[str, Any]:
        state = {**self.state(), **fields, "updated": time.time()}
        if state["state"] not in STATES:
            raise ValueError(f"unknown run state {state['state']!r}")
        write_json(self.file(STATE), state)
        return state

    def result(self) -> dict[str, Any] | None:
        result = read_json(self.file(RESULT))
        if not isinstance(result, dict) or any(key not in result for key in RESULT_KEYS):
            return None
        return result

    def is_complete(self) -> bool:
        return self.result() is not None

    def metrics(self) -> list[dict[str, Any]]:
        try:
            lines = self.file(METRICS).read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.file(METRICS).open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def prepare(spec: RunSpec) -> RunDir:
    """Create the run directory with its config and a pending state, keeping what already exists."""
    run = RunDir(spec.run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    if not run.file(CONFIG).exists():
        text = yaml.safe_dump(spec.config.model_dump(mode="json"), sort_keys=False)
        write_atomic(run.file(CONFIG), text.encode())
    if not run.file(STATE).exists():
        run.update_state(state="pending", label=spec.label)
    elif "label" not in run.state():
        run.update_state(label=spec.label)
    return run


def find_runs(root: Path) -> list[RunDir]:
    """Run directories under an output directory (or a single run directory itself)."""
    root = Path(root)
    if (root / CONFIG).is_file():
        return [RunDir(root)]
    base = root / "runs" if (root / "runs").is_dir() else root
    if not base.is_dir():
        return []
    return [RunDir(p.parent) for p in sorted(base.glob(f"*/{CONFIG}"))]


def write_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> None:
    """Save tensors + JSON metadata as one safetensors file, atomically."""
    from safetensors.torch import save

    flat = {key: value.detach().contiguous().cpu().clone() for key, value in tensors.items()}
    write_atomic(Path(path), save(flat, metadata={"samat": json.dumps(metadata, sort_keys=True)}))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint written by write_checkpoint; CheckpointError if it is unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    fix = "delete it to restart the run from scratch"
    try:
        raw = path.read_bytes()
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
        metadata = json.loads(header["__metadata__"]["samat"])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt ({reason}); {fix}") from None
    return tensors, metadata
