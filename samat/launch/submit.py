"""Submit a grid: validate first, skip finished or queued runs, then SLURM arrays or local runs.

Everything that can be checked is checked before anything is written. Then, under the output
directory's lock (`samat.launch.lock`), one pass selects the runs, prepares their directories,
submits and records the job ids, so that two submits of one grid queue each run at most once.

Preparing (`prepare_runs`): every run's config.yaml, eval.json and state.json in one pass, each
written atomically (temp file + rename) without an fsync per file, then one flush of the output's
filesystem (syncfs) before the first sbatch. For SLURM, a new run's state.json is written once,
when its job id is recorded.

Recording: each array's job ids go first into `<output>/submissions.jsonl` (one line per array,
fsynced once), then into the runs' state.json files (not fsynced one by one); a later submit
replays the journal into any state.json that lost its job id. SIGINT, SIGTERM and SIGHUP are
held from sbatch until the array is recorded, and delivered then.

Throttle: `slurm.array_parallelism` (P) bounds the whole grid's running tasks, also when the grid
is split into arrays of at most MaxArraySize (M) tasks. The arrays go into L = max(1, P // M)
lanes (at most the number of arrays); each array waits (`--dependency=afterany:<id>`) for the
one L places before it, so at most L arrays run at once, each with `%P // L`: at most P tasks.
A grid of at most P runs needs neither. (The bound holds within one submit; runs queued by an
earlier submit of the grid count apart.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table
from rich.text import Text
from submitit import LocalExecutor, SlurmExecutor
from submitit.core.utils import FailedJobError, FailedSubmissionError
from submitit.slurm.slurm import _convert_mem, _make_sbatch_string

from samat import claim
from samat.config import ConfigError, ContainerConfig, GridConfig, SlurmConfig, validate_run
from samat.files import fsync_dir, open_append
from samat.grid import RunSpec, expand, preflight
from samat.launch import container, scheduler
from samat.launch.lock import output_lock
from samat.launch.status import follow, plural, result_line, say
from samat.launch.task import PackedTask, RunTask, hold_session
from samat.store import (
    CONFIG,
    MAX_INFRA_FAILURES,
    STATE,
    RunDir,
    RunReader,
    canonical_key,
    change_states,
    find_runs,
    infra_failures,
    missing_records,
    prepare,
    sync_filesystem,
)

T = TypeVar("T")
# unknown: recorded as queued or running, and the scheduler did not answer
ACTIONS = ("train", "eval", "done", "queued", "running", "failed", "unknown")
# One line per submitted array: {"time", "grid", "array", "runs": [run ids], "jobs": [job ids]}.
SUBMISSIONS = "submissions.jsonl"
# an array's SLURM comment: which journal intent queued it (recover_intents)
INTENT_PREFIX = "samat-intent:"


def slurm_parameters(slurm: SlurmConfig, name: str) -> dict[str, Any]:
    """The grid's `slurm:` section as submitit SlurmExecutor parameters (sbatch's names)."""
    params: dict[str, Any] = {
        "job_name": f"samat-{name}",
        "time": slurm.timeout_min,
        "cpus_per_task": slurm.cpus_per_task,
        "array_parallelism": slurm.array_parallelism,
        "signal_delay_s": slurm.signal_delay_s,
    }
    optional = {
        "partition": slurm.partition,
        "account": slurm.account,
        "qos": slurm.qos,
        "constraint": slurm.constraint,
        # --gpus-per-node=0 is refused where there is no GPU gres: ask only for a positive count
        "gpus_per_node": slurm.gpus_per_node or None,
        "mem": _convert_mem(slurm.mem_gb) if slurm.mem_gb else None,
        "setup": list(slurm.setup) or None,
        "additional_parameters": dict(slurm.additional_parameters) or None,
    }
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def array_chunks(items: Sequence[T], max_size: int) -> list[list[T]]:
    """Consecutive slices of at most max_size items: one SLURM array each (MaxArraySize)."""
    return [list(items[i : i + max_size]) for i in range(0, len(items), max_size)]


@dataclass(frozen=True)
class Chunk:
    """One SLURM array of a grid: its runs [start, start + size), its own `%throttle`, and the
    index of the array it waits for (afterany), if any."""

    start: int
    size: int
    throttle: int
    after: int | None = None


def plan_chunks(count: int, max_size: int, parallelism: int) -> list[Chunk]:
    """Split `count` runs into arrays of at most max_size so that at most `parallelism` tasks of
    them run at once (see the module's docstring: lanes of arrays chained by afterany)."""
    sizes = [len(c) for c in array_chunks(range(count), max(1, max_size))]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if count <= parallelism:  # everything may run at once
        return [Chunk(start, size, size) for start, size in zip(starts, sizes, strict=True)]
    lanes = max(1, min(len(sizes), parallelism // max(1, max_size)))
    share = parallelism // lanes
    return [
        Chunk(start, size, min(size, share), index - lanes if index >= lanes else None)
        for index, (start, size) in enumerate(zip(starts, sizes, strict=True))
    ]


def submitit_folder(output: Path) -> Path:
    """Where submitit keeps its pickles and each job's stdout/stderr (one folder per job)."""
    return Path(output).expanduser().absolute() / "submitit" / "%j"


def private_submitit_folder(output: Path) -> Path:
    """submitit's folder, made private (0700) whatever the umask: the pickles in it are what the
    jobs execute, so nobody else may enter it, let alone replace one. A folder that is a link or
    belongs to someone else is refused in one line rather than used."""
    folder = submitit_folder(output).parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(
            f"{folder} is not a folder samat made (a link or a file); remove it, then submit again"
        )
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"{folder} belongs to another user (uid {info.st_uid}): the jobs would run pickles "
            "they can replace; submit to an output directory of your own"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)
    return folder


def make_private(jobs: Sequence[Any]) -> None:
    """The jobs' folders (0700) and the pickles and scripts submitit wrote there (0600), whatever
    the umask; their parent is private already (private_submitit_folder)."""
    for folder in dict.fromkeys(Path(job.paths.folder) for job in jobs):
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o700)
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        os.chmod(entry.path, 0o600)


def executor_settings(grid: GridConfig, output: Path) -> tuple[dict[str, Any], str]:
    """SlurmExecutor parameters and python for a grid; pyxis starts submitit in the image."""
    params = slurm_parameters(grid.slurm, grid.name)
    if grid.container.runtime != "pyxis":
        return params, shlex.quote(sys.executable)
    params["srun_args"] = container.srun_args(grid.container, workdirs=[output.absolute()])
    setup = [*container.env_setup(grid.container, output), *grid.slurm.setup]
    if setup:
        params["setup"] = setup
    return params, container.image_python(grid.container)


def chunk_parameters(params: dict[str, Any], chunk: Chunk, after: str | None) -> dict[str, Any]:
    """The executor parameters of one array: its throttle, and its dependency on `after`."""
    params = {**params, "array_parallelism": chunk.throttle}
    if after is not None:
        extra = dict(params.get("additional_parameters") or {})
        own = f"afterany:{after}"
        extra["dependency"] = f"{own},{extra['dependency']}" if extra.get("dependency") else own
        params["additional_parameters"] = extra
    return params


def sbatch_script(
    params: dict[str, Any], folder: Path, count: int, python: str = shlex.quote(sys.executable)
) -> str:
    """The sbatch file submitit writes for an array of `count` tasks with these parameters."""
    # the same command line as SlurmExecutor._submitit_command_str
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(
        command=command, folder=folder, map_count=count if count > 1 else None, **params
    )


def resolve_executor(executor: str, *, dry_run: bool = False) -> str:
    """'slurm' or 'local' for --executor auto|slurm|local; slurm without sbatch is an error."""
    if executor == "auto":
        return "slurm" if scheduler.has_sbatch() else "local"
    if executor == "slurm" and not dry_run and not scheduler.has_sbatch():
        raise ConfigError(
            "sbatch not found on PATH; install SLURM's client or use --executor local"
        )
    if executor not in ("slurm", "local"):
        raise ConfigError(f"unknown executor {executor!r}; use auto, slurm or local")
    return executor


def check_output_dir(output: Path, *, create: bool) -> None:
    """The output directory exists (or can be made) and takes new files; ConfigError if not."""
    fix = "choose another `output` in the grid file"
    if not create:
        existing = next(p for p in [output, *output.absolute().parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"output directory {output} is not writable ({existing}); {fix}")
        return
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".samat-write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"output directory {output} is not writable ({reason}); {fix}") from None


def check_partition(partition: str | None) -> None:
    """A partition the cluster knows (when sinfo answers); ConfigError listing the known ones."""
    known = scheduler.partitions() if partition else None
    if partition is None or known is None:
        return
    unknown = [p for p in partition.split(",") if p not in known]
    if unknown:
        raise ConfigError(
            f"unknown partition {unknown[0]!r} (slurm.partition); "
            f"this cluster has: {', '.join(known)}"
        )


def container_commands(
    cfg: ContainerConfig, specs: list[RunSpec], output: Path, slurm: SlurmConfig | None = None
) -> dict[str, list[str]]:
    """Each run's container argv, by run id (GPUs, CPU and memory limits from `slurm`)."""
    # with pyxis, srun starts submitit's whole process in the image: the run executes in it
    if cfg.runtime in ("none", "pyxis"):
        return {}
    return {
        spec.run_id: container.task_command(cfg, spec.run_dir, output_root=output, slurm=slurm)
        for spec in specs
    }


@dataclass(frozen=True)
class Action:
    """What a submit does with one run: train (then evaluate), evaluate only, or skip it."""

    kind: str  # one of ACTIONS
    # eval: the requested evaluations without a record (empty: only result.json is rewritten)
    missing: tuple[str, ...] = ()

    @property
    def runs(self) -> bool:
        return self.kind in ("train", "eval")

    def describe(self) -> str:
        if self.kind == "train":
            return "train + eval"
        if self.kind == "unknown":
            return "unknown (queued or running, the scheduler did not answer)"
        if self.kind == "eval":
            names = [m for m in self.missing if m not in ("natural", "natural_subset")]
            return "eval only: " + (", ".join(names) if names else "clean accuracy / summary")
        return self.kind


def select_runs(
    specs: list[RunSpec],
    *,
    force: bool = False,
    retry_failed: bool = False,
    ignore_scheduler: bool = False,
) -> dict[str, Action]:
    """What to do with each run (by run id): train it, evaluate it only, or skip it as done,
    queued, running or failed for a deterministic cause (NaN loss, bad config).

    When the scheduler does not answer, a run recorded as queued or running (a job id, state
    pending or running) is 'unknown' and not run again, unless ignore_scheduler. A cancelled run
    is resumed like a pending one.
    """
    runs = {spec.run_id: RunDir(spec.run_dir) for spec in specs}
    states = {run_id: run.state() for run_id, run in runs.items()}
    ids = [str(s.job_id) for s in states.values() if s.job_id]
    jobs = scheduler.job_states(ids, need_controller=True) if ids else {}
    actions = {}
    for spec in specs:
        run, state = runs[spec.run_id], states[spec.run_id]
        job = (jobs or {}).get(str(state.job_id))
        if job is not None and job.active:
            actions[spec.run_id] = Action("running" if job.state == "RUNNING" else "queued")
        elif (
            jobs is None
            and not ignore_scheduler
            and scheduler.is_slurm_id(str(state.job_id or ""))
            and state.state in ("pending", "running")
        ):
            actions[spec.run_id] = Action("unknown")
        elif claim.holder(run.path) is not None:
            # a live process trains or evaluates it (a local task a killed submit left behind,
            # a `samat run` in a terminal): not started twice
            actions[spec.run_id] = Action("running")
        elif force or not state.trained:
            failed = state.state == "failed" and (
                state.failure == "deterministic" or infra_failures(state) >= MAX_INFRA_FAILURES
            )
            skip = failed and not (force or retry_failed)
            actions[spec.run_id] = Action("failed") if skip else Action("train")
        else:
            missing = tuple(missing_records(run, spec.config))
            result = run.result()
            current = result is not None and result.get("request") == canonical_key(
                spec.config.eval.model_dump(mode="json")
            )
            actions[spec.run_id] = (
                Action("done") if current and not missing else Action("eval", missing)
            )
    return actions


def submit_grid(
    grid: GridConfig,
    *,
    executor: str = "auto",
    dry_run: bool = False,
    force: bool = False,
    retry_failed: bool = False,
    wait: bool = False,
    ignore_scheduler: bool = False,
    console: Console,
) -> int:
    """Validate, then submit a grid's unfinished runs; the exit code for the CLI.

    SLURM: one submitit array per MaxArraySize runs; returns once queued (or, with wait, when all
    tasks have ended). Local: the runs one after another, blocking, one line per finished run.
    Nothing is written before every check has passed; the selection, preparation, submission and
    recording happen under the output directory's lock. Exit code 1 when runs recorded as queued
    or running were left alone because the scheduler did not answer.
    """
    specs = expand(grid)
    preflight(specs)
    output = Path(grid.output or Path("results") / grid.name)
    check_layout(output)
    kind = resolve_executor(executor, dry_run=dry_run)
    check_output_dir(output, create=False)
    if kind == "slurm":
        check_partition(grid.slurm.partition)
    elif grid.container.runtime == "pyxis":
        raise ConfigError(
            "container.runtime 'pyxis' runs through SLURM's srun; use --executor "
            "slurm on the cluster, or runtime apptainer or docker for local runs"
        )
    warnings = container.validate(grid.container)
    commands = container_commands(grid.container, specs, output, grid.slurm)
    for warning in warnings:
        say(console, f"warning: {warning}")
    if dry_run:
        actions = select_runs(
            specs, force=force, retry_failed=retry_failed, ignore_scheduler=ignore_scheduler
        )
        say(console, _executor_line(executor, kind))
        _print_dry_run(grid, specs, actions, kind, output, commands, console)
        return 0
    check_output_dir(output, create=True)
    with output_lock(output, purpose="submit", say=lambda line: say(console, line)):
        recovered = recover_intents(output)
        replay_submissions(output, specs)
        actions = select_runs(
            specs, force=force, retry_failed=retry_failed, ignore_scheduler=ignore_scheduler
        )
        if recovered is None and not ignore_scheduler:
            # an earlier submit stopped between sbatch and its record, and squeue is silent:
            # whether those runs are queued is unknown, so they are not queued again
            for run_id in open_intent_runs(output):
                if run_id in actions and actions[run_id].runs:
                    actions[run_id] = Action("unknown")
        todo = [spec for spec in specs if actions[spec.run_id].runs]
        unknown = sum(action.kind == "unknown" for action in actions.values())
        say(console, _executor_line(executor, kind))
        if unknown:
            say(console, _unknown_line(unknown))
        if not todo:
            say(console, f"nothing to submit: {_count_line(actions)}; results in {output}")
            code = 0
        else:
            prepare_runs(specs, actions, force=force, defer=kind == "slurm")
            say(console, _count_line(actions))
            container.write_env_file(grid.container, output)
            code = _launch(grid, todo, kind, output, commands, console=console)
    if wait and kind == "slurm":
        live = [
            RunDir(s.run_dir)
            for s in specs
            if actions[s.run_id].kind in LIVE or actions[s.run_id].runs
        ]
        code = max(code, follow(live, console=console) if live else 0)
    return max(code, 1 if unknown else 0)


# what a submit leaves queued or running (and --wait follows)
LIVE = ("queued", "running", "unknown")


def _unknown_line(count: int) -> str:
    return (
        f"{plural(count, 'run')} recorded as queued or running not resubmitted: the scheduler "
        "did not answer (squeue failed or timed out); submit again later, or pass "
        "--ignore-scheduler to resubmit them anyway"
    )


def prepare_runs(
    specs: Sequence[RunSpec], actions: dict[str, Action], *, force: bool, defer: bool = False
) -> None:
    """The submit's one pass over the grid's runs, before anything is queued: each run directory
    with its config, evaluation request and state (pending, error cleared, for the runs that
    run: one state.json write), each file written atomically (temp file + rename) without an
    fsync of its own; then one flush of the output's filesystem (store.sync_filesystem) makes
    them all durable before sbatch. A reader shared over the pass parses the common parts of
    the runs' existing configs once. defer (SLURM): a new run's state.json is written once,
    when its job id is recorded (record_submission; `_launch` writes it if sbatch fails)."""
    reader = RunReader()
    pending = {"state": "pending", "error": None, "failure": None}
    if specs:
        clean_temp_folders(specs[0].run_dir.parent)
    for spec in specs:
        if not actions[spec.run_id].runs:
            prepare(spec, sync=False, reader=reader)
        elif force:
            run = prepare(spec, sync=False, reader=reader)
            run.move_training_aside(sync=False)
            _set_state(run, **pending, label=spec.label)
        else:
            prepare(spec, sync=False, reader=reader, new_state=not defer, **pending)
    if specs:
        sync_filesystem(specs[0].run_dir.parent)


# a run's temp folder (store.prepare) older than this was left by a writer that died
TEMP_FOLDER_AGE_S = 600


def clean_temp_folders(runs: Path) -> int:
    """Remove the `.<run id>.XXXX.tmp` folders that a killed `prepare` left in `runs/` (under
    the output lock: no submit or eval is writing one; older than TEMP_FOLDER_AGE_S, so that a
    `samat run CONFIG` preparing its run right now keeps its own). Returns how many."""
    removed = 0
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(runs) as entries:
        for entry in list(entries):
            if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime > TEMP_FOLDER_AGE_S:
                    shutil.rmtree(entry.path)
                    removed += 1
    return removed


def _set_state(run: RunDir, **values: Any) -> None:
    """A state transition written without fsync (many runs in one pass): submissions.jsonl is
    the durable record of what was queued (see replay_submissions)."""
    state = run.state()
    for key, value in values.items():
        setattr(state, key, value)
    run._write(state, sync=False)


def _append_entry(output: Path, entry: dict[str, Any]) -> None:
    """One line of `<output>/submissions.jsonl`, fsynced (and its folder when it is new)."""
    path = Path(output) / SUBMISSIONS
    new = not path.exists()
    with open_append(path) as handle:
        # a line cut by a crash (disk full, a kill mid-write) is closed first: this entry is
        # then a line of its own, not glued to the damaged one and lost with it
        if not new and not _ends_with_newline(path):
            handle.write("\n")
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    if new:
        fsync_dir(path.parent)


def record_intent(
    output: Path, grid_name: str, specs: Sequence[RunSpec], tasks: Sequence[int]
) -> str:
    """Journal what is about to be queued, before sbatch: the runs, the array task of each, and
    a token that goes into the array's SLURM comment. Returns the token."""
    token = os.urandom(8).hex()
    _append_entry(output, _entry(grid_name, specs, intent=token, tasks=list(tasks)))
    return token


def _entry(grid_name: str, specs: Sequence[RunSpec], **fields: Any) -> dict[str, Any]:
    return {"time": time.time(), "grid": grid_name, "runs": [s.run_id for s in specs], **fields}


def record_submission(
    output: Path,
    grid_name: str,
    array_id: str,
    specs: Sequence[RunSpec],
    job_ids: Sequence[str],
    *,
    intent: str | None = None,
) -> None:
    """Append one array to `<output>/submissions.jsonl` (fsynced: the durable record), then
    write each run's job id into its state.json (in one batch, store.change_states: not fsynced
    one by one)."""
    entry = _entry(grid_name, specs, array=array_id, jobs=list(job_ids))
    if intent is not None:
        entry["intent"] = intent
    _append_entry(output, entry)
    queued = {"state": "pending", "error": None, "failure": None}
    change_states(
        (
            RunDir(spec.run_dir),
            {**queued, "job_id": job_id, **({"label": spec.label} if spec.label else {})},
        )
        for spec, job_id in zip(specs, job_ids, strict=True)
    )


def _ends_with_newline(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
    except OSError:  # empty
        return True


def read_journal(output: Path) -> list[dict[str, Any]]:
    """Every well-formed entry of `<output>/submissions.jsonl` (arrays and intents), oldest
    first; a damaged line is skipped without its neighbours."""
    try:
        raw = (Path(output) / SUBMISSIONS).read_bytes()
    except OSError:
        return []
    entries = []
    for line in raw.splitlines():
        with contextlib.suppress(ValueError):  # UnicodeDecodeError and bad JSON alike
            entry = json.loads(line.decode())
            if isinstance(entry, dict) and isinstance(entry.get("runs"), list):
                entries.append(entry)
    return entries


def read_submissions(output: Path) -> list[dict[str, Any]]:
    """The queued arrays of `<output>/submissions.jsonl`, oldest first (damaged lines skipped)."""
    return [
        entry
        for entry in read_journal(output)
        if "array" in entry
        and isinstance(entry.get("jobs"), list)
        and len(entry["runs"]) == len(entry["jobs"])
    ]


def recover_intents(output: Path) -> int | None:
    """Record the arrays of intents that a stopped submit left unrecorded: each is looked up by
    its SLURM comment among the queued or running jobs of its grid. An intent whose array is not
    there (sbatch never queued it, or it has ended: its runs' own files then say what happened)
    is closed. Returns how many arrays were recovered; None when squeue did not answer (what
    those intents queued is then unknown)."""
    open_intents = _open_intents(read_journal(output))
    if not open_intents:
        return 0
    found: dict[str, str] = {}
    for name in sorted({str(e.get("grid")) for e in open_intents}):
        jobs = scheduler.job_comments(f"samat-{name}")
        if jobs is None:
            return None
        for array, comment in jobs:
            if comment.startswith(INTENT_PREFIX):
                found[comment.removeprefix(INTENT_PREFIX)] = array
    recovered = 0
    for entry in open_intents:
        array = found.get(entry["intent"])
        if array is None:
            close_intent(output, entry["intent"])
            continue
        runs, tasks = entry["runs"], entry.get("tasks") or list(range(len(entry["runs"])))
        by_id = {run_id: Path(output) / "runs" / run_id for run_id in runs}
        specs = [_Recovered(run_id, by_id[run_id]) for run_id in runs]
        # submitit queues a one-task array as a plain job: its id has no index
        job_ids = [array if len(set(tasks)) == 1 else f"{array}_{task}" for task in tasks]
        record_submission(
            output, str(entry.get("grid")), array, specs, job_ids, intent=entry["intent"]
        )
        recovered += 1
    return recovered


def close_intent(output: Path, token: str) -> None:
    """Journal that an intent queued nothing that is still to be found."""
    _append_entry(output, {"time": time.time(), "intent": token, "runs": [], "closed": True})


def _open_intents(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The intents that no recorded array or closing entry settles."""
    settled = {e["intent"] for e in entries if "intent" in e and ("array" in e or e.get("closed"))}
    return [e for e in entries if "intent" in e and "array" not in e and e["intent"] not in settled]


def open_intent_runs(output: Path) -> set[str]:
    """The runs of the open intents."""
    return {run_id for e in _open_intents(read_journal(output)) for run_id in e["runs"]}


@dataclass(frozen=True)
class _Recovered:
    """What record_submission needs of a run that an intent names."""

    run_id: str
    run_dir: Path
    label: str | None = None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def replay_submissions(output: Path, specs: Sequence[RunSpec]) -> int:
    """Put the last recorded job id back into each state.json that has not changed since the
    submission and lacks it (a crash between the journal and the state files); the count."""
    latest: dict[str, tuple[str, float]] = {}
    for entry in read_submissions(output):
        for run_id, job_id in zip(entry["runs"], entry["jobs"], strict=True):
            when = entry.get("time")
            # a damaged time reads as the oldest: it never overrides a newer state.json
            latest[run_id] = (str(job_id), float(when) if _is_number(when) else 0.0)
    replayed = 0
    for spec in specs:
        # a new run of a submit that stopped before recording its job id has no state.json
        if spec.run_id not in latest or not (spec.run_dir / CONFIG).is_file():
            continue
        job_id, when = latest[spec.run_id]
        run = RunDir(spec.run_dir)
        state = run.state()
        if str(state.job_id) != job_id and (state.updated or 0) < when:
            _set_state(run, state="pending", job_id=job_id, error=None, failure=None)
            replayed += 1
    return replayed


@contextlib.contextmanager
def deferred_signals(
    signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
) -> Iterator[None]:
    """Hold these signals for the block (sbatch, then recording its job ids), then deliver
    them: a Ctrl-C then stops the submit with every queued array recorded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        caught.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def _launch(
    grid: GridConfig,
    todo: list[RunSpec],
    kind: str,
    output: Path,
    commands: dict[str, list[str]],
    *,
    console: Console,
) -> int:
    """Run the prepared runs: locally (blocking) or as SLURM arrays (returns once queued)."""
    stops = {s.run_id: container.stop_command(grid.container, s.run_dir) for s in todo}
    tasks = [
        RunTask(spec.run_dir, commands.get(spec.run_id), stops[spec.run_id] or None)
        for spec in todo
    ]
    if kind == "local":
        return _run_local(grid, todo, tasks, output, console)
    try:
        _submit_slurm(grid, todo, tasks, output, console)
    except BaseException:
        # the new runs that no array took: their pending state, not written before (defer)
        pending = {"state": "pending", "error": None, "failure": None}
        change_states(
            (RunDir(spec.run_dir), {**pending, "label": spec.label})
            for spec in todo
            if not (spec.run_dir / STATE).is_file()
        )
        raise
    say(console, f"results: {output / 'runs'} (samat status {output}; samat collect {output})")
    return 0


def evaluate_runs(
    target: Path,
    attacks: list[Any],
    *,
    n_examples: int | None,
    executor: str,
    console: Console,
) -> int:
    """`samat eval`: add attacks to trained runs' evaluation requests and run only those
    evaluations, through the same tasks as submit (local, or one SLURM array with a grid file),
    under the output directory's lock."""
    from samat import attacks as attack_registry
    from samat.config import GridConfig, load_grid

    if target.suffix in (".yaml", ".yml"):
        grid = load_grid(target)
        output = Path(grid.output)
        specs = expand(grid, str(target))
        dirs = [RunDir(spec.run_dir) for spec in specs if spec.run_dir.is_dir()]
    else:
        grid = GridConfig(name="eval")
        dirs = find_runs(target)
        # one run (OUT/runs/<id>) is locked as its output directory is: the same lock covers
        # the same runs whichever way `samat eval` is pointed at them
        single = (target / CONFIG).is_file() and target.parent.name == "runs"
        output = target.parent.parent if single else target
    if not dirs:
        raise ConfigError(f"{target}: no run directories; submit the grid first")
    kind = resolve_executor(executor)
    if kind == "slurm" and target.suffix not in (".yaml", ".yml"):
        raise ConfigError("--executor slurm takes the grid file as TARGET (its slurm section)")
    with output_lock(output, purpose="eval", say=lambda line: say(console, line)):
        changes, untrained = [], 0
        busy = _busy_runs(dirs)
        for run in dirs:
            if run.run_id in busy:
                continue
            if not run.state().trained:
                untrained += 1
                continue
            request = run.eval_request()
            known = {
                attack_registry.label(spec) for spec in attack_registry.resolve(request.attacks)
            }
            added = [
                a
                for a in attacks
                if attack_registry.label(attack_registry.resolve([a])[0]) not in known
            ]
            wanted = request.model_dump(mode="json")
            wanted["attacks"] += [
                a if isinstance(a, str) else a.model_dump(mode="json") for a in added
            ]
            if n_examples is not None:
                wanted["n_examples"] = n_examples
            # validated with the run's training config (an attack must fit the run's task)
            # before any request is written
            checked = validate_run(
                {**run.training_config(), "eval": wanted}, f"{run.path} (samat eval)"
            )
            changes.append((run, checked.eval))
        todo = []
        for run, new in changes:
            run.set_eval_request(new)
            config = run.config()
            if missing_records(run, config) or not run.is_complete():
                run.mark_pending()
                todo.append(RunSpec(run.run_id, config, run.state().label or run.run_id, run.path))
        notes = [f"{untrained} not trained yet: submit the grid first"] if untrained else []
        if busy:
            notes.append(f"{len(busy)} busy in another process or job: see samat status")
        note = f" ({'; '.join(notes)})" if notes else ""
        skipped = len(dirs) - len(todo)
        say(console, f"{plural(len(todo), 'run')} to evaluate, {skipped} skipped{note}")
        if not todo:
            return 0
        commands = container_commands(grid.container, todo, output, grid.slurm)
        container.write_env_file(grid.container, output)
        return _launch(grid, todo, kind, output, commands, console=console)


def _busy_runs(runs: Sequence[RunDir]) -> set[str]:
    """Runs that another live process holds (their claim) or a queued or running job of the
    scheduler owns: `samat eval` leaves them to it."""
    busy = {run.run_id for run in runs if claim.holder(run.path) is not None}
    states = {run.run_id: run.state() for run in runs if run.run_id not in busy}
    ids = [str(s.job_id) for s in states.values() if scheduler.is_slurm_id(str(s.job_id or ""))]
    jobs = scheduler.job_states(ids) if ids else {}
    for run_id, state in states.items():
        job = (jobs or {}).get(str(state.job_id))
        if job is not None and job.active:
            busy.add(run_id)
    return busy


def _executor_line(asked: str, kind: str) -> str:
    if asked != "auto":
        return f"executor: {kind}"
    why = (
        "sbatch on PATH"
        if kind == "slurm"
        else "no sbatch on PATH: runs go here, one per CPU core (or GPU) at a time"
    )
    return f"executor: {kind} ({why})"


def _count_line(actions: dict[str, Action]) -> str:
    """'3 runs to run (1 to train, 2 eval only), 2 skipped (1 done, 1 queued)'."""
    counts = {kind: sum(a.kind == kind for a in actions.values()) for kind in ACTIONS}
    to_run = counts["train"] + counts["eval"]
    split = f" ({counts['train']} to train, {counts['eval']} eval only)" if counts["eval"] else ""
    skipped = {kind: n for kind, n in counts.items() if n and kind not in ("train", "eval")}
    why = ", ".join(f"{n} {kind}" for kind, n in skipped.items())
    if counts["failed"]:
        why += (
            f" by a deterministic cause or {MAX_INFRA_FAILURES} infrastructure failures in a row: "
            "--retry-failed runs them again"
        )
    line = f"{plural(to_run, 'run')} to run{split}, {sum(skipped.values())} skipped"
    return line + (f" ({why})" if why else "")


def check_layout(output: Path) -> None:
    """An output directory of samat 0.1 (run ids that hashed the eval section) is an error."""
    runs = output / "runs"
    if not runs.is_dir():
        return
    with os.scandir(runs) as entries:
        # a run directory, not a hidden temp folder a killed prepare left
        first = next((e for e in entries if e.is_dir() and not e.name.startswith(".")), None)
    if first is not None and (Path(first.path) / CONFIG).is_file():
        RunDir(Path(first.path)).training_config()


def _submit_slurm(
    grid: GridConfig, specs: list[RunSpec], tasks: list[RunTask], output: Path, console: Console
) -> None:
    """Queue the runs as arrays (see plan_chunks), each recorded before the next is submitted.

    A refused first array is a ConfigError; a refused later one, too, naming what was queued
    before it (those runs stay queued and recorded; a later submit queues the rest).
    """
    params, python = executor_settings(grid, output)
    # slurm.runs_per_task: k runs (in grid order) per array task
    k = grid.slurm.runs_per_task
    groups = [specs[i : i + k] for i in range(0, len(specs), k)]
    packed: list[Any] = (
        [PackedTask(tasks[i : i + k]) for i in range(0, len(tasks), k)] if k > 1 else list(tasks)
    )
    chunks = plan_chunks(len(packed), scheduler.max_array_size(), grid.slurm.array_parallelism)
    queued: list[tuple[str, int]] = []
    for number, chunk in enumerate(chunks, start=1):
        chunk_groups = groups[chunk.start : chunk.start + chunk.size]
        chunk_specs = [spec for group in chunk_groups for spec in group]
        chunk_tasks = packed[chunk.start : chunk.start + chunk.size]
        after = queued[chunk.after][0] if chunk.after is not None else None
        private_submitit_folder(output)
        executor = SlurmExecutor(
            folder=submitit_folder(output),
            max_num_timeout=grid.slurm.max_num_timeout,
            python=python,
        )
        tasks_of_runs = [task for task, group in enumerate(chunk_groups) for _ in group]
        # the intent, durable before sbatch: a submit killed (or a journal write that fails)
        # between sbatch and the record leaves it, and the next submit finds the array by it
        token = record_intent(output, grid.name, chunk_specs, tasks_of_runs)
        chunk_params = chunk_parameters(params, chunk, after)
        chunk_params["comment"] = INTENT_PREFIX + token
        executor.update_parameters(**chunk_params)
        with deferred_signals():
            try:
                jobs = executor.submit_array(chunk_tasks)
            except (FailedJobError, FailedSubmissionError, OSError) as error:
                with contextlib.suppress(OSError):
                    close_intent(output, token)  # sbatch refused: nothing was queued
                why = _refusal(error, number, len(chunks), queued, len(specs))
                raise ConfigError(why) from None
            array_id = jobs[0].job_id.split("_")[0]
            # the runs of a packed task share its job id
            job_ids = [
                job.job_id for job, group in zip(jobs, chunk_groups, strict=True) for _ in group
            ]
            try:
                record_submission(output, grid.name, array_id, chunk_specs, job_ids, intent=token)
            except OSError as error:
                raise ConfigError(
                    f"SLURM queued job {array_id} ({plural(len(chunk_specs), 'run')}), but "
                    f"recording it in {output} failed ({error.strerror or error}); free the "
                    "disk, then submit again: it finds the job by its recorded intent and "
                    "queues nothing twice"
                ) from None
        make_private(jobs)
        queued.append((array_id, len(chunk_specs)))
        shape = (
            f"array 0-{len(jobs) - 1}, at most {chunk.throttle} at a time"
            if len(jobs) > 1
            else "one task"
        )
        if k > 1:
            shape += f", {plural(k, 'run')} per task"
        wait_for = f", after job {after} has ended" if after is not None else ""
        say(console, f"submitted SLURM job {array_id} ({shape}{wait_for})")


def _refusal(
    error: Exception, number: int, total: int, queued: list[tuple[str, int]], runs: int
) -> str:
    reason = next((ln for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    reason = reason.strip()
    if not queued:
        return f"sbatch refused the job: {reason}; check the grid's slurm section"
    done = ", ".join(f"job {array} ({plural(count, 'run')})" for array, count in queued)
    left = runs - sum(count for _, count in queued)
    return (
        f"sbatch refused array {number} of {total}: {reason}; queued before it: {done}; "
        f"the other {plural(left, 'run')} are not queued: fix the cause, then submit the grid "
        "again (it skips the queued runs)"
    )


def _run_local(
    grid: GridConfig, specs: list[RunSpec], tasks: list[RunTask], output: Path, console: Console
) -> int:
    private = private_submitit_folder(output)
    executor = LocalExecutor(
        folder=submitit_folder(output), max_num_timeout=grid.slurm.max_num_timeout
    )
    executor.update_parameters(
        timeout_min=grid.slurm.timeout_min,
        signal_delay_s=grid.slurm.signal_delay_s,
        **_local_gpus(grid.slurm.gpus_per_node),
    )
    parallel, threads = local_slots(len(specs))
    # the tasks inherit this process's environment: small CPU runs go fastest one thread each
    os.environ.setdefault("SAMAT_NUM_THREADS", str(threads))
    pending = list(zip(specs, tasks, strict=True))
    running: list[tuple[RunSpec, Any]] = []
    failed = finished = 0
    # the runs stop, progress stored, if this process dies: submitit's controllers outlive it
    with hold_session(private):
        try:
            while pending or running:
                while pending and len(running) < parallel:
                    spec, task = pending.pop(0)
                    job = executor.submit(task)
                    make_private([job])
                    running.append((spec, job))
                time.sleep(0.5)
                for spec, job in [entry for entry in running if entry[1].done()]:
                    running.remove((spec, job))
                    finished += 1
                    run = RunDir(spec.run_dir)
                    failed += not run.is_complete()
                    say(console, f"[{finished}/{len(specs)}] {result_line(run, spec.label)}")
        except KeyboardInterrupt:
            for _, job in running:
                job.cancel()
            raise
    say(console, f"{len(specs) - failed} of {plural(len(specs), 'run')} done; results in {output}")
    return 1 if failed else 0


def local_slots(runs: int) -> tuple[int, int]:
    """(runs at a time, threads per run) for local runs: one per GPU, else one per CPU core."""
    import torch

    if torch.cuda.is_available():
        return 1, 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parallel = max(1, min(runs, cores or 1))
    return parallel, max(1, (cores or 1) // parallel)


def _local_gpus(wanted: int) -> dict[str, Any]:
    """GPU parameters for LocalExecutor that keep a CUDA_VISIBLE_DEVICES the user has set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return {"gpus_per_node": wanted}
    ids = [int(part) for part in visible.split(",") if part.strip().isdigit()]
    return {"gpus_per_node": min(wanted, len(ids)), "visible_gpus": ids}


def _print_dry_run(
    grid: GridConfig,
    specs: list[RunSpec],
    actions: dict[str, Action],
    kind: str,
    output: Path,
    commands: dict[str, list[str]],
    console: Console,
) -> None:
    todo = [spec for spec in specs if actions[spec.run_id].runs]
    if kind == "slurm" and todo:
        params, python = executor_settings(grid, output)
        k = grid.slurm.runs_per_task
        tasks = -(-len(todo) // k)
        chunks = plan_chunks(tasks, scheduler.max_array_size(), grid.slurm.array_parallelism)
        for number, chunk in enumerate(chunks, start=1):
            runs = (
                plural(chunk.size, "run")
                if k == 1
                else (f"{plural(chunk.size, 'task')} of up to {plural(k, 'run')}")
            )
            after = "" if chunk.after is None else f", after array {chunk.after + 1} has ended"
            say(console, f"# sbatch script {number} of {len(chunks)} ({runs}{after}):")
            # the real dependency names the earlier array's job id, known once it is queued
            placeholder = None if chunk.after is None else f"<job id of array {chunk.after + 1}>"
            script = sbatch_script(
                chunk_parameters(params, chunk, placeholder),
                submitit_folder(output),
                chunk.size,
                python,
            )
            say(console, script)
    if todo and todo[0].run_id in commands:
        say(
            console,
            f"each task runs its run in the container, e.g. {shlex.join(commands[todo[0].run_id])}",
        )
    table = Table(title=f"{plural(len(specs), 'run')} -> {output / 'runs'}")
    for column in ("run id", "label", "seed", "action"):
        table.add_column(column)
    for spec in specs:
        table.add_row(
            spec.run_id,
            Text(spec.label),
            str(spec.config.seed),
            Text(actions[spec.run_id].describe()),
        )
    console.print(table)
    say(console, f"dry run ({kind}): {_count_line(actions)}; nothing submitted")
