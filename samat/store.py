"""The run directory: atomic writes, the run's state machine, checkpoints and evaluation records.

A run directory is one trained model (its id hashes what determines the weights) plus records
beside it, one per evaluation. Layout of `<output>/runs/<run_id>/`:

    config.yaml                  the training config (data, model, method, train, seed)
    eval.json                    the current evaluation request (written at submit / `samat eval`)
    state.json                   the state machine below, owned by this module
    checkpoint.safetensors       model, optimizer, position (epoch, step), RNG states
    checkpoint-best.safetensors  the validation-best weights (`train.keep: best`)
    metrics.jsonl                one line per epoch
    evals/<key>.json             one record per evaluation (clean accuracy, each attack)
    evals/<key>.partial.json     the finished batches of an evaluation in progress
    result.json                  the summary of the records for the current request
    log                          the run's log
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from samat.config import ConfigError, EvalConfig, RunConfig, read_yaml, validate_run

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
CHECKPOINT_BEST, EVAL_REQUEST, EVALS = "checkpoint-best.safetensors", "eval.json", "evals"
STATES = ("pending", "running", "done", "failed", "cancelled")
# Keys a result.json must have to count as complete (a run killed mid-write leaves none of it).
RESULT_KEYS = ("run_id", "natural", "robust", "average_robust")
# Prefix of the folders that `--force` moves a run's previous training into.
REPLACED = "replaced-"


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read."""


def _file_mode() -> int:
    # mkstemp creates 0600; run files are shared with the group like any file the user writes
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(path: Path) -> None:
    # a rename is durable only once the directory entry is: matters on NFS and after power loss
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        _fsync_dir(path.parent)


def write_json(path: Path, data: Any, *, sync: bool = True) -> None:
    """Atomic JSON; key order kept (result.json lists attacks in the grid's order)."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), sync=sync)


def read_json(path: Path) -> Any | None:
    """JSON content, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def canonical_key(data: Any) -> str:
    """Short hash of JSON-able data with sorted keys: equal content, equal key."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class RunState:
    """The run's state machine (state.json): every transition is a method of RunDir.

    pending -> running -> done | failed | cancelled; `trained` says the final checkpoint exists,
    so a later task only evaluates. `job_id` is the scheduler's id of the task that owns the run.
    """

    state: str = "pending"
    trained: bool = False
    attempts: int = 0
    requeues: int = 0
    job_id: str | None = None
    error: str | None = None
    # "deterministic" (NaN loss, bad config: resubmitting gives the same failure) or "infra"
    failure: str | None = None
    label: str | None = None
    host: str | None = None
    catastrophic_overfitting_epoch: int | None = None
    updated: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> RunState:
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in fields(cls)} - {"extra"}
        state = cls(**{k: v for k, v in data.items() if k in known})
        state.extra = {k: v for k, v in data.items() if k not in known and k != "extra"}
        if state.state not in STATES:
            state.state = "pending"
        return state

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        return {**data, **extra}

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, self.extra.get(key, default))

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class RunDir:
    """One run's directory: `<output>/runs/<run_id>/`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    # -- config and evaluation request --------------------------------------------------------

    def training_config(self) -> dict[str, Any]:
        data = read_yaml(self.file(CONFIG))
        if "eval" in data:
            raise ConfigError(
                f"{self.path} was made by samat 0.1, whose run ids included the eval section; "
                "submit the grid again into a new output directory (its models retrain once)"
            )
        return data

    def eval_request(self) -> EvalConfig:
        request = read_json(self.file(EVAL_REQUEST))
        try:
            return EvalConfig.model_validate(request or {})
        except ValueError:
            raise ConfigError(
                f"{self.file(EVAL_REQUEST)} is not a valid evaluation request; "
                "submit the grid again to rewrite it"
            ) from None

    def config(self) -> RunConfig:
        """The run config: the training part from config.yaml, eval from eval.json."""
        data = self.training_config()
        data["eval"] = self.eval_request().model_dump(mode="json")
        return validate_run(data, str(self.file(CONFIG)))

    def request_key(self) -> str:
        return canonical_key(read_json(self.file(EVAL_REQUEST)) or {})

    def set_eval_request(self, request: EvalConfig) -> bool:
        """Write the evaluation request; True when it changed."""
        data = request.model_dump(mode="json")
        if read_json(self.file(EVAL_REQUEST)) == data:
            return False
        write_json(self.file(EVAL_REQUEST), data)
        return True

    # -- state machine ------------------------------------------------------------------------

    def state(self) -> RunState:
        return RunState.from_json(read_json(self.file(STATE)))

    def _write(self, state: RunState, sync: bool = True) -> RunState:
        state.updated = time.time()
        write_json(self.file(STATE), state.to_json(), sync=sync)
        return state

    def _change(self, **values: Any) -> RunState:
        state = self.state()
        for key, value in values.items():
            setattr(state, key, value)
        return self._write(state)

    def mark_pending(self, label: str | None = None) -> RunState:
        """Ready to be (re)submitted: keeps training progress, clears the last error."""
        return self._change(
            state="pending", error=None, failure=None, label=label or self.state().label
        )

    def mark_submitted(self, job_id: str | None) -> RunState:
        return self._change(state="pending", job_id=job_id, error=None, failure=None)

    def mark_running(self, host: str, job_id: str | None) -> RunState:
        state = self.state()
        state.state, state.attempts, state.host, state.error = (
            "running",
            state.attempts + 1,
            host,
            None,
        )
        state.failure = None
        if job_id is not None:
            state.job_id = job_id
        return self._write(state)

    def mark_requeued(self) -> RunState:
        state = self.state()
        state.requeues += 1
        return self._write(state)

    def mark_trained(self) -> RunState:
        return self._change(trained=True)

    def mark_done(self) -> RunState:
        return self._change(state="done", error=None, failure=None)

    def mark_failed(self, error: str, *, deterministic: bool) -> RunState:
        kind = "deterministic" if deterministic else "infra"
        return self._change(state="failed", error=error, failure=kind)

    def mark_cancelled(self) -> RunState:
        return self._change(state="cancelled")

    def record_overfitting(self, epoch: int) -> RunState:
        return self._change(catastrophic_overfitting_epoch=epoch)

    # -- results ------------------------------------------------------------------------------

    def result(self) -> dict[str, Any] | None:
        result = read_json(self.file(RESULT))
        if not isinstance(result, dict) or any(key not in result for key in RESULT_KEYS):
            return None
        return result

    def is_complete(self) -> bool:
        """Trained, and result.json answers the current evaluation request."""
        result = self.result()
        return result is not None and result.get("request") == self.request_key()

    def metrics(self) -> list[dict[str, Any]]:
        try:
            lines = self.file(METRICS).read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One line per epoch; a line for an epoch already there (a kill before the checkpoint's
        rename, then a resume) replaces it instead of appearing twice."""
        kept = [m for m in self.metrics() if m.get("epoch") != record.get("epoch")]
        text = "".join(json.dumps(m, sort_keys=True) + "\n" for m in [*kept, record])
        write_atomic(self.file(METRICS), text.encode(), sync=False)

    def truncate_metrics(self, epochs: int) -> None:
        """Drop lines past the checkpoint's epoch (written before a kill lost the checkpoint)."""
        kept = [m for m in self.metrics() if int(m.get("epoch", 0)) <= epochs]
        if len(kept) != len(self.metrics()):
            text = "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept)
            write_atomic(self.file(METRICS), text.encode(), sync=False)

    # -- evaluation records -------------------------------------------------------------------

    def eval_dir(self) -> Path:
        return self.path / EVALS

    def eval_record(self, key: str) -> dict[str, Any] | None:
        record = read_json(self.eval_dir() / f"{key}.json")
        return record if isinstance(record, dict) and "accuracy" in record else None

    def eval_records(self) -> list[dict[str, Any]]:
        """Every finished evaluation record, oldest first."""
        folder = self.eval_dir()
        if not folder.is_dir():
            return []
        records = [
            read_json(p) for p in folder.glob("*.json") if not p.name.endswith(".partial.json")
        ]
        records = [r for r in records if isinstance(r, dict) and "accuracy" in r]
        return sorted(records, key=lambda r: r.get("finished", 0))

    def write_eval_record(self, record: dict[str, Any]) -> None:
        write_json(self.eval_dir() / f"{record['key']}.json", record)
        (self.eval_dir() / f"{record['key']}.partial.json").unlink(missing_ok=True)

    def eval_progress(self, key: str) -> dict[str, Any]:
        partial = read_json(self.eval_dir() / f"{key}.partial.json")
        return partial if isinstance(partial, dict) else {}

    def save_eval_progress(self, key: str, progress: dict[str, Any]) -> None:
        write_json(self.eval_dir() / f"{key}.partial.json", progress)

    # -- housekeeping -------------------------------------------------------------------------

    def clean_temp_files(self) -> None:
        """Remove temp files a killed writer left behind (`.name.XXXX.tmp`)."""
        for folder in (self.path, self.eval_dir()):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
                tmp.unlink(missing_ok=True)

    def move_training_aside(self) -> Path | None:
        """`--force`: move checkpoints, metrics, evaluations and result into `replaced-<time>/`
        and reset the state, so that the run trains again from epoch 0 and reads as not done."""
        names = [CHECKPOINT, CHECKPOINT_BEST, METRICS, RESULT, EVALS, LOG]
        present = [name for name in names if self.file(name).exists()]
        target = None
        if present:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            target = self.path / f"{REPLACED}{stamp}"
            suffix = 1
            while target.exists():
                target, suffix = self.path / f"{REPLACED}{stamp}-{suffix}", suffix + 1
            target.mkdir()
            # result.json first: from here on the run cannot read as done
            for name in sorted(present, key=lambda n: n != RESULT):
                shutil.move(str(self.file(name)), str(target / name))
        state = self.state()
        self._write(RunState(label=state.label, job_id=state.job_id, extra=state.extra))
        return target


def record_keys(config: RunConfig) -> dict[str, str]:
    """The evaluation records a run's request asks for, label -> key ("natural" and
    "natural_subset" first, then each attack). A key hashes what determines the number: the
    attack's canonical spec (not its label), the images (n_examples as requested, subset_seed),
    the attack seed and the checkpoint (last or best)."""
    from samat import attacks

    request = config.eval
    checkpoint = request.checkpoint or config.train.keep
    images = {
        "n_examples": request.n_examples,
        "subset_seed": request.subset_seed,
        "seed": config.seed,
        "checkpoint": checkpoint,
    }
    keys = {
        "natural": canonical_key({"clean": "all", "checkpoint": checkpoint}),
        "natural_subset": canonical_key({"clean": "subset", **images}),
    }
    for spec in attacks.resolve(request.attacks):
        keys[attacks.label(spec)] = canonical_key({"attack": attacks.canonical(spec), **images})
    return keys


def missing_records(run: RunDir, config: RunConfig) -> list[str]:
    """Labels of the requested evaluations without a stored record."""
    return [label for label, key in record_keys(config).items() if run.eval_record(key) is None]


def training_yaml(config: RunConfig) -> str:
    data = config.model_dump(mode="json", exclude={"eval"})
    return yaml.safe_dump(data, sort_keys=False)


def prepare(spec: RunSpec, *, sync: bool = True) -> RunDir:
    """Create the run directory with its training config, evaluation request and a pending state,
    keeping what already exists (training progress, records)."""
    run = RunDir(spec.run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    if not run.file(CONFIG).exists():
        write_atomic(run.file(CONFIG), training_yaml(spec.config).encode(), sync=sync)
    else:
        run.training_config()  # an old layout is an error here, before anything is submitted
    if read_json(run.file(EVAL_REQUEST)) != spec.config.eval.model_dump(mode="json"):
        write_json(run.file(EVAL_REQUEST), spec.config.eval.model_dump(mode="json"), sync=sync)
    state = run.state()
    if not run.file(STATE).exists() or state.label != spec.label:
        state.label = spec.label
        run._write(state, sync=sync)
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
