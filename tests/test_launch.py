"""samat.launch without a cluster: parameters, sbatch text, arrays, skipping, errors, status, tasks.

SLURM's commands are stand-in scripts on a PATH of their own, so these tests behave the same on a
machine where the real test cluster runs.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from samat.config import ConfigError, GridConfig, SlurmConfig
from samat.grid import expand
from samat.launch import RunTask, scheduler, show_status, submit_grid
from samat.launch.status import combined_state, follow, run_statuses
from samat.launch.submit import array_chunks, sbatch_script, select_runs, slurm_parameters
from samat.store import RunDir, canonical_key, prepare
from tests.conftest import TINY_BASE, finish, set_state, signal_when

RESULT = {"run_id": "x", "natural": 0.9, "robust": {"FGSM": 0.5}, "average_robust": 0.5}


def make_grid(tmp_path: Path, seeds: int = 4, **slurm: object) -> GridConfig:
    return GridConfig(
        name="t",
        output=tmp_path / "out",
        base=copy.deepcopy(TINY_BASE),
        seeds=list(range(seeds)),
        slurm={"gpus_per_node": 0, "cpus_per_task": 1, **slurm},
    )


def recording_console() -> Console:
    return Console(record=True, width=200, force_terminal=False)


# -- parameters and the sbatch file ---------------------------------------------------------------


def test_slurm_parameters_map_every_field() -> None:
    config = SlurmConfig(
        partition="gpu",
        account="proj",
        qos="high",
        gpus_per_node=2,
        cpus_per_task=8,
        mem_gb=1.5,
        timeout_min=30,
        array_parallelism=5,
        constraint="a100",
        max_num_timeout=2,
        signal_delay_s=45,
        additional_parameters={"exclusive": True, "mail_type": "END"},
        setup=["module load cuda"],
    )
    assert slurm_parameters(config, "demo") == {
        "job_name": "samat-demo",
        "partition": "gpu",
        "account": "proj",
        "qos": "high",
        "gpus_per_node": 2,
        "cpus_per_task": 8,
        "mem": "1536MB",
        "time": 30,
        "array_parallelism": 5,
        "constraint": "a100",
        "signal_delay_s": 45,
        "additional_parameters": {"exclusive": True, "mail_type": "END"},
        "setup": ["module load cuda"],
    }


def test_slurm_parameters_leave_out_what_is_not_set() -> None:
    params = slurm_parameters(SlurmConfig(gpus_per_node=0, mem_gb=16), "g")
    assert params["mem"] == "16GB"
    assert not {
        "gpus_per_node",
        "partition",
        "account",
        "qos",
        "constraint",
        "setup",
        "additional_parameters",
    } & set(params)


def test_sbatch_script_has_the_array_and_every_flag(tmp_path: Path) -> None:
    config = SlurmConfig(
        partition="gpu",
        gpus_per_node=1,
        timeout_min=30,
        array_parallelism=2,
        signal_delay_s=45,
        additional_parameters={"exclusive": True},
        setup=["module load cuda"],
    )
    script = sbatch_script(slurm_parameters(config, "demo"), tmp_path / "%j", 4)
    for line in (
        "#SBATCH --array=0-3%2",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --time=30",
        "#SBATCH --signal=USR2@45",
        "#SBATCH --exclusive",
        "#SBATCH --job-name=samat-demo",
        "module load cuda",
    ):
        assert line in script.splitlines()
    assert "-m submitit.core._submit" in script
    # one run is a plain job, not an array of one
    assert "--array" not in sbatch_script(slurm_parameters(config, "demo"), tmp_path, 1)


def test_array_chunks_respect_max_array_size() -> None:
    assert [len(c) for c in array_chunks(list(range(2500)), 1001)] == [1001, 1001, 498]
    assert array_chunks([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]
    assert array_chunks([1, 2, 3], 1001) == [[1, 2, 3]]


def test_max_array_size_from_scontrol(slurm_bin) -> None:
    assert scheduler.max_array_size() == 1001  # no scontrol: SLURM's default
    slurm_bin("scontrol", "echo 'MaxArraySize            = 3'; echo 'MaxJobCount = 10000'")
    assert scheduler.max_array_size() == 3
    slurm_bin("scontrol", "echo 'MaxArraySize = 0'")
    assert scheduler.max_array_size() == 1


def test_dry_run_splits_large_grids_and_submits_nothing(tmp_path: Path, slurm_bin) -> None:
    slurm_bin("scontrol", "echo 'MaxArraySize = 3'")
    sbatch = slurm_bin("sbatch", f"touch {tmp_path}/sbatch-called; exit 1")
    grid = make_grid(tmp_path, seeds=5, array_parallelism=2)
    console = recording_console()
    assert submit_grid(grid, executor="slurm", dry_run=True, console=console) == 0
    text = console.export_text()
    assert "#SBATCH --array=0-2%2" in text and "#SBATCH --array=0-1%2" in text
    assert "dry run (slurm): 5 runs to run, 0 skipped; nothing submitted" in text
    assert not (tmp_path / "sbatch-called").exists() and sbatch.exists()
    assert not (tmp_path / "out").exists()


def test_dry_run_without_sbatch_prints_the_script(tmp_path: Path, slurm_bin) -> None:
    console = recording_console()
    submit_grid(
        make_grid(tmp_path, array_parallelism=3), executor="slurm", dry_run=True, console=console
    )
    assert "#SBATCH --array=0-3%3" in console.export_text()


def test_dry_run_shows_the_container_command(tmp_path: Path, slurm_bin) -> None:
    image = tmp_path / "samat.sif"
    image.write_text("")
    grid = make_grid(tmp_path, seeds=1)
    grid.container = {"runtime": "apptainer", "image": str(image)}
    console = recording_console()
    submit_grid(grid, executor="slurm", dry_run=True, console=console)
    text = console.export_text()
    run_dir = expand(grid)[0].run_dir.absolute()
    assert "warning: container runtime 'apptainer' is not on this node's PATH" in text
    command = text.split("each task runs its run in the container, e.g. ")[1].splitlines()[0]
    assert command.startswith("apptainer exec") and str(image) in command
    assert command.endswith(f"samat run {run_dir}")


def test_pyxis_starts_submitit_in_the_image(tmp_path: Path, slurm_bin) -> None:
    grid = make_grid(tmp_path, seeds=2)
    grid.container = {
        "runtime": "pyxis",
        "image": "nvcr.io#nvidia/pytorch:24.05",
        "env": {"A": "1"},
    }
    console = recording_console()
    submit_grid(grid, executor="slurm", dry_run=True, console=console)
    script = console.export_text()
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05" in script
    # the value stays out of the script: it sources the grid's private env file
    env_file = tmp_path / "out" / ".samat" / "container.env"
    assert f". {env_file}" in script.splitlines() and "A=1" not in script
    assert "/opt/venv/bin/python -u -m submitit.core._submit" in script
    assert "each task runs" not in script  # the run executes in submitit's own process
    with pytest.raises(ConfigError, match="'pyxis' runs through SLURM's srun"):
        submit_grid(grid, executor="local", console=recording_console())


# -- validation before anything is submitted ---------------------------------------------------


def test_slurm_executor_without_sbatch_is_a_user_error(tmp_path: Path, slurm_bin) -> None:
    with pytest.raises(ConfigError) as error:
        submit_grid(make_grid(tmp_path), executor="slurm", console=recording_console())
    assert str(error.value) == (
        "sbatch not found on PATH; install SLURM's client or use --executor local"
    )
    assert not (tmp_path / "out").exists()


def test_auto_executor_picks_slurm_only_with_sbatch(slurm_bin) -> None:
    assert scheduler.has_sbatch() is False
    assert submit_resolve("auto") == "local"
    slurm_bin("sbatch", "exit 0")
    assert submit_resolve("auto") == "slurm"


def submit_resolve(executor: str) -> str:
    from samat.launch.submit import resolve_executor

    return resolve_executor(executor)


def test_unwritable_output_directory_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    grid = make_grid(tmp_path)
    grid.output = blocker / "out"
    for dry_run in (False, True):
        with pytest.raises(ConfigError, match=r"output directory .* is not writable"):
            submit_grid(grid, executor="local", dry_run=dry_run, console=recording_console())


def test_unknown_partition_lists_the_known_ones(tmp_path: Path, slurm_bin) -> None:
    slurm_bin("sbatch", "exit 1")
    slurm_bin("sinfo", "printf 'debug\\ngpu\\ngpu\\n'")
    grid = make_grid(tmp_path, partition="gpus")
    with pytest.raises(ConfigError) as error:
        submit_grid(grid, executor="slurm", console=recording_console())
    assert str(error.value) == (
        "unknown partition 'gpus' (slurm.partition); this cluster has: debug, gpu"
    )


def test_missing_container_image_is_a_user_error(tmp_path: Path, slurm_bin) -> None:
    grid = make_grid(tmp_path)
    grid.container = {"runtime": "apptainer", "image": str(tmp_path / "missing.sif")}
    with pytest.raises(ConfigError, match=r"container.image .*missing.sif' does not exist"):
        submit_grid(grid, executor="local", console=recording_console())
    assert not (tmp_path / "out" / "runs").exists()


def test_sbatch_refusal_is_a_user_error(tmp_path: Path, slurm_bin) -> None:
    slurm_bin("srun", "exit 0")
    slurm_bin("sbatch", "echo 'sbatch: error: Invalid account or account/partition' >&2; exit 1")
    with pytest.raises(ConfigError, match="^sbatch refused the job: sbatch: error: Invalid acc"):
        submit_grid(make_grid(tmp_path), executor="slurm", console=recording_console())


# -- submission with a stand-in sbatch --------------------------------------------------------


def test_submit_queues_one_array_and_records_job_ids(tmp_path: Path, slurm_bin) -> None:
    slurm_bin("srun", "exit 0")
    slurm_bin("sbatch", f'cp "$1" {tmp_path}/submitted.sh; echo "Submitted batch job 42"')
    grid = make_grid(tmp_path, array_parallelism=2)
    console = recording_console()
    assert submit_grid(grid, executor="auto", console=console) == 0
    lines = console.export_text().splitlines()
    assert lines[0] == "executor: slurm (sbatch on PATH)"
    assert "submitted SLURM job 42 (array 0-3, at most 2 at a time)" in lines
    assert "4 runs to run, 0 skipped" in lines
    assert any(line.startswith(f"results: {tmp_path / 'out' / 'runs'}") for line in lines)
    assert "#SBATCH --array=0-3%2" in (tmp_path / "submitted.sh").read_text()
    specs = expand(grid)
    assert [RunDir(s.run_dir).state()["job_id"] for s in specs] == [f"42_{i}" for i in range(4)]
    assert {RunDir(s.run_dir).state()["state"] for s in specs} == {"pending"}


# -- which runs to submit ------------------------------------------------------------------------


def test_select_runs_skips_done_and_live_runs(tmp_path: Path, slurm_bin) -> None:
    grid = make_grid(tmp_path, seeds=5)
    specs = expand(grid)
    runs = [prepare(spec) for spec in specs]
    finish(runs[0])  # done
    set_state(runs[1], job_id="7_1")  # queued
    set_state(runs[2], job_id="7_2", state="running")  # running
    set_state(runs[3], job_id="6_0", state="running")  # the scheduler has forgotten it
    set_state(runs[4], state="failed", error="boom")
    slurm_bin("squeue", "printf '7_1|PENDING|0:00\\n7_2|RUNNING|1:00\\n9_0|RUNNING|0:01\\n'")
    actions = select_runs(specs)
    assert [actions[s.run_id].kind for s in specs] == [
        "done",
        "queued",
        "running",
        "train",
        "train",
    ]
    forced = select_runs(specs, force=True)
    assert [forced[s.run_id].kind for s in specs] == [
        "train",
        "queued",
        "running",
        "train",
        "train",
    ]
    # a deterministic failure (NaN loss) is not resubmitted unless asked; an infrastructure one is
    set_state(runs[4], failure="deterministic")
    assert select_runs(specs)[specs[4].run_id].kind == "failed"
    assert select_runs(specs, retry_failed=True)[specs[4].run_id].kind == "train"
    # trained, with an attack added to the request: evaluation only, naming the missing attack
    extra = {"attack": "pgd", "eps": 0.1, "steps": 2, "label": "PGD"}
    request = runs[0].eval_request()
    added = type(request).model_validate(
        {**request.model_dump(), "attacks": [*request.attacks, extra]}
    )
    runs[0].set_eval_request(added)
    changed = dataclasses.replace(specs[0], config=runs[0].config())
    action = select_runs([changed, *specs[1:]])[specs[0].run_id]
    assert (action.kind, action.missing) == ("eval", ("PGD",))
    assert action.describe() == "eval only: PGD"


def test_resubmitting_a_finished_grid_submits_nothing(tmp_path: Path, slurm_bin) -> None:
    sbatch = slurm_bin("sbatch", f"touch {tmp_path}/sbatch-called; exit 1")
    grid = make_grid(tmp_path, seeds=2)
    for spec in expand(grid):
        finish(prepare(spec))
    console = recording_console()
    assert submit_grid(grid, executor="slurm", console=console) == 0
    assert "nothing to submit: 0 runs to run, 2 skipped (2 done)" in console.export_text()
    assert sbatch.exists() and not (tmp_path / "sbatch-called").exists()


# -- status ----------------------------------------------------------------------------------------


def test_parse_sacct_expands_arrays_and_skips_steps() -> None:
    text = (
        "42_0|COMPLETED|00:00:05\n42_1|CANCELLED by 0|00:00:09\n42_1.batch|CANCELLED|x\n"
        "42_[2-3%2]|PENDING|00:00:00\n43|RUNNING|00:01:00\n"
    )
    jobs = scheduler.parse_sacct(text)
    assert {k: v.state for k, v in jobs.items()} == {
        "42_0": "COMPLETED",
        "42_1": "CANCELLED",
        "42_2": "PENDING",
        "42_3": "PENDING",
        "43": "RUNNING",
    }
    assert jobs["42_0"].elapsed == "00:00:05" and jobs["42_2"].active


def fake_runs(tmp_path: Path, n: int) -> list[RunDir]:
    return [prepare(spec) for spec in expand(make_grid(tmp_path, seeds=n))]


def test_status_joins_run_dirs_with_the_scheduler(tmp_path: Path, slurm_bin) -> None:
    runs = fake_runs(tmp_path, 6)
    finish(runs[0])
    set_state(runs[0], job_id="42_0", state="done", attempts=1)
    set_state(runs[1], job_id="42_1", state="running", attempts=2, requeues=1)
    set_state(runs[2], job_id="42_2")
    set_state(runs[3], job_id="42_3", state="running")  # killed before writing a result
    set_state(runs[4], job_id="40_0", state="running")  # forgotten by the scheduler
    set_state(runs[5], state="failed", error="loss became nan")
    slurm_bin(
        "sacct",
        "printf '42_0|COMPLETED|00:00:05\\n42_1|RUNNING|00:02:00\\n"
        "42_2|PENDING|00:00:00\\n42_3|TIMEOUT|00:01:00\\n'",
    )
    slurm_bin("squeue", "printf '42_1|RUNNING|2:00\\n42_2|PENDING|0:00\\n'")
    rows = run_statuses(runs)
    assert [row.state for row in rows] == [
        "done",
        "running",
        "queued",
        "failed",
        "interrupted",
        "failed",
    ]
    assert (rows[1].attempts, rows[1].requeues, rows[1].job_id, rows[1].elapsed) == (
        2,
        1,
        "42_1",
        "00:02:00",
    )
    assert rows[3].note == "job TIMEOUT, no result"
    console = recording_console()
    # exit status 1: runs failed
    assert show_status(tmp_path / "out", console=console) == 1
    text = console.export_text()
    assert text.splitlines()[-1] == "6 runs: 1 done, 1 running, 1 queued, 2 failed, 1 interrupted"


def test_status_without_a_scheduler_uses_run_dirs(tmp_path: Path, slurm_bin) -> None:
    runs = fake_runs(tmp_path, 2)
    set_state(runs[0], job_id="42_0", state="running")
    state = runs[0].state()
    assert combined_state(runs[0], state, None) == ("running", "")
    assert [row.state for row in run_statuses(runs)] == ["running", "pending"]


def test_status_never_waits_on_a_hanging_scheduler(
    tmp_path: Path, slurm_bin, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = fake_runs(tmp_path, 1)
    set_state(runs[0], job_id="42_0", state="running")
    slurm_bin("sacct", "sleep 600")
    slurm_bin("squeue", "sleep 600")
    monkeypatch.setattr(scheduler, "QUERY_TIMEOUT_S", 0.5)
    began = time.monotonic()
    assert [row.state for row in run_statuses(runs)] == ["running"]
    # gave up on the scheduler: waiting for it would take 600 s (a loose bound for a loaded box)
    assert time.monotonic() - began < 120


def test_status_of_an_empty_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no run directories"):
        show_status(tmp_path, console=recording_console())


def test_a_result_deleted_after_the_job_ended_reads_as_pending(tmp_path: Path, slurm_bin) -> None:
    runs = fake_runs(tmp_path, 1)
    set_state(runs[0], job_id="42_0", state="done")
    slurm_bin("sacct", "echo '42_0|COMPLETED|00:00:05'")
    assert [row.state for row in run_statuses(runs)] == ["pending"]


# -- the task ------------------------------------------------------------------------------------


def write_result_command(run_dir: Path, request: str | None = None) -> list[str]:
    """A stand-in 'container' command: a child process that writes the run's result (answering
    the evaluation request `request`)."""
    result = {**RESULT, "request": request}
    code = f"import json; json.dump({result!r}, open({str(run_dir / 'result.json')!r}, 'w'))"
    return [sys.executable, "-c", code]


def test_checkpoint_resubmits_the_task_and_counts_the_requeue(tmp_path: Path) -> None:
    run = fake_runs(tmp_path, 1)[0]
    task = RunTask(run.path, write_result_command(run.path))
    resubmission = task.checkpoint()
    assert resubmission.function is task and task.requeued
    assert resubmission.result() == {**RESULT, "request": None}
    assert run.state()["requeues"] == 1 and not task.requeued
    task()
    assert run.state()["requeues"] == 1  # a call that is not a requeue counts nothing


def test_container_failure_names_the_log(tmp_path: Path) -> None:
    run = fake_runs(tmp_path, 1)[0]
    with pytest.raises(RuntimeError, match=r"container command exited with status 3; see .*log"):
        RunTask(run.path, [sys.executable, "-c", "raise SystemExit(3)"])()


def test_time_limit_signal_is_forwarded_to_the_container(tmp_path: Path) -> None:
    run = fake_runs(tmp_path, 1)[0]
    seen: list[int] = []

    def submitit_handler(signum: int, frame: object) -> None:  # checkpoints and requeues
        seen.append(signum)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    ready = tmp_path / "ready"
    child = f"import time; open({str(ready)!r}, 'w').close(); time.sleep(600)"
    try:
        sender = signal_when(ready, signal.SIGUSR2)
        began = time.monotonic()
        with pytest.raises(RuntimeError, match=f"status {-signal.SIGUSR2}"):
            RunTask(run.path, [sys.executable, "-c", child])()
        sender.join(timeout=60)
        # the child was killed after its grace period, not left to end its 600 s
        assert time.monotonic() - began < 300
        assert seen == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_local_executor_runs_one_after_another(
    tmp_path: Path, slurm_bin, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = make_grid(tmp_path, seeds=2, timeout_min=2)
    monkeypatch.setattr(
        "samat.launch.submit.container_commands",
        lambda cfg, specs, output, *limits: {
            spec.run_id: write_result_command(
                spec.run_dir, canonical_key(spec.config.eval.model_dump(mode="json"))
            )
            for spec in specs
        },
    )
    console = recording_console()
    assert submit_grid(grid, executor="auto", console=console) == 0
    lines = console.export_text().splitlines()
    assert lines[0] == (
        "executor: local (no sbatch on PATH: runs go here, one per CPU core (or GPU) at a time)"
    )
    assert [line.split()[0:2] for line in lines if line.startswith("[")] == [
        ["[1/2]", "done"],
        ["[2/2]", "done"],
    ]
    assert lines[-1] == f"2 of 2 runs done; results in {tmp_path / 'out'}"
    assert all(RunDir(s.run_dir).is_complete() for s in expand(grid))


def test_follow_refreshes_until_every_run_has_ended(tmp_path: Path, slurm_bin) -> None:
    runs = fake_runs(tmp_path, 1)
    finish(runs[0])
    set_state(runs[0], job_id="42_0", state="running")
    # the first look finds the task running, later ones find it completed
    slurm_bin(
        "sacct",
        f"if [ -e {tmp_path}/seen ]; then echo '42_0|COMPLETED|00:00:09'; "
        f"else touch {tmp_path}/seen; echo '42_0|RUNNING|00:00:01'; fi",
    )
    console = recording_console()
    assert follow(runs, console=console, interval=0.05) == 0
    text = console.export_text()
    assert text.count("Ctrl-C") == 1 and text.splitlines()[-1] == "1 run: 1 done"
