"""`samat cancel`: scancel a grid's SLURM jobs and mark its runs cancelled; a later submit resumes
them (select_runs treats a cancelled run like a pending one), from their checkpoints.

The jobs are the arrays recorded in `<output>/submissions.jsonl` and in the runs' state.json,
plus orphans: arrays queued under the job name `samat-<grid name>` from this output directory's
submitit folder whose ids were never recorded (a submit killed between sbatch and recording).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from samat.config import ConfigError, load_grid
from samat.grid import expand
from samat.launch import scheduler
from samat.launch.lock import output_lock
from samat.launch.status import plural, say
from samat.launch.submit import read_submissions, submitit_folder
from samat.store import CONFIG, RunDir, find_runs

# run states in which a run may still be queued or running
OPEN_STATES = ("pending", "running")


def cancel_runs(target: Path, *, run_ids: Sequence[str] = (), console: Console) -> int:
    """Cancel a grid's queued and running tasks (TARGET: its output directory or grid file), or
    only those of `run_ids`; the exit code. A scancel that fails marks nothing cancelled."""
    grid_name = None
    if target.suffix in (".yaml", ".yml"):
        grid = load_grid(target)
        output, grid_name = Path(grid.output), grid.name
        runs = [
            RunDir(s.run_dir) for s in expand(grid, str(target)) if (s.run_dir / CONFIG).is_file()
        ]
    else:
        output, runs = target, find_runs(target)
    if not runs:
        raise ConfigError(f"{target}: no run directories here; check the path or submit the grid")
    if run_ids:
        by_id = {run.run_id: run for run in runs}
        missing = [run_id for run_id in run_ids if run_id not in by_id]
        if missing:
            raise ConfigError(
                f"no run {missing[0]!r} in {output}; samat status {output} lists them"
            )
        runs = [by_id[run_id] for run_id in dict.fromkeys(run_ids)]
    with output_lock(output, purpose="cancel", say=lambda line: say(console, line)):
        states = {run.run_id: run.state() for run in runs}
        open_runs = [
            run for run in runs if states[run.run_id].state in OPEN_STATES and not run.is_complete()
        ]
        tasks = {
            str(states[run.run_id].job_id)
            for run in open_runs
            if scheduler.is_slurm_id(str(states[run.run_id].job_id or ""))
        }
        orphans: set[str] = set()
        if run_ids:
            candidates = tasks
        else:
            entries = [
                e for e in read_submissions(output) if grid_name is None or e["grid"] == grid_name
            ]
            candidates = {scheduler.array_id(t) for t in tasks} | {str(e["array"]) for e in entries}
            names = {grid_name} if grid_name else {str(e["grid"]) for e in entries}
            orphans = _orphans(output, names) - candidates
        jobs = scheduler.job_states(candidates) if candidates else {}
        if jobs is not None:  # only what is still queued or running
            live = {scheduler.array_id(j) for j, info in jobs.items() if info.active} | {
                j for j, info in jobs.items() if info.active
            }
            candidates = {c for c in candidates if c in live}
        targets = sorted(candidates | orphans)
        problem = scheduler.scancel(targets)
        if problem is not None:
            raise ConfigError(f"scancel failed: {problem}; no run was marked cancelled")
        for run in open_runs:
            run.mark_cancelled()
    if not open_runs and not targets:
        say(console, "nothing to cancel: no run is queued or running")
        return 0
    jobs_line = f" (scancel {' '.join(targets)})" if targets else ""
    orphan_line = (
        f"; {plural(len(orphans), 'unrecorded array')} of the grid cancelled too: "
        + " ".join(sorted(orphans))
        if orphans
        else ""
    )
    say(
        console,
        f"cancelled {plural(len(open_runs), 'run')}{jobs_line}{orphan_line}; "
        "samat submit resumes them",
    )
    return 0


def _orphans(output: Path, names: set[str]) -> set[str]:
    """Arrays named samat-<name> that this output directory's submitit folder queued."""
    folder = str(submitit_folder(output).parent) + "/"
    found: set[str] = set()
    for name in names:
        for job_id, command in scheduler.jobs_named(f"samat-{name}") or []:
            if command.startswith(folder):
                found.add(scheduler.array_id(job_id))
    return found
