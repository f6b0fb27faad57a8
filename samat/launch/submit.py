"""Submit a grid: validate first, skip finished or queued runs, then a SLURM array or local runs."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table
from rich.text import Text
from submitit import LocalExecutor, SlurmExecutor
from submitit.core.utils import FailedJobError
from submitit.slurm.slurm import _convert_mem, _make_sbatch_string

from samat import container
from samat.config import ConfigError, ContainerConfig, GridConfig, SlurmConfig
from samat.grid import RunSpec, expand
from samat.launch import scheduler
from samat.launch.status import follow, plural, result_line, say
from samat.launch.task import RunTask
from samat.store import RunDir, prepare

T = TypeVar("T")
ACTIONS = ("submit", "done", "queued", "running")


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


def submitit_folder(output: Path) -> Path:
    """Where submitit keeps its pickles and each job's stdout/stderr (one folder per job)."""
    return Path(output).expanduser().absolute() / "submitit" / "%j"


def executor_settings(grid: GridConfig, output: Path) -> tuple[dict[str, Any], str]:
    """SlurmExecutor parameters and python for a grid; pyxis starts submitit in the image."""
    params = slurm_parameters(grid.slurm, grid.name)
    if grid.container.runtime != "pyxis":
        return params, shlex.quote(sys.executable)
    params["srun_args"] = container.srun_args(grid.container, workdirs=[output.absolute()])
    setup = [*container.env_exports(grid.container), *grid.slurm.setup]
    if setup:
        params["setup"] = setup
    return params, container.IMAGE_PYTHON


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
    cfg: ContainerConfig, specs: list[RunSpec], output: Path
) -> dict[str, list[str]]:
    """Each run's container argv, by run id."""
    # with pyxis, srun starts submitit's whole process in the image: the run executes in it
    if cfg.runtime in ("none", "pyxis"):
        return {}
    return {
        spec.run_id: container.task_command(cfg, spec.run_dir, output_root=output) for spec in specs
    }


def select_runs(specs: list[RunSpec], *, force: bool = False) -> dict[str, str]:
    """What to do with each run (by run id): submit it, or skip it as done / queued / running."""
    runs = {spec.run_id: RunDir(spec.run_dir) for spec in specs}
    states = {run_id: run.state() for run_id, run in runs.items()}
    jobs = scheduler.job_states(str(s["job_id"]) for s in states.values() if s["job_id"]) or {}
    actions = {}
    for spec in specs:
        job = jobs.get(str(states[spec.run_id]["job_id"]))
        if job is not None and job.active:
            actions[spec.run_id] = "running" if job.state == "RUNNING" else "queued"
        elif not force and runs[spec.run_id].is_complete():
            actions[spec.run_id] = "done"
        else:
            actions[spec.run_id] = "submit"
    return actions


def submit_grid(
    grid: GridConfig,
    *,
    executor: str = "auto",
    dry_run: bool = False,
    force: bool = False,
    wait: bool = False,
    console: Console,
) -> int:
    """Validate, then submit a grid's unfinished runs; the exit code for the CLI.

    SLURM: one submitit array per MaxArraySize runs; returns once queued (or, with wait, when all
    tasks have ended). Local: the runs one after another, blocking, one line per finished run.
    """
    specs = expand(grid)
    output = Path(grid.output or Path("results") / grid.name)
    kind = resolve_executor(executor, dry_run=dry_run)
    check_output_dir(output, create=not dry_run)
    if kind == "slurm":
        check_partition(grid.slurm.partition)
    elif grid.container.runtime == "pyxis":
        raise ConfigError(
            "container.runtime 'pyxis' runs through SLURM's srun; use --executor "
            "slurm on the cluster, or runtime apptainer or docker for local runs"
        )
    for warning in container.validate(grid.container):
        say(console, f"warning: {warning}")
    commands = container_commands(grid.container, specs, output)
    actions = select_runs(specs, force=force)
    todo = [spec for spec in specs if actions[spec.run_id] == "submit"]
    say(console, _executor_line(executor, kind))
    if dry_run:
        _print_dry_run(grid, specs, actions, kind, output, commands, console)
        return 0
    if not todo:
        say(console, f"nothing to submit: {_count_line(actions)}; results in {output}")
        live = [RunDir(s.run_dir) for s in specs if actions[s.run_id] in ("queued", "running")]
        return follow(live, console=console) if wait and live else 0
    for spec in specs:
        run = prepare(spec)
        if actions[spec.run_id] == "submit":
            run.update_state(state="pending", error=None)
    stops = {s.run_id: container.stop_command(grid.container, s.run_dir) for s in todo}
    tasks = [
        RunTask(spec.run_dir, commands.get(spec.run_id), stops[spec.run_id] or None)
        for spec in todo
    ]
    if kind == "local":
        say(console, _count_line(actions))
        return _run_local(grid, todo, tasks, output, console)
    _submit_slurm(grid, todo, tasks, output, console)
    say(console, _count_line(actions))
    say(console, f"results: {output / 'runs'} (samat status {output}; samat collect {output})")
    if not wait:
        return 0
    return follow([RunDir(spec.run_dir) for spec in todo], console=console)


def _executor_line(asked: str, kind: str) -> str:
    if asked != "auto":
        return f"executor: {kind}"
    why = (
        "sbatch on PATH"
        if kind == "slurm"
        else "no sbatch on PATH: runs go here, one per CPU core (or GPU) at a time"
    )
    return f"executor: {kind} ({why})"


def _count_line(actions: dict[str, str]) -> str:
    """'3 runs to run, 2 skipped (1 done, 1 queued)'."""
    counts = {action: sum(a == action for a in actions.values()) for action in ACTIONS}
    skipped = len(actions) - counts["submit"]
    why = ", ".join(f"{n} {action}" for action, n in counts.items() if n and action != "submit")
    return f"{plural(counts['submit'], 'run')} to run, {skipped} skipped" + (
        f" ({why})" if why else ""
    )


def _submit_slurm(
    grid: GridConfig, specs: list[RunSpec], tasks: list[RunTask], output: Path, console: Console
) -> None:
    params, python = executor_settings(grid, output)
    executor = SlurmExecutor(
        folder=submitit_folder(output), max_num_timeout=grid.slurm.max_num_timeout, python=python
    )
    executor.update_parameters(**params)
    size = scheduler.max_array_size()
    for chunk_specs, chunk_tasks in zip(
        array_chunks(specs, size), array_chunks(tasks, size), strict=True
    ):
        try:
            jobs = executor.submit_array(chunk_tasks)
        except FailedJobError as error:
            reason = next((ln for ln in str(error).splitlines() if ln.strip()), "no message")
            raise ConfigError(
                f"sbatch refused the job: {reason.strip()}; check the grid's slurm section"
            ) from None
        for spec, job in zip(chunk_specs, jobs, strict=True):
            RunDir(spec.run_dir).update_state(job_id=job.job_id)
        array_id = jobs[0].job_id.split("_")[0]
        shape = (
            f"array 0-{len(jobs) - 1}, at most {grid.slurm.array_parallelism} at a time"
            if len(jobs) > 1
            else "one task"
        )
        say(console, f"submitted SLURM job {array_id} ({shape})")


def _run_local(
    grid: GridConfig, specs: list[RunSpec], tasks: list[RunTask], output: Path, console: Console
) -> int:
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
    try:
        while pending or running:
            while pending and len(running) < parallel:
                spec, task = pending.pop(0)
                running.append((spec, executor.submit(task)))
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
    actions: dict[str, str],
    kind: str,
    output: Path,
    commands: dict[str, list[str]],
    console: Console,
) -> None:
    todo = [spec for spec in specs if actions[spec.run_id] == "submit"]
    if kind == "slurm":
        params, python = executor_settings(grid, output)
        chunks = array_chunks(todo, scheduler.max_array_size()) if todo else []
        for number, chunk in enumerate(chunks, start=1):
            runs = plural(len(chunk), "run")
            say(console, f"# sbatch script {number} of {len(chunks)} ({runs}):")
            say(console, sbatch_script(params, submitit_folder(output), len(chunk), python))
    if todo and todo[0].run_id in commands:
        say(
            console,
            f"each task runs its run in the container, e.g. {shlex.join(commands[todo[0].run_id])}",
        )
    table = Table(title=f"{plural(len(specs), 'run')} -> {output / 'runs'}")
    for column in ("run id", "label", "seed", "action"):
        table.add_column(column)
    for spec in specs:
        table.add_row(spec.run_id, Text(spec.label), str(spec.config.seed), actions[spec.run_id])
    console.print(table)
    say(console, f"dry run ({kind}): {_count_line(actions)}; nothing submitted")
