"""Per-run state: run directories joined with the scheduler's view, without blocking calls."""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.padding import Padding
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from samat.errors import ConfigError
from samat.launch.scheduler import JobInfo, is_slurm_id, job_states
from samat.store import LOG, RunDir, RunReader, RunView, find_runs

# Seconds before the first look at the scheduler while following an array (`submit --wait`);
# each later wait is twice the one before, up to FOLLOW_MAX_INTERVAL_S: a long array has sacct
# and squeue asked (and its run directories read) once a minute, not every few seconds.
FOLLOW_INTERVAL_S = 3.0
FOLLOW_MAX_INTERVAL_S = 60.0
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
    run: RunDir,
    state: Any,
    jobs: dict[str, JobInfo] | None,
    complete: bool | None = None,
) -> tuple[str, str]:
    """(state, note) of a run from its directory and what the scheduler knows (None: no answer).
    `state`: its RunState; `complete`: run.is_complete() where the caller has read it already.

    The scheduler wins while a task is queued or running (a forced re-run of a finished run is
    running, not done); after that the run directory decides.
    """
    job_id = str(state.get("job_id") or "")
    job = (jobs or {}).get(job_id)
    if job is not None and job.active:
        running = job.state in ("RUNNING", "COMPLETING")
        note = "" if job.state in ("RUNNING", "PENDING") else job.state
        return ("running" if running else "queued"), note
    if run.is_complete() if complete is None else complete:
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
    """One RunStatus per run directory, asking the scheduler once for all of them. Each run's
    files are read once (samat.store.RunReader: shared config parts parsed once)."""
    reader = RunReader()
    views = reader.read_all(runs)
    jobs = job_states(str(v.state.job_id) for v in views if v.state.job_id)
    rows = []
    for view in views:
        run, state = view.run, view.state
        name, note = combined_state(run, state, jobs, view.is_complete())
        job = (jobs or {}).get(str(state.get("job_id")))
        rows.append(
            RunStatus(
                run_id=run.run_id,
                label=state.get("label") or "-",
                seed=_seed(reader, view),
                state=name,
                attempts=int(state.get("attempts") or 0),
                requeues=int(state.get("requeues") or 0),
                job_id=str(state.get("job_id") or "-"),
                elapsed=job.elapsed if job and job.elapsed else _result_elapsed(view.result),
                note=note,
                # without the scheduler's answer only the run directory can say a run is over
                ended=name not in ("queued", "running")
                and (jobs is not None or name in ("done", "failed")),
            )
        )
    return rows


# config.yaml as samat writes it ends with the seed (samat.store.training_yaml)
_SEED_LINE = re.compile(rb"\nseed: (-?\d+)\n\Z")


def _seed(reader: RunReader, view: RunView) -> str:
    found = _SEED_LINE.search(view.config_text or b"")
    if found:  # no YAML parsing, no validation (pydantic is not even imported)
        return found.group(1).decode()
    try:
        return str(reader.shared_config(view)[1])
    except ConfigError:  # a damaged config.yaml must not stop the table
        return "-"


def _result_elapsed(result: dict[str, Any] | None) -> str:
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


class PlainTable:
    """A rich Table that prints exactly as rich prints it, in a small part of the time where the
    output is plain text (a pipe, a file, a log: no colours, nothing recorded).

    rich lays out and renders every cell of every row (about 1 ms a row): 10,000 runs took 15 s.
    Here rich still decides the column widths, from the few cells that bound each column's
    measure, and renders the title, the header and whatever is not plain one-line ASCII (each
    distinct cell once); the other cells are padded as rich pads them. Anything this does not
    cover (colours, styles per row, sections, other paddings) goes to rich unchanged.
    """

    def __init__(self, table: Table) -> None:
        self.table = table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = plain_table_lines(self.table, console, options) if _plain(console) else None
        if lines is None:
            yield self.table
            return
        newline = Segment.line()
        for line in lines:
            yield Segment(line)
            yield newline


# A cell rich prints as it is: printable ASCII, no leading or trailing space, no markup ([) or
# emoji code (:) where it is a str (rich reads those in str cells, not in Text).
_SIMPLE = re.compile(r"[!-~](?:[ -~]*[!-~])?")


def _plain(console: Console) -> bool:
    return (
        console.color_system is None
        and not console.record
        and not console.legacy_windows
        and not console.is_jupyter
    )


def _simple_text(cell: Any) -> str | None:
    """The text of a cell that prints as it is, or None."""
    if isinstance(cell, str):
        text = cell
        if "[" in text or ":" in text:
            return None
    elif type(cell) is Text:
        if cell.justify or cell.overflow or cell.no_wrap is not None or cell.end != "\n":
            return None
        text = cell.plain
    else:
        return None
    return text if _SIMPLE.fullmatch(text) else None


def _cell_key(cell: Any) -> Hashable:
    """A key equal for cells that print the same (TypeError when there is none)."""
    if isinstance(cell, str):
        return ("str", cell)
    if type(cell) is not Text:
        raise TypeError(type(cell).__name__)
    key = (cell.plain, str(cell.style), tuple(cell.spans), cell.justify, cell.overflow)
    key += (cell.no_wrap, cell.end, cell.tab_size)
    hash(key)
    return key


def _bounding_cells(cells: Iterable[Any], texts: Iterable[str | None]) -> list[Any]:
    """The cells whose measures bound the column's: the longest word and the longest line of
    the plain ones (`texts`: _simple_text of each), and one of each other kind of cell."""
    longest_word: tuple[int, Any] = (-1, None)
    longest_line: tuple[int, Any] = (-1, None)
    others: dict[Hashable, Any] = {}
    for cell, text in zip(cells, texts, strict=True):
        if text is None:
            others.setdefault(_cell_key(cell), cell)
            continue
        word = max(map(len, text.split())) if " " in text else len(text)
        if word > longest_word[0]:
            longest_word = (word, cell)
        if len(text) > longest_line[0]:
            longest_line = (len(text), cell)
    bounds = [cell for size, cell in (longest_word, longest_line) if size >= 0]
    return bounds + list(others.values())


def plain_table_lines(table: Table, console: Console, options: ConsoleOptions) -> list[str] | None:
    """The lines rich prints for `table` without colours, or None for a table this does not
    cover (then rich prints it)."""
    t = table
    if (
        not t.columns
        or t.box is None
        or not t.show_header
        or t.show_footer
        or not t.show_edge
        or t.show_lines
        or t.leading
        or t.row_styles
        or t.caption
        or t.expand
        or t.width is not None
        or t.min_width is not None
        or tuple(t.padding) != (0, 1, 0, 1)
        or not t.pad_edge
        or t.collapse_padding
        or any(row.style or row.end_section for row in t.rows)
        or any(column.vertical != "top" for column in t.columns)
    ):
        return None
    texts = [[_simple_text(cell) for cell in column._cells] for column in t.columns]
    try:
        bounds = [
            _bounding_cells(column._cells, plain)
            for column, plain in zip(t.columns, texts, strict=True)
        ]
    except TypeError:  # a cell that is neither str nor Text
        return None
    # rich measures the columns of this table of a few rows as those of the whole table
    proxy = copy.copy(t)
    proxy.columns = [copy.copy(column) for column in t.columns]
    for column, cells in zip(proxy.columns, bounds, strict=True):
        column._cells = cells
    extra = t._extra_width
    room = options.update_width(options.max_width - extra)
    widths = proxy._calculate_column_widths(console, room)
    # the title, the top edge and the header: rich renders them, columns fixed at those widths
    head = copy.copy(t)
    head.rows = []
    head.columns = [copy.copy(column) for column in t.columns]
    for column, width in zip(head.columns, widths, strict=True):
        column._cells = []
        column.width = width - 2
    if head._calculate_column_widths(console, room) != widths or min(widths) < 3:
        return None
    top = "".join(segment.text for segment in console.render(head, options)).split("\n")
    # ends with the bottom edge and the empty string after the last newline
    top, bottom = top[:-2], top[-2]
    box = t.box.substitute(options, safe=t.safe_box if t.safe_box is not None else console.safe_box)
    table_options = options.update(width=sum(widths) + extra, highlight=t.highlight, height=None)
    rendered: dict[tuple[int, Hashable], list[str]] = {}

    def cell_lines(index: int, cell: Any) -> list[str]:
        """The lines of one cell, padding included, as rich renders it (once per distinct cell)."""
        key = (index, _cell_key(cell))
        lines = rendered.get(key)
        if lines is None:
            column = t.columns[index]
            cell_options = table_options.update(
                width=widths[index],
                justify=column.justify,
                no_wrap=column.no_wrap,
                overflow=column.overflow,
                height=None,
                highlight=column.highlight,
            )
            lines = rendered[key] = [
                "".join(segment.text for segment in line)
                for line in console.render_lines(Padding(cell, (0, 1, 0, 1)), cell_options)
            ]
        return lines

    fast = [
        (width - 2, column.justify) if column.justify in ("left", "right") else None
        for column, width in zip(t.columns, widths, strict=True)
    ]
    body = []
    # as rich: as many rows as the shortest column has cells
    rows = list(zip(*(column._cells for column in t.columns)))  # noqa: B905
    plain_rows = zip(*texts)  # noqa: B905
    count = len(rows)
    for number, (cells, plain) in enumerate(zip(rows, plain_rows), start=1):  # noqa: B905
        left, divider, right = (
            (box.foot_left, box.foot_vertical, box.foot_right)
            if number == count
            else (box.mid_left, box.mid_vertical, box.mid_right)
        )
        columns = []
        for index, (cell, text, room) in enumerate(zip(cells, plain, fast)):  # noqa: B905
            if text is not None and room is not None and len(text) <= room[0]:
                padded = text.ljust(room[0]) if room[1] == "left" else text.rjust(room[0])
                columns.append([f" {padded} "])
            else:
                columns.append(cell_lines(index, cell))
        height = max(len(lines) for lines in columns)
        for line in range(height):
            parts = [
                lines[line] if line < len(lines) else " " * width
                for lines, width in zip(columns, widths, strict=True)
            ]
            body.append(left + divider.join(parts) + right)
    return [*top, *body, bottom]


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
        console.print(PlainTable(status_table(rows, f"{path}")))
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


def follow(
    runs: list[RunDir],
    *,
    console: Console,
    interval: float = FOLLOW_INTERVAL_S,
    max_interval: float = FOLLOW_MAX_INTERVAL_S,
) -> int:
    """Refresh a live status table until every run has ended; 0 when all are done, else 1. The
    scheduler is asked after `interval` seconds, then after twice as long each time, up to
    `max_interval` (said on the first line)."""
    say(
        console,
        f"following {plural(len(runs), 'run')}: the scheduler is asked after {interval:g} s, "
        f"then at doubling intervals, at most every {max_interval:g} s",
    )
    rows = run_statuses(runs)
    title = "following (Ctrl-C stops following, not the runs)"
    # a terminal watches the table change; a log file gets the final table once
    terminal = console.is_terminal
    with Live(
        status_table(rows, title), console=console, auto_refresh=False, transient=not terminal
    ) as live:
        wait = min(interval, max_interval)
        while not all(row.ended for row in rows):
            time.sleep(wait)
            wait = min(wait * 2, max_interval)
            rows = run_statuses(runs)
            live.update(status_table(rows, title), refresh=True)
    if not terminal:
        console.print(PlainTable(status_table(rows, title)))
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
