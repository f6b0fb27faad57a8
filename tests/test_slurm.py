"""Acceptance tests against the real single-node SLURM test cluster (`bash slurm/start-cluster.sh`).

Without `sbatch` they are skipped, unless SAMAT_REQUIRE_SLURM=1 (CI), where a missing or silent
cluster fails them. The whole file takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner, Result

from samat.cli import cli
from samat.config import load_grid
from samat.grid import expand
from samat.launch.scheduler import job_states, parse_sacct
from samat.launch.status import run_statuses
from samat.store import RunDir, find_runs, prepare, read_checkpoint
from samat.train import execute
from tests.conftest import TINY_BASE

pytestmark = pytest.mark.slurm
# Each wait below is far above what the step takes on a loaded 2-core machine.
WAIT_S = 300


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skip (or fail, with SAMAT_REQUIRE_SLURM=1) when there is no cluster to talk to."""
    problem = None
    if shutil.which("sbatch") is None:
        problem = "sbatch is not on PATH"
    elif subprocess.run(["sinfo", "-h"], capture_output=True, timeout=60).returncode != 0:
        problem = "sbatch is on PATH but the cluster does not answer (sinfo failed)"
    if problem is None:
        return
    message = f"{problem}; start the test cluster with `bash slurm/start-cluster.sh`"
    if os.environ.get("SAMAT_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def samat(*args: object) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def write_grid(tmp_path: Path, name: str, base: dict[str, Any], **extra: Any) -> Path:
    grid = {"name": name, "output": str(tmp_path / "out"), "base": base, **extra}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def submitted_job(output: str) -> str:
    match = re.search(r"submitted SLURM job (\d+)", output)
    assert match, output
    return match.group(1)


def tasks_of(job: str) -> dict[str, str]:
    """{task id: state} of a job's tasks as the scheduler reports them."""
    known = job_states([job]) or {}
    return {key: info.state for key, info in known.items() if key.split("_")[0] == job}


def wait_until_ended(job: str, seconds: float = WAIT_S) -> dict[str, str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        known = job_states([job]) or {}
        tasks = {k: v for k, v in known.items() if k.split("_")[0] == job}
        if tasks and not any(info.active for info in tasks.values()):
            return {key: info.state for key, info in tasks.items()}
        time.sleep(2)
    raise AssertionError(f"job {job} still not ended after {seconds} s: {tasks_of(job)}")


def jobs_named(name: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-n", name, "-o", "%i"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return out.split()


ARRAY_BASE = {
    **copy.deepcopy(TINY_BASE),
    "data": {"name": "digits", "train_size": 128, "test_size": 64},
}
ARRAY_BASE["train"]["epochs"] = 1
ARRAY_GRID = {
    "variants": [{"method.name": "standard"}, {"method.name": "sam", "method.rho": 0.1}],
    "seeds": [0, 1],
    "slurm": {"gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 10, "array_parallelism": 2},
}


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path: Path) -> None:
    grid = write_grid(tmp_path, "slurm-dry", ARRAY_BASE, **ARRAY_GRID)
    result = samat("submit", grid, "--dry-run")
    assert result.exit_code == 0, result.output
    script = result.output.split("#!/bin/bash", 1)[1]
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --job-name=samat-slurm-dry" in script
    assert "srun --unbuffered" in script and "submitit.core._submit" in script
    assert "nothing submitted" in result.output
    assert jobs_named("samat-slurm-dry") == []
    assert not (tmp_path / "out").exists()


def test_grid_runs_as_one_array_and_resubmits_only_what_is_missing(tmp_path: Path) -> None:
    grid_file = write_grid(tmp_path, "slurm-array", ARRAY_BASE, **ARRAY_GRID)
    out = tmp_path / "out"
    result = samat("submit", grid_file)
    assert result.exit_code == 0, result.output
    job = submitted_job(result.output)
    assert f"submitted SLURM job {job} (array 0-3, at most 2 at a time)" in result.output
    assert "4 runs to run, 0 skipped" in result.output

    # while the array runs: every run is queued or running, one job id with tasks _0.._3
    assert {row.state for row in run_statuses(find_runs(out))} <= {"queued", "running"}
    status = samat("status", out)
    summary = status.output.strip().splitlines()[-1]
    assert status.exit_code == 0 and summary.startswith("4 runs:") and "done" not in summary
    assert set(tasks_of(job)) == {f"{job}_{i}" for i in range(4)}

    assert wait_until_ended(job) == {f"{job}_{i}": "COMPLETED" for i in range(4)}
    status = samat("status", out)
    assert status.output.strip().splitlines()[-1] == "4 runs: 4 done"
    collected = samat("collect", out, "--format", "json", "--per-run")
    assert collected.exit_code == 0
    assert len(json.loads(collected.output)) == 4

    again = samat("submit", grid_file)
    assert again.exit_code == 0
    assert "nothing to submit: 0 runs to run, 4 skipped (4 done)" in again.output
    assert jobs_named("samat-slurm-array") == []

    redo = expand(load_grid(grid_file))[2]
    (redo.run_dir / "result.json").unlink()
    resubmitted = samat("submit", grid_file, "--wait")
    assert resubmitted.exit_code == 0, resubmitted.output
    # trained, its records stored: only the summary is rewritten, nothing trains again
    assert "1 run to run (0 to train, 1 eval only), 3 skipped (3 done)" in resubmitted.output
    assert "(one task)" in resubmitted.output
    assert tasks_of(submitted_job(resubmitted.output)) == {
        submitted_job(resubmitted.output): "COMPLETED"
    }
    assert RunDir(redo.run_dir).is_complete()
    assert samat("status", out).output.strip().splitlines()[-1] == "4 runs: 4 done"


def seconds_of(base: dict[str, Any], tmp_path: Path, what: str) -> float:
    """Seconds that one epoch (what='train') or one attack batch (what='eval') of `base` takes on
    this machine now, from a 2-epoch run in this process."""
    config = copy.deepcopy(base)
    config["train"]["epochs"] = 2
    spec = expand(load_grid(write_grid(tmp_path / f"calibrate-{what}", "calibrate", config)))[0]
    result = execute(prepare(spec).path)
    if what == "train":
        return result["train_seconds"] / 2
    batches = -(-config["eval"]["n_examples"] // config["eval"]["batch_size"])
    return result["eval_seconds"] / batches


def weights(run: RunDir) -> dict[str, Any]:
    tensors, _ = read_checkpoint(run.file("checkpoint.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim."))}


def test_signal_mid_epoch_checkpoints_at_the_step_and_resumes_bit_identical(
    tmp_path: Path,
) -> None:
    """Preemption (USR2 from scancel, as SLURM sends before a time limit) lands mid-epoch: the
    task checkpoints at the next step boundary and requeues; the resumed run's final weights
    equal an uninterrupted run's bit for bit. Driven by the signal, not by the machine's speed."""
    base = copy.deepcopy(TINY_BASE)
    base["train"]["batch_size"] = 8  # 64 steps an epoch: a signal lands mid-epoch
    base["eval"]["attacks"] = []
    # at least 15 s of training whatever the machine's speed (no cap): the signal, sent once the
    # first epoch is logged, comes within a second or two of it, long before the end
    base["train"]["epochs"] = max(3, round(15 / seconds_of(base, tmp_path, "train")))
    grid_file = write_grid(
        tmp_path,
        "slurm-signal",
        base,
        slurm={"gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 20, "max_num_timeout": 3},
    )
    result = samat("submit", grid_file)
    assert result.exit_code == 0, result.output
    job = submitted_job(result.output)
    spec = expand(load_grid(grid_file))[0]
    run = RunDir(spec.run_dir)
    deadline = time.monotonic() + WAIT_S
    while not run.metrics():  # the first epoch is done: the run is training
        assert time.monotonic() < deadline, tasks_of(job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)

    # meanwhile, the same run uninterrupted, in this process
    reference = prepare(dataclasses.replace(spec, run_dir=tmp_path / "reference" / spec.run_id))
    execute(reference.path)

    assert set(wait_until_ended(job).values()) == {"COMPLETED"}
    assert run.state().state == "done" and run.state().requeues == 1
    log = run.file("log").read_text()
    stopped = re.findall(r"checkpointed at epoch (\d+) step (\d+)", log)
    resumed = re.findall(r"resumed from epoch (\d+) step (\d+)", log)
    assert len(stopped) == 1 and resumed == stopped and int(stopped[0][1]) > 0, log
    assert [m["epoch"] for m in run.metrics()] == list(range(1, base["train"]["epochs"] + 1))
    ours, theirs = weights(run), weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert run.result()["robust"] == {} and run.result()["natural"] == reference.result()["natural"]


def test_time_limit_during_evaluation_requeues_and_the_evaluation_completes(
    tmp_path: Path,
) -> None:
    """A real 1-minute time limit that falls inside a long evaluation: SLURM signals, the task
    stores the finished attack batches and requeues; the next attempts attack only the rest."""
    base = copy.deepcopy(TINY_BASE)
    base["train"]["epochs"] = 1
    slow = {"attack": "pgd", "norm": "linf", "eps": 0.1, "steps": 50, "label": "PGD"}
    # 32 short batches, so that the signal (>= 10 s before the limit) finds a batch boundary soon
    base["eval"] = {"n_examples": 64, "batch_size": 2, "attacks": [slow]}
    per_batch = seconds_of(base, tmp_path, "eval")
    # an allocation of 1 minute leaves at most ~45 s of work: ask for >= 90 s of attack (no cap:
    # a faster machine gets more steps), so that it cannot finish in one allocation
    slow["steps"] = max(50, math.ceil(50 * 90 / (32 * per_batch)))
    grid_file = write_grid(
        tmp_path,
        "slurm-requeue",
        base,
        slurm={
            "gpus_per_node": 0,
            "cpus_per_task": 1,
            "timeout_min": 1,
            "signal_delay_s": 10,
            "max_num_timeout": 12,
        },
    )
    result = samat("submit", grid_file)
    assert result.exit_code == 0, result.output
    job = submitted_job(result.output)
    # COMPLETED, or FAILED when the last time-limit signal reached the task while it exited
    # after writing its result: the run directory decides
    assert set(wait_until_ended(job, 900).values()) <= {"COMPLETED", "FAILED"}
    run = RunDir(expand(load_grid(grid_file))[0].run_dir)
    if not run.is_complete():
        # on a loaded machine SLURM has once killed a just-requeued task before its limit;
        # resubmitting the grid is the documented way on, and it resumes from the records too
        again = samat("submit", grid_file, "--wait")
        assert again.exit_code == 0, again.output
    state = run.state()
    assert state.state == "done" and state.requeues >= 1
    log = run.file("log").read_text()
    assert "resuming at" in log and "resumed from" not in log  # training was done: eval only
    logs = "".join(p.read_text() for p in (tmp_path / "out" / "submitit").glob("*/*.err"))
    assert "Caught signal SIGUSR2" in logs and "timed-out" in logs
    assert run.result()["robust_examples"] == 64
    assert 0 <= run.result()["robust"]["PGD"] <= run.result()["natural_subset"]


# -- concurrent submits, cancel, a silent controller (issue: a launcher that holds up) ------------


def accounted_tasks(name: str, *jobs: str) -> list[str]:
    """Every array task that accounting knows of these jobs and of the jobs named `name`
    (a `--name` query leaves out tasks that never started: each job is then asked by id)."""

    def sacct(*selection: str) -> dict[str, Any]:
        command = ["sacct", "-X", "-n", "-P", "-o", "JobID,State,Elapsed", *selection]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
        return parse_sacct(done.stdout)

    ids = {task.split("_")[0] for task in sacct(f"--name={name}")} | set(jobs)
    return sorted(sacct("-j", ",".join(sorted(ids)))) if ids else []


def test_two_concurrent_submits_queue_each_run_once_on_the_cluster(tmp_path: Path) -> None:
    """Two `samat submit` processes of one grid at once: the output directory's lock lets one
    queue the array; the other finds every run queued. Accounting shows one task per run."""
    name = f"slurm-concurrent-{time.time_ns()}"  # accounting remembers earlier tests' jobs
    grid_file = write_grid(tmp_path, name, ARRAY_BASE, **ARRAY_GRID)
    command = [sys.executable, "-m", "samat", "submit", str(grid_file)]
    first, second = (
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    )
    outputs = [p.communicate(timeout=WAIT_S)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    jobs = [re.search(r"submitted SLURM job (\d+)", out) for out in outputs]
    assert sum(match is not None for match in jobs) == 1, outputs
    job = next(match.group(1) for match in jobs if match)
    assert any("nothing to submit: 0 runs to run, 4 skipped" in out for out in outputs), outputs
    recorded = sorted(str(RunDir(s.run_dir).state().job_id) for s in expand(load_grid(grid_file)))
    assert recorded == [f"{job}_{i}" for i in range(4)]
    subprocess.run(["scancel", job], timeout=60, check=True)
    wait_until_ended(job)
    # a second array would still be queued under the grid's name, and be in accounting
    assert jobs_named(f"samat-{name}") == []
    deadline = time.monotonic() + WAIT_S
    while len(tasks := accounted_tasks(f"samat-{name}", job)) < 4:  # accounting lags
        assert time.monotonic() < deadline, tasks
        time.sleep(1)
    assert tasks == recorded


def test_cancel_a_running_grid_then_a_submit_finishes_it(tmp_path: Path) -> None:
    base = copy.deepcopy(TINY_BASE)
    base["eval"]["attacks"] = []
    # at least 12 s of training whatever the machine's speed: cancel, sent once both runs have
    # logged their first epoch, comes first
    base["train"]["epochs"] = max(3, round(12 / seconds_of(base, tmp_path, "train")))
    grid_file = write_grid(
        tmp_path,
        "slurm-cancel",
        base,
        seeds=[0, 1],
        slurm={"gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 20},
    )
    result = samat("submit", grid_file)
    assert result.exit_code == 0, result.output
    job = submitted_job(result.output)
    runs = [RunDir(spec.run_dir) for spec in expand(load_grid(grid_file))]
    deadline = time.monotonic() + WAIT_S
    while not all(run.metrics() for run in runs):  # both are training
        assert time.monotonic() < deadline, tasks_of(job)
        time.sleep(0.2)

    cancelled = samat("cancel", tmp_path / "out")
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.output.startswith(f"cancelled 2 runs (scancel {job})"), cancelled.output
    assert set(wait_until_ended(job).values()) == {"CANCELLED"}
    rows = json.loads(samat("status", tmp_path / "out", "--json").output)
    assert [row["state"] for row in rows] == ["cancelled", "cancelled"]
    assert all(len(run.metrics()) < base["train"]["epochs"] for run in runs)

    again = samat("submit", grid_file, "--wait")
    assert again.exit_code == 0, again.output
    assert "2 runs to run" in again.output
    for run in runs:
        assert run.state().state == "done"
        assert "resumed from epoch" in run.file("log").read_text()
        assert [m["epoch"] for m in run.metrics()] == list(range(1, base["train"]["epochs"] + 1))


SLURM_STATE = Path(os.environ.get("SLURM_TEST_STATE", "/var/lib/slurm-test"))
ROOT = Path(__file__).resolve().parents[1]


def test_with_slurmctld_stopped_submit_queues_nothing_and_fails(tmp_path: Path) -> None:
    """The controller is down while a run is recorded as running: accounting (slurmdbd) still
    answers, but its last view is no answer. Submit queues nothing and exits non-zero."""
    pid_file = SLURM_STATE / "run" / "slurmctld.pid"
    if not pid_file.is_file():
        pytest.fail(
            f"no {pid_file}: this test stops and restarts the cluster that "
            "slurm/start-cluster.sh started (SLURM_TEST_STATE)"
        )
    base = copy.deepcopy(TINY_BASE)
    base["eval"]["attacks"] = []
    base["train"]["epochs"] = 100_000  # runs until cancelled below
    name = f"slurm-silent-{time.time_ns()}"
    grid_file = write_grid(
        tmp_path,
        name,
        base,
        slurm={"gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 20},
    )
    result = samat("submit", grid_file)
    assert result.exit_code == 0, result.output
    job = submitted_job(result.output)
    run = RunDir(expand(load_grid(grid_file))[0].run_dir)
    try:
        deadline = time.monotonic() + WAIT_S
        while run.state().state != "running":
            assert time.monotonic() < deadline, tasks_of(job)
            time.sleep(0.2)
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        deadline = time.monotonic() + WAIT_S
        while subprocess.run(["scontrol", "ping"], capture_output=True, timeout=60).returncode == 0:
            assert time.monotonic() < deadline, "slurmctld did not stop"
            time.sleep(0.5)
        before = run.state().job_id
        silent = subprocess.run(
            [sys.executable, "-m", "samat", "submit", str(grid_file)],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        assert silent.returncode == 1, silent.stdout + silent.stderr
        assert (
            "1 run recorded as queued or running not resubmitted: the scheduler did not "
            "answer (squeue failed or timed out)" in silent.stdout
        ), silent.stdout
        assert "submitted SLURM job" not in silent.stdout
        assert run.state().job_id == before
    finally:
        subprocess.run(["bash", str(ROOT / "slurm" / "start-cluster.sh")], timeout=300, check=True)
        subprocess.run(["scancel", job], timeout=60)
    wait_until_ended(job)
    # restarted from this process (OMP_NUM_THREADS=1, see conftest): the node keeps every CPU
    cpus = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True, timeout=60, check=True
    )
    assert cpus.stdout.split() == [str(len(os.sched_getaffinity(0)))]
    # nothing else was queued under the grid's name
    assert {task.split("_")[0] for task in accounted_tasks(f"samat-{name}", job)} == {job}


def test_a_run_on_the_cluster_equals_the_same_run_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same config and seed, same numbers: an array task (1 CPU, so 1 thread) and the local
    executor with 1 thread give bit-identical weights and equal results."""
    base = copy.deepcopy(TINY_BASE)
    grid_file = write_grid(
        tmp_path,
        "slurm-equal",
        base,
        variants=[{"method.name": "standard"}, {"method.name": "sam", "method.rho": 0.1}],
        slurm={"gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 10},
    )
    result = samat("submit", grid_file, "--wait")
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("SAMAT_NUM_THREADS", "1")
    for spec in expand(load_grid(grid_file)):
        cluster = RunDir(spec.run_dir)
        assert cluster.state().state == "done"
        assert "threads 1" in cluster.file("log").read_text()
        local = prepare(dataclasses.replace(spec, run_dir=tmp_path / "local" / spec.run_id))
        execute(local.path)
        ours, theirs = weights(cluster), weights(local)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), spec.label
        for key in ("natural", "natural_subset", "robust"):
            assert cluster.result()[key] == local.result()[key], key
        assert [m["loss"] for m in cluster.metrics()] == [m["loss"] for m in local.metrics()]


def test_packed_runs_share_a_task_requeue_together_and_equal_unpacked_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """slurm.runs_per_task 2: two runs in one task (2 CPUs, 1 thread each), each its own
    process. The time-limit signal stops both at a step boundary; the requeued task resumes
    both, and each ends bit-identical to the same run alone with 1 thread."""
    base = copy.deepcopy(TINY_BASE)
    base["train"]["batch_size"] = 8  # 64 steps an epoch: a signal lands mid-epoch
    base["eval"]["attacks"] = []
    # at least 12 s of training each (two at once on the node's 2 CPUs): the signal, sent once
    # both have logged their first epoch, comes first
    base["train"]["epochs"] = max(3, round(12 / seconds_of(base, tmp_path, "train")))
    grid_file = write_grid(
        tmp_path,
        "slurm-packed",
        base,
        seeds=[0, 1],
        slurm={
            "gpus_per_node": 0,
            "cpus_per_task": 2,
            "runs_per_task": 2,
            "timeout_min": 20,
            "max_num_timeout": 3,
        },
    )
    result = samat("submit", grid_file)
    assert result.exit_code == 0, result.output
    assert "(one task, 2 runs per task)" in result.output
    job = submitted_job(result.output)
    specs = expand(load_grid(grid_file))
    runs = [RunDir(spec.run_dir) for spec in specs]
    assert [run.state().job_id for run in runs] == [job, job]  # one task: no array index
    deadline = time.monotonic() + WAIT_S
    while not all(run.metrics() for run in runs):  # both are training, side by side
        assert time.monotonic() < deadline, tasks_of(job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
    assert set(wait_until_ended(job).values()) == {"COMPLETED"}

    monkeypatch.setenv("SAMAT_NUM_THREADS", "1")
    for spec, run in zip(specs, runs, strict=True):
        state = run.state()
        assert state.state == "done" and state.requeues == 1 and state.job_id == job
        log = run.file("log").read_text()
        assert "threads 1" in log
        stopped = re.findall(r"checkpointed at epoch (\d+) step (\d+)", log)
        assert len(stopped) == 1 and re.findall(r"resumed from epoch (\d+) step (\d+)", log) == (
            stopped
        )
        alone = prepare(dataclasses.replace(spec, run_dir=tmp_path / "alone" / spec.run_id))
        execute(alone.path)
        ours, theirs = weights(run), weights(alone)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_newline_in_the_account_is_a_config_error_and_nothing_reaches_the_cluster(
    tmp_path: Path,
) -> None:
    name = f"slurm-newline-{time.time_ns()}"
    grid_file = write_grid(
        tmp_path,
        name,
        ARRAY_BASE,
        slurm={"gpus_per_node": 0, "cpus_per_task": 1, "account": "proj\ntouch pwned #"},
    )
    done = subprocess.run(
        [sys.executable, "-m", "samat", "submit", str(grid_file)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "slurm.account" in lines[0] and "Traceback" not in lines[0], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()
    # accounting lags: a job submitted after samat's refusal is in it only once everything
    # submitted before it is (an event to wait for, not a guess at the lag)
    assert_nothing_accounted_before_a_marker(f"samat-{name}")


def assert_nothing_accounted_before_a_marker(name: str) -> None:
    marker = subprocess.run(
        ["sbatch", "--parsable", "-J", f"{name}-marker", "-o", "/dev/null", "--wrap", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    deadline = time.monotonic() + WAIT_S
    while not accounted_tasks(f"{name}-marker", marker):
        assert time.monotonic() < deadline, f"marker job {marker} never reached accounting"
        time.sleep(0.5)
    assert jobs_named(name) == [] and accounted_tasks(name) == []


def _example_base(name: str, root: Path) -> dict[str, Any]:
    """configs/examples/<name>'s base with its generated data under `root` (absolute)."""
    text = (Path(__file__).resolve().parents[1] / "configs" / "examples" / name).read_text()
    return yaml.safe_load(text.replace("data/generated/", f"{root}/"))["base"]


def test_segmentation_and_text_runs_go_through_the_same_array(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One grid, one array: a segmentation run and a text run (data generated in the real
    layouts by the tasks themselves), each equal bit for bit to the same run done locally."""
    seg = _example_base("segmentation_tiny.yaml", tmp_path / "data")
    seg["train"]["iterations"] = 12
    seg["data"]["generate"]["n_examples"] = 20
    seg["eval"].update(n_examples=4, attacks=seg["eval"]["attacks"][:1])
    text = _example_base("text_tiny.yaml", tmp_path / "data")
    text["train"]["epochs"] = 1
    text["data"]["generate"]["n_examples"] = 30
    text["eval"]["n_examples"] = 4
    for spec in text["eval"]["attacks"]:
        spec["options"] = {"pop_size": 4, "max_iters": 2}
    grid = {
        "name": "slurm-tasks",
        "output": str(tmp_path / "out"),
        "variants": [seg, text],
        "slurm": {"gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 10},
    }
    # a variant is a set of dotted overrides: flatten the two bases into them
    grid["variants"] = [_dotted(v) for v in grid["variants"]]
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid, sort_keys=False))
    result = samat("submit", grid_file, "--wait")
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"submitted SLURM job", result.output)) == 1  # one array
    monkeypatch.setenv("SAMAT_NUM_THREADS", "1")
    tasks = set()
    for spec in expand(load_grid(grid_file)):
        cluster = RunDir(spec.run_dir)
        assert cluster.state().state == "done", cluster.state()
        tasks.add(cluster.result()["task"])
        local = prepare(dataclasses.replace(spec, run_dir=tmp_path / "local" / spec.run_id))
        execute(local.path)
        ours, theirs = weights(cluster), weights(local)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), spec.label
        assert cluster.result()["robust"] == local.result()["robust"]
    assert tasks == {"segmentation", "text"}


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 1}} -> {"train.epochs": 1}, keeping lists and leaf mappings of
    attack specs whole (eval.attacks, data.generate stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in ("data.generate",):
            out.update(_dotted(value, f"{dotted}."))
        else:
            out[dotted] = [value] if isinstance(value, list) else value
    return out
