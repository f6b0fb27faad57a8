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
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from samat import safeyaml
from samat.errors import ConfigError
from samat.files import current_umask, fsync_dir, temp_file
from samat.files import open_append as open_append  # re-exported: the run files' writers
from samat.files import write_atomic as write_atomic

if TYPE_CHECKING:
    import torch

    from samat.config import EvalConfig, RunConfig
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
# state.json's count of a run's infrastructure failures since it last succeeded; a submit
# retries such a run until the count reaches MAX_INFRA_FAILURES, then only with --retry-failed
INFRA_FAILURES = "infra_failures"
# state.json's, each checkpoint's and each evaluation record's token of the training they belong to
LINEAGE = "lineage"
MAX_INFRA_FAILURES = 3
# Prefix of the folders that `--force` moves a run's previous training into.
REPLACED = "replaced-"


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read."""


def write_batch(files: Sequence[tuple[Path, bytes]]) -> None:
    """Write many files, each atomically (temp file + rename) and none fsynced on its own: every
    temp file first, one flush of their filesystem (sync_filesystem), then the renames. Renaming
    over an existing file makes ext4 (auto_da_alloc) write the new file out there and then, one
    file at a time; flushed before, the renames only change directory entries."""
    temps: list[str] = []
    try:
        for path, data in files:
            fd, tmp = temp_file(Path(path))
            temps.append(tmp)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        if temps:
            sync_filesystem(Path(temps[0]).parent)
        for (path, _), tmp in zip(files, temps, strict=True):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any, *, sync: bool = True) -> None:
    """Atomic JSON; key order kept (result.json lists attacks in the grid's order)."""
    write_atomic(path, _json_bytes(data), sync=sync)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def _request_bytes(request: dict[str, Any]) -> bytes:
    """eval.json's bytes, made once per distinct request (the indented encoder is Python's)."""
    key = json.dumps(request)
    text = _REQUESTS.get(key)
    if text is None:
        if len(_REQUESTS) >= 1024:
            _REQUESTS.clear()
        text = _REQUESTS[key] = _json_bytes(request)
    return text


_REQUESTS: dict[str, bytes] = {}


def read_json(path: Path) -> Any | None:
    """JSON content, or None when the file is missing or not valid JSON."""
    return _parse_json(_read_bytes(path))


def _read_bytes(path: Path | str) -> bytes | None:
    """The file's bytes, or None when it cannot be read (os.read: a third of open()'s cost)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _parse_json(raw: bytes | None) -> Any | None:
    if raw is None:
        return None
    try:
        return json.loads(raw.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; deep nesting
        return None


def sync_filesystem(path: Path) -> None:
    """Make every write so far on the filesystem that holds `path` durable, in one call: what a
    pass that wrote many run files without fsync (`write_atomic(sync=False)`) does at its end,
    instead of an fsync per file. Linux: syncfs(2) on that filesystem; elsewhere sync(2)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            if _syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)


def _syncfs(fd: int) -> int:
    """syncfs(2) on Linux: 0 when done, else -1 (also where there is none)."""
    if not sys.platform.startswith("linux"):
        return -1
    import ctypes

    try:
        return int(ctypes.CDLL(None, use_errno=True).syncfs(fd))
    except (AttributeError, OSError):
        return -1


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
        known = _STATE_FIELDS
        # a field of the wrong type (a damaged or hand-edited file) reads as its default
        state = cls(**{k: v for k, v in data.items() if k in known and _STATE_TYPES[k](v)})
        state.extra = {k: v for k, v in data.items() if k not in known and k != "extra"}
        if state.state not in STATES:
            state.state = "pending"
        return state

    def to_json(self) -> dict[str, Any]:
        # the fields in their order, then extra (as dataclasses.asdict, at a tenth of its cost)
        data = {name: getattr(self, name) for name in _STATE_ORDER}
        return {**data, **copy.deepcopy(self.extra)} if self.extra else data

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, self.extra.get(key, default))

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def infra_failures(state: RunState) -> int:
    """The run's infrastructure failures in a row (state.json's INFRA_FAILURES; 0 if damaged)."""
    count = state.extra.get(INFRA_FAILURES)
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def _is(*types: type) -> Any:
    return lambda v: isinstance(v, types) and not (isinstance(v, bool) and bool not in types)


_text, _count = _is(str, type(None)), _is(int)
_STATE_TYPES: dict[str, Any] = {
    "state": _is(str),
    "trained": _is(bool),
    "attempts": _count,
    "requeues": _count,
    "job_id": _text,
    "error": _text,
    "failure": _text,
    "label": _text,
    "host": _text,
    "catastrophic_overfitting_epoch": _is(int, type(None)),
    "updated": _is(int, float, type(None)),
}
_STATE_ORDER = tuple(f.name for f in fields(RunState) if f.name != "extra")
_STATE_FIELDS = frozenset(_STATE_ORDER)


class RunDir:
    """One run's directory: `<output>/runs/<run_id>/`."""

    def __init__(self, path: Path) -> None:
        self.path = path if isinstance(path, Path) else Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    # -- config and evaluation request --------------------------------------------------------

    def training_config(self) -> dict[str, Any]:
        from samat.config import read_yaml  # pydantic: not for status's one pass

        return _training_part(self, read_yaml(self.file(CONFIG)))

    def eval_request(self) -> EvalConfig:
        return _eval_request(self, read_json(self.file(EVAL_REQUEST)))

    def config(self) -> RunConfig:
        """The run config: the training part from config.yaml, eval from eval.json."""
        return _run_config(self, self.training_config(), read_json(self.file(EVAL_REQUEST)))

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
        state = self.state()
        state.extra.pop(INFRA_FAILURES, None)
        state.state, state.error, state.failure = "done", None, None
        return self._write(state)

    def mark_failed(self, error: str, *, deterministic: bool) -> RunState:
        state = self.state()
        if not deterministic:  # counted: a resubmit retries it a bounded number of times
            state.extra[INFRA_FAILURES] = infra_failures(state) + 1
        state.state, state.error = "failed", error
        state.failure = "deterministic" if deterministic else "infra"
        return self._write(state)

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
        """Trained, and result.json answers the current evaluation request with the current
        weights (a result of an earlier training, left by an interrupted --force, does not)."""
        result = self.result()
        if result is None or result.get("request") != self.request_key():
            return False
        lineage = self.lineage()
        return lineage is None or result.get(LINEAGE) == lineage

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

    # -- lineage: which training the weights (and so the records) come from -------------------

    def lineage(self) -> str | None:
        """The token of the training that made the run's weights: drawn when the run trains
        from scratch, kept by every resume, stamped into each checkpoint and evaluation record.
        None for a run of an earlier release, whose records are all its own."""
        value = self.state().extra.get(LINEAGE)
        return value if isinstance(value, str) else None

    def start_lineage(self, token: str | None = None) -> str:
        """A new training from scratch (or, with token, the one a checkpoint names)."""
        token = token or os.urandom(8).hex()
        state = self.state()
        state.extra[LINEAGE] = token
        self._write(state)
        return token

    def eval_record(self, key: str, lineage: Any = ...) -> dict[str, Any] | None:
        """The stored record of `key`, if it measured the current weights: a record of another
        training (left by an interrupted `--force`, or copied) counts as missing."""
        record = read_json(self.eval_dir() / f"{key}.json")
        if not isinstance(record, dict) or "accuracy" not in record:
            return None
        current = self.lineage() if lineage is ... else lineage
        if current is not None and record.get(LINEAGE) != current:
            return None
        return record

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
        lineage = self.lineage()
        if lineage is not None:
            record = {**record, LINEAGE: lineage}
        write_json(self.eval_dir() / f"{record['key']}.json", record)
        (self.eval_dir() / f"{record['key']}.partial.json").unlink(missing_ok=True)

    def eval_progress(self, key: str) -> dict[str, Any]:
        """The stored batches of an unfinished evaluation, if of the current weights."""
        partial = read_json(self.eval_dir() / f"{key}.partial.json")
        if not isinstance(partial, dict):
            return {}
        lineage = self.lineage()
        return partial if lineage is None or partial.get(LINEAGE) == lineage else {}

    def save_eval_progress(self, key: str, progress: dict[str, Any]) -> None:
        lineage = self.lineage()
        if lineage is not None:
            progress = {**progress, LINEAGE: lineage}
        write_json(self.eval_dir() / f"{key}.partial.json", progress)

    # -- housekeeping -------------------------------------------------------------------------

    def clean_temp_files(self) -> None:
        """Remove temp files a killed writer left behind (`.name.XXXX.tmp`)."""
        for folder in (self.path, self.eval_dir()):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
                tmp.unlink(missing_ok=True)

    def move_training_aside(self, *, sync: bool = True) -> Path | None:
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
        self._write(RunState(label=state.label, job_id=state.job_id, extra=state.extra), sync)
        return target


def change_states(changes: Iterable[tuple[RunDir, dict[str, Any]]]) -> None:
    """State transitions of many runs (run, the fields to set) in one batch (write_batch): each
    state.json replaced whole, no fsync per file; what a submit does when it records job ids."""
    files = []
    for run, values in changes:
        state = run.state()
        for key, value in values.items():
            setattr(state, key, value)
        state.updated = time.time()
        files.append((run.file(STATE), _json_bytes(state.to_json())))
    write_batch(files)


def _training_part(run: RunDir, data: dict[str, Any]) -> dict[str, Any]:
    if "eval" in data:
        raise ConfigError(
            f"{run.path} was made by samat 0.1, whose run ids included the eval section; "
            "submit the grid again into a new output directory (its models retrain once)"
        )
    return data


def _eval_request(run: RunDir, request: Any) -> EvalConfig:
    from samat.config import EvalConfig

    try:
        return EvalConfig.model_validate(request or {})
    except ValueError:
        raise ConfigError(
            f"{run.file(EVAL_REQUEST)} is not a valid evaluation request; "
            "submit the grid again to rewrite it"
        ) from None


def _run_config(run: RunDir, training: dict[str, Any], request: Any) -> RunConfig:
    from samat.config import validate_run

    data = {**training, "eval": _eval_request(run, request).model_dump(mode="json")}
    return validate_run(data, str(run.file(CONFIG)))


# A line that starts a top-level key of a block mapping (samat writes config.yaml so).
_TOP_LEVEL_KEY = re.compile(r"\n(?=[\w\"'])")


@dataclass
class RunView:
    """What one pass read of a run directory: its state, result and evaluation request's key as
    RunDir gives them; the config on demand (`RunReader.config`)."""

    run: RunDir
    state: RunState
    result: dict[str, Any] | None
    request_key: str
    config_text: bytes | None
    request_text: bytes | None

    def is_complete(self) -> bool:
        """RunDir.is_complete, from what was read."""
        return self.result is not None and self.result.get("request") == self.request_key


class RunReader:
    """Reads many run directories in one pass (status, collect, submit) with the answers of
    RunDir's readers, errors included, and without repeating work the runs share.

    Each file is read once per run. config.yaml is split at its top-level keys; each distinct
    piece is parsed once with libyaml (runs of a grid differ in a few keys and the seed), and
    each distinct config without its seed is validated once, the seed then set on a copy. What
    the split cannot take (a document that is not a plain block mapping) or what fails is read
    again by RunDir itself, which gives the same value or the same ConfigError. The parsed
    pieces are shared between runs: callers must not change what they get.
    """

    def __init__(self) -> None:
        self._pieces: dict[str, Any] = {}
        self._configs: dict[Hashable, RunConfig] = {}
        self._request_keys: dict[bytes | None, str] = {}

    def read(self, run: RunDir) -> RunView:
        folder = os.path.join(run.path, "")
        result = _parse_json(_read_bytes(folder + RESULT))
        if not isinstance(result, dict) or any(key not in result for key in RESULT_KEYS):
            result = None
        request = _read_bytes(folder + EVAL_REQUEST)
        key = self._request_keys.get(request)
        if key is None:
            key = self._request_keys[request] = canonical_key(_parse_json(request) or {})
        return RunView(
            run,
            RunState.from_json(_parse_json(_read_bytes(folder + STATE))),
            result,
            key,
            _read_bytes(folder + CONFIG),
            request,
        )

    def read_all(self, runs: Iterable[RunDir]) -> list[RunView]:
        return [self.read(run) for run in runs]

    def training_config(self, run: RunDir, text: bytes | None = None) -> dict[str, Any]:
        """RunDir.training_config (the nested values shared: read them only)."""
        pieces = self._pieces_of(run, text)
        if pieces is None:
            return run.training_config()
        data: dict[str, Any] = {}
        for _, value in pieces:
            data.update(value)
        return _training_part(run, data)

    def config(self, view: RunView) -> RunConfig:
        """RunDir.config of the run read into `view` (or its ConfigError)."""
        config, seed, _ = self.shared_config(view)
        return config if config.seed == seed else config.model_copy(update={"seed": seed})

    def shared_config(self, view: RunView) -> tuple[RunConfig, int, Hashable]:
        """(config, seed, key): the run's config but for its seed (the same object for runs that
        differ only in the seed), the run's seed, and a key equal for the runs that share the
        config (what does not depend on the seed is computed once per key). The ConfigError
        of RunDir.config where the config is not valid."""
        run = view.run
        pieces = self._pieces_of(run, view.config_text)
        if pieces is None:
            config = run.config()
            return config, config.seed, ("whole", run.path)
        seeds = [i for i, (_, value) in enumerate(pieces) if "seed" in value]
        seed: int | None = None
        if len(seeds) == 1 and len(pieces[seeds[0]][1]) == 1:
            value = pieces[seeds[0]][1]["seed"]
            seed = value if type(value) is int else None
        if seed is None:
            key: Hashable = ("whole", tuple(text for text, _ in pieces), view.request_text)
        else:
            rest = tuple(text for i, (text, _) in enumerate(pieces) if i != seeds[0])
            key = ("seed", rest, view.request_text)
        config = self._configs.get(key)
        if config is None:
            training: dict[str, Any] = {}
            for _, value in pieces:
                training.update(value)
            training = _training_part(run, training)
            config = _run_config(run, training, _parse_json(view.request_text))
            self._configs[key] = config
        return config, config.seed if seed is None else seed, key

    def _pieces_of(self, run: RunDir, text: bytes | None) -> list[tuple[str, Any]] | None:
        """config.yaml as (top-level piece, its mapping) pairs; None where RunDir must read it."""
        if text is None:
            text = _read_bytes(run.file(CONFIG))
        try:
            document = text.decode() if text is not None else ""
        except UnicodeDecodeError:
            return None
        if not document or not (document[0].isalnum() or document[0] in "_\"'"):
            return None
        pieces = []
        for piece in _TOP_LEVEL_KEY.split(document):
            value = self._pieces.get(piece, _MISSING)
            if value is _MISSING:
                value = self._pieces[piece] = _parse_piece(piece)
            if value is None:
                return None
            pieces.append((piece, value))
        return pieces


_MISSING = object()
# `seed: 12`: what YAML reads as {"seed": 12} (a decimal int), without the parser
_SEED_LINE = re.compile(r"seed: (-?(?:0|[1-9][0-9]*))\n?")


def _parse_piece(piece: str) -> dict[str, Any] | None:
    """One top-level piece of config.yaml as a mapping; None when it is not one."""
    match = _SEED_LINE.fullmatch(piece)
    if match is not None:
        return {"seed": int(match.group(1))}
    try:
        value = safeyaml.load(piece)
    except yaml.YAMLError:
        return None
    return value if isinstance(value, dict) else None


def images_key(config: RunConfig, checkpoint: str) -> dict[str, Any]:
    """What decides which images an attack ran on and with which weights: part of every attacked
    record's key and fields (n_examples as requested, subset_seed, the attack seed, last/best)."""
    request = config.eval
    key = {
        "n_examples": request.n_examples,
        "subset_seed": request.subset_seed,
        "seed": config.seed,
        "checkpoint": checkpoint,
    }
    if request.scoring_stats != "data":  # only when set: older records keep their keys
        key["scoring_stats"] = request.scoring_stats
    return key


def record_keys(config: RunConfig) -> dict[str, str]:
    """The evaluation records a run's request asks for, label -> key ("natural" and
    "natural_subset" first, then each attack). A key hashes what determines the number: the
    attack's canonical spec (not its label), the images (n_examples as requested, subset_seed),
    the attack seed and the checkpoint (last or best)."""
    from samat import attacks

    request = config.eval
    checkpoint = request.checkpoint or config.train.keep
    images = images_key(config, checkpoint)
    keys = {
        "natural": canonical_key({"clean": "all", "checkpoint": checkpoint}),
        "natural_subset": canonical_key({"clean": "subset", **images}),
    }
    for spec in attacks.resolve(request.attacks):
        keys[attacks.label(spec)] = canonical_key({"attack": attacks.canonical(spec), **images})
    return keys


def missing_records(run: RunDir, config: RunConfig) -> list[str]:
    """Labels of the requested evaluations without a stored record of the current weights."""
    lineage = run.lineage()
    keys = record_keys(config)
    return [label for label, key in keys.items() if run.eval_record(key, lineage) is None]


def training_yaml(config: RunConfig) -> str:
    """config.yaml's text: the training config in block style, the seed last. A grid's runs
    differ mostly in the seed: the text of each config without it is made once (the seed line
    of an int is `seed: N`, whatever the rest), the pure-Python emitter being slow."""
    data = config.model_dump(mode="json", exclude={"eval"})
    if not data["track"]:
        del data["track"]  # config.yaml of a run without trackers as before they existed
    if data["train"].get("iterations") is not None:
        del data["train"]["epochs"]  # derived from the steps; reading both back is an error
    seed = data.get("seed")
    if type(seed) is not int or list(data)[-1] != "seed":
        return yaml.safe_dump(data, sort_keys=False)
    key = json.dumps({**data, "seed": 0})
    head = _TRAINING_YAML.get(key)
    if head is None:
        text = yaml.safe_dump({**data, "seed": 0}, sort_keys=False)
        if not text.endswith("\nseed: 0\n"):
            return yaml.safe_dump(data, sort_keys=False)
        if len(_TRAINING_YAML) >= 4096:
            _TRAINING_YAML.clear()
        head = _TRAINING_YAML[key] = text.removesuffix("0\n")
    return f"{head}{seed}\n"


# training_yaml's texts without the seed's value, by the config's JSON with seed 0
_TRAINING_YAML: dict[str, str] = {}


def prepare(
    spec: RunSpec,
    *,
    sync: bool = True,
    reader: RunReader | None = None,
    new_state: bool = True,
    **state: Any,
) -> RunDir:
    """Create the run directory with its training config, evaluation request and a pending state,
    keeping what already exists (training progress, records). `state`: fields of state.json to
    set in the same write (submit: state="pending", error=None, ...). With sync=False nothing is
    fsynced (a pass over many runs syncs once at its end: sync_filesystem); a `reader` shared
    over the pass parses the configs' common parts once. new_state=False: a new run directory
    gets no state.json (a submit writes it once, with the job id, when the run is queued)."""
    run = RunDir(spec.run_dir)
    if not run.path.exists() and _create_run_dir(run, spec, state, sync=sync, new_state=new_state):
        return run
    run.path.mkdir(parents=True, exist_ok=True)
    if not run.file(CONFIG).exists():
        write_atomic(run.file(CONFIG), training_yaml(spec.config).encode(), sync=sync)
    else:
        # an old layout is an error here, before anything is submitted
        (reader or RunReader()).training_config(run)
    request = spec.config.eval.model_dump(mode="json")
    if read_json(run.file(EVAL_REQUEST)) != request:
        write_json(run.file(EVAL_REQUEST), request, sync=sync)
    raw = _read_bytes(run.file(STATE))
    current = RunState.from_json(_parse_json(raw))
    if raw is None or state or current.label != spec.label:
        current.label = spec.label
        for key, value in state.items():
            setattr(current, key, value)
        run._write(current, sync=sync)
    return run


def _create_run_dir(
    run: RunDir, spec: RunSpec, state: dict[str, Any], *, sync: bool, new_state: bool = True
) -> bool:
    """A new run directory made whole at once: its files written into a hidden temp folder
    beside it (`.<run id>.XXXXXXXX.tmp`, which find_runs skips), then renamed into place:
    one rename for the run instead of one per file, and never a run directory without its
    config. False (nothing changed) when the directory appeared meanwhile."""
    current = RunState(label=spec.label)
    for key, value in state.items():
        setattr(current, key, value)
    current.updated = time.time()
    files = {
        CONFIG: training_yaml(spec.config).encode(),
        EVAL_REQUEST: _request_bytes(spec.config.eval.model_dump(mode="json")),
    }
    if new_state:
        files[STATE] = _json_bytes(current.to_json())
    run.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{run.run_id}.", suffix=".tmp", dir=run.path.parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # what mkdir gives, not mkdtemp's 0700
        for name, data in files.items():
            fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if sync:
                    handle.flush()
                    os.fsync(handle.fileno())
        if sync:
            fsync_dir(Path(tmp))
        try:
            os.rename(tmp, run.path)
        except OSError:  # made meanwhile (not empty): prepare it as an existing one
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if sync:
        fsync_dir(run.path.parent)
    return True


def _is_temp(name: str) -> bool:
    """A temp file or folder of write_atomic or _create_run_dir."""
    return name.startswith(".") and name.endswith(".tmp")


def find_runs(root: Path) -> list[RunDir]:
    """Run directories under an output directory (or a single run directory itself): the
    folders of `runs/` (or of root) that hold a config.yaml, by name.

    A symbolic link in `runs/` is not a run: samat never makes one, and following a link that a
    teammate put in a shared output would read, train and write where they chose. It is skipped
    with a warning, as is a run whose config.yaml is a link.
    """
    root = Path(root)
    if (root / CONFIG).is_file():
        return [RunDir(root)]
    base = root / "runs" if (root / "runs").is_dir() else root
    # the folders with a config.yaml, but for a new run being made whole
    # (`.<run id>.XXXXXXXX.tmp`, see _create_run_dir)
    names = []
    try:
        with os.scandir(base) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if _is_temp(entry.name):
                        continue
                    if entry.is_symlink():
                        _skip_link(base / entry.name)
                    elif entry.is_dir(follow_symlinks=False):
                        names.append(entry.name)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        config = base / name / CONFIG
        with contextlib.suppress(OSError):
            mode = config.lstat().st_mode
            if stat.S_ISLNK(mode):
                _skip_link(config)
            elif stat.S_ISREG(mode):
                found.append(RunDir(base / name))
    return found


def _skip_link(path: Path) -> None:
    logging.getLogger("samat").warning(
        "%s is a symbolic link, which samat never makes: skipped (replace it by the run's "
        "folder to use it)",
        path,
    )


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
