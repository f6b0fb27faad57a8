"""A launcher that holds up on a shared cluster: the output directory's lock, job ids recorded
before anything can interrupt, a silent scheduler, control characters, one throttle across
arrays, the container's end, `samat cancel`, `samat status --json` and `samat logs`.

SLURM's commands are stand-in scripts (the `slurm_bin` fixture of conftest): nothing here
reaches a real cluster.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from samat.cli import cli
from samat.config import ConfigError, GridConfig
from samat.grid import expand
from samat.launch import RunTask, scheduler, submit_grid
from samat.launch.cancel import cancel_runs
from samat.launch.lock import LOCK_FILE, output_lock
from samat.launch.status import STATE_STYLES, show_logs
from samat.launch.submit import (
    Chunk,
    evaluate_runs,
    plan_chunks,
    read_submissions,
    select_runs,
)
from samat.store import RunDir, prepare
from tests.conftest import set_state, signal_when
from tests.test_launch import fake_runs, make_grid, recording_console

ROOT = Path(__file__).resolve().parents[1]


def fake_slurm(slurm_bin, tmp_path: Path, *, fail_on: int | None = None, gate: bool = False):
    """Stand-ins for sbatch (job ids 42, 43, ...; each array goes into a queue file that squeue
    prints), squeue, srun and scancel (which empties the queue and logs its arguments)."""
    t = tmp_path
    refuse = (
        f'if [ "$n" = {fail_on} ]; then echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; '
        "exit 1; fi"
        if fail_on
        else ""
    )
    wait = (
        f"touch {t}/sbatch-started; while [ ! -e {t}/release ]; do sleep 0.1; done" if gate else ""
    )
    slurm_bin(
        "sbatch",
        f"""n=$(cat {t}/sbatch-count 2>/dev/null || echo 0); n=$((n+1)); echo $n > {t}/sbatch-count
cp "$1" {t}/script-$n.sh
{refuse}
{wait}
id=$((41 + n))
range=$(sed -n 's/^#SBATCH --array=\\([0-9]*-[0-9]*\\).*/\\1/p' "$1")
if [ -n "$range" ]; then echo "${{id}}_[$range]|PENDING|0:00" >> {t}/queue
else echo "$id|PENDING|0:00" >> {t}/queue; fi
echo "Submitted batch job $id\"""",
    )
    slurm_bin(
        "squeue",
        f"""case "$*" in
  *'%F|%o'*) cat {t}/named 2>/dev/null ;;
  *) cat {t}/queue 2>/dev/null ;;
esac
true""",
    )
    slurm_bin("srun", "exit 0")
    slurm_bin("scancel", f'echo "$@" >> {t}/scancel-calls; : > {t}/queue')


def sbatch_count(tmp_path: Path) -> int:
    path = tmp_path / "sbatch-count"
    return int(path.read_text()) if path.exists() else 0


# -- the lock -------------------------------------------------------------------------------------

PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(1)
sys.exit(0)
"""


def other_process_can_lock(output: Path) -> bool:
    probe = subprocess.run([sys.executable, "-c", PROBE, str(output / LOCK_FILE)], timeout=60)
    return probe.returncode == 0


def test_the_lock_is_a_posix_lock_that_other_processes_see(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with output_lock(output, purpose="submit"):
        assert not other_process_can_lock(output)
        # nested in one process: leaving the inner block must not drop the outer lock (closing
        # any descriptor of the file would)
        with output_lock(output, purpose="cancel"):
            pass
        assert not other_process_can_lock(output)
        assert "samat submit, pid" in (output / LOCK_FILE).read_text()
    assert other_process_can_lock(output)


def test_a_second_holder_waits_with_a_message_naming_the_first(tmp_path: Path) -> None:
    output = tmp_path / "out"
    child = f"""
from samat.launch.lock import output_lock
from samat.config import ConfigError
try:
    with output_lock({str(output)!r}, purpose="submit", say=print, timeout_s=1):
        print("acquired")
except ConfigError as error:
    print("error:", error)
"""
    with output_lock(output, purpose="cancel"):
        proc = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, timeout=60
        )
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"waiting for the lock on {output} (held by samat cancel, pid ")
    assert lines[1].startswith(f"error: {output} is locked by samat cancel")
    assert "acquired" not in proc.stdout
    # released: the next one gets it at once, without a message
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == ["acquired"]


def test_a_lock_file_that_cannot_be_opened_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ConfigError) as error, output_lock(tmp_path, purpose="cancel"):
        pass
    assert str(error.value) == (
        f"cannot open the lock file {tmp_path / LOCK_FILE} (Permission denied); samat needs "
        f"write access to {tmp_path} to submit, cancel or evaluate its runs"
    )


CHILD_SUBMIT = """
import json, sys
from rich.console import Console
import samat.launch.submit as submit
from samat.config import GridConfig
submit.preflight = lambda specs: None  # model and attack checks need torch: not the point here
grid = GridConfig.model_validate(json.loads(sys.argv[1]))
sys.exit(submit.submit_grid(grid, executor="slurm", console=Console(width=300)))
"""


def start_submit(grid: GridConfig, tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_SUBMIT, json.dumps(grid.model_dump(mode="json"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )


def lines_of(proc: subprocess.Popen[str]) -> tuple[queue.Queue[str], threading.Thread]:
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


def next_line(lines: queue.Queue[str], seen: list[str], timeout: float = 60) -> str:
    line = lines.get(timeout=timeout)
    seen.append(line)
    return line


def test_two_concurrent_submits_queue_each_run_once(tmp_path: Path, slurm_bin) -> None:
    fake_slurm(slurm_bin, tmp_path, gate=True)
    grid = make_grid(tmp_path, seeds=4)
    first = start_submit(grid, tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "sbatch-started").exists():  # the first is inside sbatch, locked
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.1)
    second = start_submit(grid, tmp_path)
    (second_lines, reader), seen = lines_of(second), []
    assert next_line(second_lines, seen).startswith(
        f"waiting for the lock on {grid.output} (held by samat submit, pid {first.pid}"
    )
    (tmp_path / "release").touch()
    first_out = first.communicate(timeout=120)[0]
    assert second.wait(timeout=120) == 0 and first.returncode == 0, first_out
    reader.join(timeout=60)
    while not second_lines.empty():
        next_line(second_lines, seen)
    assert "submitted SLURM job 42 (array 0-3, at most 4 at a time)" in first_out
    # the second found the first's runs queued, and queued nothing
    assert f"nothing to submit: 0 runs to run, 4 skipped (4 queued); results in {grid.output}" in (
        seen
    )
    assert sbatch_count(tmp_path) == 1
    states = [RunDir(s.run_dir).state() for s in expand(grid)]
    assert [s.job_id for s in states] == [f"42_{i}" for i in range(4)]


def release_when_waiting(console, release: Path, deadline_s: float = 300) -> None:
    deadline = time.monotonic() + deadline_s
    while "waiting for the lock" not in console.export_text(clear=False):
        if time.monotonic() > deadline:
            break  # the holder is then released anyway, and the test fails on the message
        time.sleep(0.02)
    release.touch()


def test_cancel_and_eval_take_the_lock(tmp_path: Path, slurm_bin) -> None:
    fake_slurm(slurm_bin, tmp_path)
    runs = fake_runs(tmp_path, 1)
    output = tmp_path / "out"
    release = tmp_path / "release"
    child = f"""
import os, time
from samat.launch.lock import output_lock
with output_lock({str(output)!r}, purpose="submit"):
    print("locked", flush=True)
    while not os.path.exists({str(release)!r}):
        time.sleep(0.02)
"""
    for action in (
        lambda console: cancel_runs(output, console=console),
        lambda console: evaluate_runs(
            output, [], n_examples=None, executor="local", console=console
        ),
    ):
        release.unlink(missing_ok=True)
        holder = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        console = recording_console()
        # the holder lets go once the action says it waits (an event, whatever the load)
        releaser = threading.Thread(target=release_when_waiting, args=(console, release))
        releaser.start()
        action(console)
        releaser.join(timeout=60)
        assert "waiting for the lock on" in console.export_text().splitlines()[0]
        assert holder.wait(timeout=60) == 0
    assert runs[0].state().state == "cancelled"


# -- recording ------------------------------------------------------------------------------------


def test_job_ids_are_recorded_without_an_fsync_per_run(
    tmp_path: Path, slurm_bin, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=8)
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    assert submit_grid(grid, executor="slurm", console=recording_console()) == 0
    # per array, not per run: submissions.jsonl fsynced for the intent before sbatch and for
    # the record after it (and its directory once, which it is new in)
    assert len(calls) <= 3
    specs = expand(grid)
    assert [RunDir(s.run_dir).state().job_id for s in specs] == [f"42_{i}" for i in range(8)]
    (entry,) = read_submissions(grid.output)
    assert entry["array"] == "42" and entry["grid"] == "t"
    assert entry["runs"] == [s.run_id for s in specs]
    assert entry["jobs"] == [f"42_{i}" for i in range(8)]


def test_a_job_id_lost_from_state_json_comes_back_from_the_journal(
    tmp_path: Path, slurm_bin
) -> None:
    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=2)
    submit_grid(grid, executor="slurm", console=recording_console())
    run = RunDir(expand(grid)[0].run_dir)
    # a crash after the journal, before this state.json reached the disk
    set_state(run, job_id=None, updated=0)
    console = recording_console()
    assert submit_grid(grid, executor="slurm", console=console) == 0
    assert "nothing to submit: 0 runs to run, 2 skipped (2 queued)" in console.export_text()
    assert run.state().job_id == "42_0" and sbatch_count(tmp_path) == 1


def test_ctrl_c_during_sbatch_waits_until_the_job_ids_are_recorded(
    tmp_path: Path, slurm_bin
) -> None:
    slurm_bin("srun", "exit 0")
    # Ctrl-C reaches samat while sbatch is queueing the array
    slurm_bin("sbatch", 'kill -INT $PPID; sleep 0.3; echo "Submitted batch job 42"')
    grid = make_grid(tmp_path, seeds=3)
    with pytest.raises(KeyboardInterrupt):
        submit_grid(grid, executor="slurm", console=recording_console())
    assert [RunDir(s.run_dir).state().job_id for s in expand(grid)] == ["42_0", "42_1", "42_2"]
    assert read_submissions(grid.output)[0]["array"] == "42"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- a scheduler that does not answer ------------------------------------------------------------


@pytest.mark.parametrize("silence", ["exit 1", "sleep 30"])
def test_recorded_runs_are_not_resubmitted_while_the_scheduler_is_silent(
    tmp_path: Path, slurm_bin, monkeypatch: pytest.MonkeyPatch, silence: str
) -> None:
    monkeypatch.setattr(scheduler, "QUERY_TIMEOUT_S", 0.5)
    fake_slurm(slurm_bin, tmp_path)
    slurm_bin("squeue", silence)
    slurm_bin("sacct", silence)
    grid = make_grid(tmp_path, seeds=4)
    runs = [prepare(spec) for spec in expand(grid)]
    set_state(runs[0], job_id="7_0")  # queued
    set_state(runs[1], job_id="7_1", state="running")
    set_state(runs[2], job_id="6_0", state="failed", error="node failure")  # ended: resubmit
    console = recording_console()
    assert submit_grid(grid, executor="slurm", console=console) == 1
    lines = console.export_text().splitlines()
    assert lines[1] == (
        "2 runs recorded as queued or running not resubmitted: the scheduler did not answer "
        "(squeue failed or timed out); submit again later, or pass --ignore-scheduler "
        "to resubmit them anyway"
    )
    assert "2 runs to run, 2 skipped (2 unknown)" in lines
    assert "#SBATCH --array=0-1%2" in (tmp_path / "script-1.sh").read_text()
    assert [run.state().job_id for run in runs] == ["7_0", "7_1", "42_0", "42_1"]
    # --ignore-scheduler: the user says they are not queued
    assert submit_grid(grid, executor="slurm", ignore_scheduler=True, console=console) == 0
    assert [run.state().job_id for run in runs[:2]] == ["43_0", "43_1"]


def test_accounting_alone_is_not_an_answer_about_queued_or_running_runs(
    tmp_path: Path, slurm_bin
) -> None:
    """slurmctld down, slurmdbd up: sacct still says RUNNING (its last view), squeue fails."""
    fake_slurm(slurm_bin, tmp_path)
    slurm_bin("squeue", "exit 1")
    slurm_bin("sacct", 'echo "7_0|RUNNING|00:01:00"; echo "7_1|COMPLETED|00:02:00"')
    grid = make_grid(tmp_path, seeds=2)
    runs = [prepare(spec) for spec in expand(grid)]
    set_state(runs[0], job_id="7_0", state="running")
    set_state(runs[1], job_id="7_1", state="running")
    console = recording_console()
    assert submit_grid(grid, executor="slurm", console=console) == 1
    assert "2 runs to run" not in console.export_text()
    assert sbatch_count(tmp_path) == 0
    assert [run.state().job_id for run in runs] == ["7_0", "7_1"]
    # status still shows what accounting knows
    assert scheduler.job_states(["7_0", "7_1"]) == {
        "7_0": scheduler.JobInfo("RUNNING", "00:01:00"),
        "7_1": scheduler.JobInfo("COMPLETED", "00:02:00"),
    }


def test_submit_cli_exit_status_and_ignore_scheduler_flag(
    tmp_path: Path, slurm_bin, write_yaml
) -> None:
    fake_slurm(slurm_bin, tmp_path)
    slurm_bin("squeue", "exit 1")
    grid = make_grid(tmp_path, seeds=1)
    run = prepare(expand(grid)[0])
    set_state(run, job_id="7_0")
    grid_file = write_yaml(grid.model_dump(mode="json"))
    result = CliRunner().invoke(cli, ["submit", str(grid_file), "--executor", "slurm"])
    assert result.exit_code == 1 and "the scheduler did not answer" in result.output
    assert sbatch_count(tmp_path) == 0
    result = CliRunner().invoke(
        cli, ["submit", str(grid_file), "--executor", "slurm", "--ignore-scheduler"]
    )
    assert result.exit_code == 0, result.output
    assert run.state().job_id == "42"


# -- control characters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "value", "key"),
    [
        ({"slurm": {"partition": "gpu\n#SBATCH --qos=top"}}, "newline", "slurm.partition"),
        ({"slurm": {"account": "a\rb"}}, "carriage return", "slurm.account"),
        ({"slurm": {"qos": "q\x00"}}, "NUL", "slurm.qos"),
        ({"slurm": {"constraint": "a100\x1b"}}, "U+001B", "slurm.constraint"),
        ({"slurm": {"setup": ["module load cuda", "echo\nrm -rf ~"]}}, "newline", "slurm.setup.1"),
        ({"slurm": {"additional_parameters": {"mail\nx": "END"}}}, "newline", "slurm.additional"),
        ({"slurm": {"additional_parameters": {"mail": "E\nND"}}}, "newline", "slurm.additional"),
        ({"container": {"runtime": "docker", "image": "s\n"}}, "newline", "container.image"),
        (
            {"container": {"runtime": "docker", "image": "s", "binds": ["/a:/b\n"]}},
            "new",
            "binds.0",
        ),
        ({"container": {"runtime": "docker", "image": "s", "env": {"A\n": "1"}}}, "new", "env"),
        ({"container": {"runtime": "docker", "image": "s", "env": {"A": "\x07"}}}, "U+0007", "env"),
        ({"container": {"runtime": "docker", "image": "s", "executable": "do\tck"}}, "tab", "exe"),
        ({"container": {"runtime": "pyxis", "image": "s", "python": "py\n"}}, "new", "python"),
        ({"name": "grid\nname"}, "newline", "name"),
        ({"output": "out\ndir"}, "newline", "output"),
    ],
)
def test_control_characters_are_config_errors_and_nothing_is_submitted(
    tmp_path: Path, slurm_bin, write_yaml, section: dict, value: str, key: str
) -> None:
    fake_slurm(slurm_bin, tmp_path)
    data = make_grid(tmp_path).model_dump(mode="json")
    for name, part in section.items():
        data[name] = {**data[name], **part} if isinstance(part, dict) else part
    result = CliRunner().invoke(cli, ["submit", str(write_yaml(data)), "--executor", "slurm"])
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert line.startswith(f"error: {tmp_path / 'grid.yaml'}: ") and key in line and value in line
    assert sbatch_count(tmp_path) == 0 and not (tmp_path / "out").exists()


# -- one throttle over every array ----------------------------------------------------------------


def max_running(chunks: list[Chunk]) -> int:
    """The most tasks that may run at once: the arrays of each lane (chained by afterany) run
    one after another, so it is the sum over lanes of their largest throttle."""
    lane_of: dict[int, int] = {}
    for index, chunk in enumerate(chunks):
        lane_of[index] = index if chunk.after is None else lane_of[chunk.after]
    lanes: dict[int, int] = {}
    for index, chunk in enumerate(chunks):
        lane = lane_of[index]
        lanes[lane] = max(lanes.get(lane, 0), min(chunk.size, chunk.throttle))
    return sum(lanes.values())


def test_plan_chunks_bounds_the_whole_grid_by_array_parallelism() -> None:
    assert plan_chunks(4, 1001, 2) == [Chunk(0, 4, 2)]
    assert plan_chunks(7, 3, 2) == [Chunk(0, 3, 2), Chunk(3, 3, 2, 0), Chunk(6, 1, 1, 1)]
    # two lanes of arrays of 2 when 4 may run
    assert plan_chunks(7, 2, 4) == [
        Chunk(0, 2, 2),
        Chunk(2, 2, 2),
        Chunk(4, 2, 2, 0),
        Chunk(6, 1, 1, 1),
    ]
    # arrays disabled (MaxArraySize 1): P single jobs in parallel lanes
    assert [c.after for c in plan_chunks(5, 1, 2)] == [None, None, 0, 1, 2]
    # a grid within the throttle: no waiting at all
    assert all(c.after is None for c in plan_chunks(2500, 1001, 5000))
    for count in range(1, 40):
        for max_size in range(1, 12):
            for parallelism in range(1, 30):
                chunks = plan_chunks(count, max_size, parallelism)
                assert sum(c.size for c in chunks) == count
                assert all(c.size <= max_size and c.throttle >= 1 for c in chunks)
                assert all(c.after is None or c.after < i for i, c in enumerate(chunks))
                assert max_running(chunks) <= parallelism
                # and it does not starve: at least min(P, M) may run
                assert max_running(chunks) >= min(parallelism, max_size, count)


def test_arrays_past_max_array_size_are_chained(tmp_path: Path, slurm_bin) -> None:
    fake_slurm(slurm_bin, tmp_path)
    slurm_bin("scontrol", "echo 'MaxArraySize = 3'")
    grid = make_grid(tmp_path, seeds=7, array_parallelism=2)
    console = recording_console()
    assert submit_grid(grid, executor="slurm", console=console) == 0
    scripts = [(tmp_path / f"script-{n}.sh").read_text().splitlines() for n in (1, 2, 3)]
    assert "#SBATCH --array=0-2%2" in scripts[0] and "#SBATCH --array=0-2%2" in scripts[1]
    assert not any("--dependency" in line for line in scripts[0])
    assert "#SBATCH --dependency=afterany:42" in scripts[1]
    assert "#SBATCH --dependency=afterany:43" in scripts[2]
    text = console.export_text()
    assert "submitted SLURM job 43 (array 0-2, at most 2 at a time, after job 42 has ended)" in text
    assert "submitted SLURM job 44 (one task, after job 43 has ended)" in text
    ids = [RunDir(s.run_dir).state().job_id for s in expand(grid)]
    assert ids == ["42_0", "42_1", "42_2", "43_0", "43_1", "43_2", "44"]


def test_dry_run_shows_each_arrays_dependency(tmp_path: Path, slurm_bin) -> None:
    slurm_bin("scontrol", "echo 'MaxArraySize = 2'")
    grid = make_grid(tmp_path, seeds=4, array_parallelism=2)
    console = recording_console()
    submit_grid(grid, executor="slurm", dry_run=True, console=console)
    text = console.export_text()
    assert "# sbatch script 2 of 2 (2 runs, after array 1 has ended):" in text
    assert "#SBATCH --dependency='afterany:<job id of array 1>'" in text


def test_a_refused_later_array_reports_what_was_queued(tmp_path: Path, slurm_bin) -> None:
    fake_slurm(slurm_bin, tmp_path, fail_on=2)
    slurm_bin("scontrol", "echo 'MaxArraySize = 3'")
    grid = make_grid(tmp_path, seeds=7, array_parallelism=2)
    with pytest.raises(ConfigError) as error:
        submit_grid(grid, executor="slurm", console=recording_console())
    assert str(error.value) == (
        "sbatch refused array 2 of 3: sbatch: error: QOSMaxSubmitJobPerUserLimit; queued before "
        "it: job 42 (3 runs); the other 4 runs are not queued: fix the cause, then submit the "
        "grid again (it skips the queued runs)"
    )
    states = [RunDir(s.run_dir).state() for s in expand(grid)]
    assert [s.job_id for s in states] == ["42_0", "42_1", "42_2", None, None, None, None]
    result = CliRunner().invoke(cli, ["status", str(grid.output), "--json"])
    by_id = {row["run_id"]: row["state"] for row in json.loads(result.output)}
    assert [by_id[s.run_id] for s in expand(grid)] == ["queued"] * 3 + ["pending"] * 4


# -- the container's end --------------------------------------------------------------------------


def test_a_missing_container_runtime_fails_the_run_with_the_reason(tmp_path: Path) -> None:
    run = fake_runs(tmp_path, 1)[0]
    task = RunTask(run.path, ["/nonexistent/docker", "run", "image"])
    with pytest.raises(RuntimeError, match="container runtime '/nonexistent/docker' not found"):
        task()
    state = run.state()
    assert state.state == "failed" and state.failure == "infra"
    assert "not found on" in state.error and "container.executable" in state.error
    # an infrastructure failure: the next submit runs it again
    spec = expand(make_grid(tmp_path, seeds=1))[0]
    assert select_runs([spec])[spec.run_id].kind == "train"


# a stand-in container client: says it is ready once its handlers are in place, notes the signal
# it was sent, then exits as `samat run` does (3)
CLIENT = """
import signal, sys, time
def note(signum, frame):
    open(sys.argv[1], "w").write(str(signum))
    sys.exit(3)
signal.signal(signal.SIGINT, note)
signal.signal(signal.SIGTERM, note)
open(sys.argv[2], "w").close()
time.sleep(600)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_local_runs_end_stops_its_container(tmp_path: Path, signum: int) -> None:
    run = fake_runs(tmp_path, 1)[0]
    stopped, received = tmp_path / "stopped", tmp_path / "received"
    stop = ["sh", "-c", f"echo stop >> {stopped}"]
    client = [sys.executable, "-c", CLIENT, str(received), str(tmp_path / "ready")]
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))  # submitit's: bypass
    try:
        sender = signal_when(tmp_path / "ready", signum)
        expected = KeyboardInterrupt if signum == signal.SIGINT else RuntimeError
        with pytest.raises(expected):
            RunTask(run.path, client, stop)()
    finally:
        signal.signal(signal.SIGTERM, previous)
    sender.join(timeout=60)
    # the client got the signal (to store the run's progress), and the container was stopped
    # once, by the handler (not again when the task ended); the task waited for the client
    assert received.read_text() == str(int(signum))
    assert stopped.read_text() == "stop\n"
    assert seen == ([signal.SIGTERM] if signum == signal.SIGTERM else [])


@pytest.mark.parametrize(
    "stop", [["/nonexistent/podman", "kill"], ["sh", "-c", "exit 125"], ["sleep", "30"]]
)
def test_a_failing_stop_command_never_escapes_the_signal_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: list[str]
) -> None:
    from samat.launch import task as task_module

    monkeypatch.setattr(task_module, "STOP_TIMEOUT_S", 0.5)
    run = fake_runs(tmp_path, 1)[0]
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    ready = tmp_path / "ready"
    child = f"import time; open({str(ready)!r}, 'w').close(); time.sleep(600)"
    try:
        sender = signal_when(ready, signal.SIGTERM)
        with pytest.raises(RuntimeError, match=f"status {-signal.SIGTERM}"):
            RunTask(run.path, [sys.executable, "-c", child], stop)()
    finally:
        signal.signal(signal.SIGTERM, previous)
    sender.join(timeout=60)
    assert seen == [signal.SIGTERM]  # submitit's handler still ran


# -- samat cancel ---------------------------------------------------------------------------------


def test_cancel_scancels_the_grids_arrays_and_orphans_and_a_submit_resumes(
    tmp_path: Path, slurm_bin
) -> None:
    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=3)
    submit_grid(grid, executor="slurm", console=recording_console())
    submitit = tmp_path / "out" / "submitit"
    # an array of this grid whose ids were never recorded, and one of another output directory
    (tmp_path / "named").write_text(
        f"42|{submitit}/.submission_file_a.sh\n77|{submitit}/.submission_file_b.sh\n"
        f"88|{tmp_path}/elsewhere/submitit/.submission_file_c.sh\n"
    )
    finish_first = RunDir(expand(grid)[0].run_dir)
    set_state(finish_first, state="failed", error="boom")  # ended: not cancelled
    result = CliRunner().invoke(cli, ["cancel", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scancel-calls").read_text().split() == ["42", "77"]
    assert result.output.strip() == (
        "cancelled 2 runs (scancel 42 77); 1 unrecorded array of the grid cancelled too: 77; "
        "samat submit resumes them"
    )
    states = [RunDir(s.run_dir).state().state for s in expand(grid)]
    assert states == ["failed", "cancelled", "cancelled"]
    rows = json.loads(CliRunner().invoke(cli, ["status", str(tmp_path / "out"), "--json"]).output)
    assert [row["state"] for row in rows if row["job_id"] != "42_0"] == ["cancelled"] * 2
    # a later submit resumes them
    specs = expand(grid)
    assert [select_runs(specs)[s.run_id].kind for s in specs] == ["train"] * 3
    submit_grid(grid, executor="slurm", console=recording_console())
    assert [RunDir(s.run_dir).state().job_id for s in specs] == ["43_0", "43_1", "43_2"]


def test_cancel_one_run_cancels_only_its_task(tmp_path: Path, slurm_bin) -> None:
    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=3)
    submit_grid(grid, executor="slurm", console=recording_console())
    target = expand(grid)[1]
    console = recording_console()
    assert cancel_runs(grid.output, run_ids=[target.run_id], console=console) == 0
    assert (tmp_path / "scancel-calls").read_text().split() == ["42_1"]
    assert [RunDir(s.run_dir).state().state for s in expand(grid)] == [
        "pending",
        "cancelled",
        "pending",
    ]
    with pytest.raises(ConfigError, match="no run 'nope' in"):
        cancel_runs(grid.output, run_ids=["nope"], console=console)


def test_a_failing_scancel_marks_nothing_cancelled(tmp_path: Path, slurm_bin) -> None:
    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=2)
    submit_grid(grid, executor="slurm", console=recording_console())
    slurm_bin("scancel", "echo 'scancel: error: Access/permission denied' >&2; exit 1")
    with pytest.raises(ConfigError, match="scancel failed: scancel: error: Access/permission"):
        cancel_runs(grid.output, console=recording_console())
    assert {RunDir(s.run_dir).state().state for s in expand(grid)} == {"pending"}


# -- status --json, --state, logs -----------------------------------------------------------------


def test_status_json_state_filter_and_exit_status(tmp_path: Path, slurm_bin) -> None:
    runs = fake_runs(tmp_path, 3)
    set_state(runs[0], state="failed", error="loss became nan", attempts=1)
    set_state(runs[1], state="cancelled", job_id="42_1")
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["status", out, "--json"])
    assert result.exit_code == 1  # a run failed
    rows = json.loads(result.output)
    assert set(rows[0]) == {
        "run_id",
        "label",
        "seed",
        "state",
        "attempts",
        "requeues",
        "job_id",
        "note",
    }
    by_id = {row["run_id"]: row for row in rows}
    assert by_id[runs[0].run_id] == {
        "run_id": runs[0].run_id,
        "label": "SGD",
        "seed": runs[0].config().seed,
        "state": "failed",
        "attempts": 1,
        "requeues": 0,
        "job_id": None,
        "note": "loss became nan",
    }
    assert by_id[runs[1].run_id]["state"] == "cancelled"
    assert by_id[runs[1].run_id]["note"] == "samat cancel; submit again to resume"
    assert by_id[runs[1].run_id]["job_id"] == "42_1"
    only = CliRunner().invoke(cli, ["status", out, "--json", "--state", "pending"])
    assert [row["run_id"] for row in json.loads(only.output)] == [runs[2].run_id]
    table = CliRunner().invoke(cli, ["status", out, "--state", "cancelled"])
    assert table.output.splitlines()[-1] == "1 run: 1 cancelled"
    set_state(runs[0], state="pending")
    assert CliRunner().invoke(cli, ["status", out]).exit_code == 0


def test_the_cli_state_choices_are_the_states_status_knows() -> None:
    from samat.cli import STATES

    assert set(STATES) == set(STATE_STYLES)


def test_logs_prints_the_log_and_where_the_job_output_is(tmp_path: Path) -> None:
    run = fake_runs(tmp_path, 1)[0]
    result = CliRunner().invoke(cli, ["logs", str(run.path)])
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        f"# {run.path / 'log'}: no log yet (the run has not started)",
        "# no scheduler job recorded for this run (not submitted, or run locally)",
    ]
    run.file("log").write_text("epoch 1/2 loss 2.3\nepoch 2/2 loss 1.1\n")
    set_state(run, job_id="42_3", error="CUDA out of memory")
    folder = tmp_path / "out" / "submitit" / "42_3"
    folder.mkdir(parents=True)
    (folder / "42_3_0_log.out").write_text("")
    console = recording_console()
    assert show_logs(run.path, console=console) == 0
    assert console.export_text().splitlines() == [
        f"# {run.path / 'log'}",
        "epoch 1/2 loss 2.3",
        "epoch 2/2 loss 1.1",
        "# error: CUDA out of memory",
        f"# job 42_3 stdout: {folder / '42_3_0_log.out'}",
        f"# job 42_3 stderr: {folder / '42_3_0_log.err'} (not there yet)",
    ]
    result = CliRunner().invoke(cli, ["logs", str(tmp_path)])
    assert result.exit_code == 2 and "is not a run directory" in result.output


# -- several runs per task -------------------------------------------------------------------------


def test_runs_per_task_packs_runs_into_fewer_tasks_that_share_a_job_id(
    tmp_path: Path, slurm_bin
) -> None:
    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=5, runs_per_task=2, array_parallelism=4)
    console = recording_console()
    assert submit_grid(grid, executor="slurm", dry_run=True, console=console) == 0
    assert "# sbatch script 1 of 1 (3 tasks of up to 2 runs):" in console.export_text()
    assert submit_grid(grid, executor="slurm", console=console) == 0
    assert "submitted SLURM job 42 (array 0-2, at most 3 at a time, 2 runs per task)" in (
        console.export_text()
    )
    assert "#SBATCH --array=0-2%3" in (tmp_path / "script-1.sh").read_text()
    runs = [RunDir(spec.run_dir) for spec in expand(grid)]
    assert [run.state().job_id for run in runs] == ["42_0", "42_0", "42_1", "42_1", "42_2"]
    # what submitit pickled for task 1: the pack of the third and fourth runs
    tasks = sorted((tmp_path / "out" / "submitit").glob("*/42_1_submitted.pkl"))
    assert len(tasks) == 1
    import cloudpickle

    delayed = cloudpickle.loads(tasks[0].read_bytes())
    assert delayed.function.run_dirs == [runs[2].path, runs[3].path]
