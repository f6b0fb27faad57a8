"""Per-run state: run directories joined with the scheduler's view, without blocking calls."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from samat.config import ConfigError
from samat.launch.scheduler import JobInfo, is_slurm_id, job_states
from samat.store import LOG, RunDir, find_runs

# Seconds between two looks at the scheduler while following an array.
FOLLOW_INTERVAL_S = 3.0
STATE_STYLES = {
    "done": "green",
    "running": "cyan",
    "queued": "blue",
    "failed": "red",
    "interrupted": "yellow",
    "cancelled": "magenta",
    "pending": "dim",
}
# The fields of `samat status --json`, one object per run.
JSON_FIELDS = ("run_id", "label", "seed", "state", "attempts", "requeues", "job_id", "note")


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    label: str
    seed: str
    state: str
    attempts: int
    requeues: int
    job_id: str
    elapsed: str
    note: str
    # nothing more will happen to it without a new submission
    ended: bool


def combined_state(
    run: RunDir, state: dict[str, Any], jobs: dict[str, JobInfo] | None
) -> tuple[str, str]:
    """(state, note) of a run from its directory and what the scheduler knows (None: no answer).

    The scheduler wins while a task is queued or running (a forced re-run of a finished run is
    running, not done); after that the run directory decides.
    """
    job_id = str(state.get("job_id") or "")
    job = (jobs or {}).get(job_id)
    if job is not None and job.active:
        running = job.state in ("RUNNING", "COMPLETING")
        note = "" if job.state in ("RUNNING", "PENDING") else job.state
        return ("running" if running else "queued"), note
    if run.is_complete():
        return "done", ""
    if state["state"] == "cancelled":
        return "cancelled", "samat cancel; submit again to resume"
    if state["state"] == "failed":
        return "failed", state.get("error") or ""
    if job is not None and job.state != "COMPLETED":
        return "failed", f"job {job.state}, no result"
    base = job_id.split("_")[0]
    if (
        jobs is not None
        and is_slurm_id(job_id)
        and not any(known.split("_")[0] == base for known in jobs)
    ):
        # the scheduler has no such job (any more) and the run has no result: killed or lost
        return "interrupted", "no live job; submit again to resume"
    if state["state"] == "done" or job is not None:
        return "pending", "result missing; submit again"
    return state["state"], ""


def run_statuses(runs: list[RunDir]) -> list[RunStatus]:
    """One RunStatus per run directory, asking the scheduler once for all of them."""
    states = [run.state() for run in runs]
    jobs = job_states(str(s["job_id"]) for s in states if s.get("job_id"))
    rows = []
    for run, state in zip(runs, states, strict=True):
        name, note = combined_state(run, state, jobs)
        job = (jobs or {}).get(str(state.get("job_id")))
        rows.append(
            RunStatus(
                run_id=run.run_id,
                label=state.get("label") or "-",
                seed=_seed(run),
                state=name,
                attempts=int(state.get("attempts") or 0),
                requeues=int(state.get("requeues") or 0),
                job_id=str(state.get("job_id") or "-"),
                elapsed=job.elapsed if job and job.elapsed else _result_elapsed(run),
                note=note,
                # without the scheduler's answer only the run directory can say a run is over
                ended=name not in ("queued", "running")
                and (jobs is not None or name in ("done", "failed")),
            )
        )
    return rows


def _seed(run: RunDir) -> str:
    try:
        return str(run.config().seed)
    except ConfigError:  # a damaged config.yaml must not stop the table
        return "-"


def _result_elapsed(run: RunDir) -> str:
    result = run.result()
    if result is None:
        return "-"
    return _clock(result.get("train_seconds", 0) + result.get("eval_seconds", 0))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:{secs:02d}"


def status_table(rows: list[RunStatus], title: str) -> Table:
    table = Table(title=title)
    for column in ("run id", "label", "seed", "state", "attempts", "requeues", "job id", "elapsed"):
        numeric = column in ("seed", "attempts", "requeues")
        table.add_column(
            column,
            justify="right" if numeric else "left",
            no_wrap=column in ("run id", "job id", "elapsed"),
        )
    notes = any(row.note for row in rows)
    if notes:
        table.add_column("note", overflow="fold")
    for row in rows:
        cells = [
            row.run_id,
            Text(row.label),
            row.seed,
            Text(row.state, STATE_STYLES[row.state]),
            str(row.attempts),
            str(row.requeues),
            row.job_id,
            row.elapsed,
        ]
        table.add_row(*cells, *([Text(row.note)] if notes else []))
    return table


def summary(rows: list[RunStatus]) -> str:
    """'6 runs: 4 done, 1 running, 1 failed'."""
    counts = {state: sum(row.state == state for row in rows) for state in STATE_STYLES}
    parts = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    return f"{plural(len(rows), 'run')}: {parts}"


def say(console: Console, text: str) -> None:
    """Print a line as it is: no markup, no colouring, no wrapping inside paths."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def show_status(
    path: Path,
    *,
    console: Console,
    as_json: bool = False,
    states: Sequence[str] = (),
    runs: Sequence[RunDir] | None = None,
) -> int:
    """Print the status of an output directory's runs (or of `runs`): a table and a summary
    line, or with as_json one JSON object per run (JSON_FIELDS), in a list. `states` keeps only
    runs in those states. The exit code: 1 when any of the runs failed, else 0."""
    runs = find_runs(path) if runs is None else list(runs)
    if not runs:
        raise ConfigError(f"{path}: no run directories here; check the path or submit the grid")
    unknown = sorted(set(states) - set(STATE_STYLES))
    if unknown:
        raise ConfigError(f"unknown state {unknown[0]!r}; choose from {', '.join(STATE_STYLES)}")
    every = run_statuses(runs)
    rows = [row for row in every if not states or row.state in states]
    if as_json:
        console.out(json.dumps([status_json(row) for row in rows], indent=2), highlight=False)
    else:
        console.print(status_table(rows, f"{path}"))
        say(console, summary(rows))
    return 1 if any(row.state == "failed" for row in every) else 0


def status_json(row: RunStatus) -> dict[str, Any]:
    """One run for `samat status --json`: seed a number, job_id null when there is none."""
    data = {name: getattr(row, name) for name in JSON_FIELDS}
    data["seed"] = int(row.seed) if row.seed.lstrip("-").isdigit() else None
    data["job_id"] = None if row.job_id == "-" else row.job_id
    return data


def show_logs(run_dir: Path, *, console: Console) -> int:
    """`samat logs RUN`: the run's log, then where the scheduler's stdout/stderr of its job are
    (submitit's folder `<output>/submitit/<job_id>/`); the exit code."""
    from submitit.core.utils import JobPaths

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory; give one such as results/<grid>/runs/<run id> "
            "(samat status lists them)"
        )
    run = RunDir(run_dir)
    log = run.file(LOG)
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = None
    if text is None:
        say(console, f"# {log}: no log yet (the run has not started)")
    else:
        say(console, f"# {log}")
        console.out(text.rstrip("\n"), highlight=False)
    state = run.state()
    if state.error:
        say(console, f"# error: {state.error}")
    job_id = str(state.job_id or "")
    if not job_id:
        say(console, "# no scheduler job recorded for this run (not submitted, or run locally)")
        return 0
    output = run_dir.absolute().parent.parent
    paths = JobPaths(output / "submitit" / "%j", job_id=job_id, task_id=0)
    for name, path in (("stdout", paths.stdout), ("stderr", paths.stderr)):
        where = path if path.exists() else f"{path} (not there yet)"
        say(console, f"# job {job_id} {name}: {where}")
    return 0


def follow(runs: list[RunDir], *, console: Console, interval: float = FOLLOW_INTERVAL_S) -> int:
    """Refresh a live status table until every run has ended; 0 when all are done, else 1."""
    rows = run_statuses(runs)
    title = "following (Ctrl-C stops following, not the runs)"
    # a terminal watches the table change; a log file gets the final table once
    terminal = console.is_terminal
    with Live(
        status_table(rows, title), console=console, auto_refresh=False, transient=not terminal
    ) as live:
        while not all(row.ended for row in rows):
            time.sleep(interval)
            rows = run_statuses(runs)
            live.update(status_table(rows, title), refresh=True)
    if not terminal:
        console.print(status_table(rows, title))
    say(console, summary(rows))
    return 0 if all(row.state == "done" for row in rows) else 1


def result_line(run: RunDir, label: str) -> str:
    """One line for a finished run: its accuracies, or why it failed and where its log is."""
    result = run.result()
    if result is None:
        error = run.state().get("error") or "no result"
        return f"failed {run.run_id} {label}: {error} (log: {run.file(LOG)})"
    robust = "".join(f", {name} {value:.1%}" for name, value in result["robust"].items())
    return f"done {run.run_id} {label}: natural {result['natural']:.1%}{robust}"
