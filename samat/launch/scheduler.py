"""What SLURM says: partitions, the array size limit, job states. Every query is bounded in time."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

# A scheduler command that takes longer than this is treated as unanswered, never waited on.
QUERY_TIMEOUT_S = 30
# SLURM's default MaxArraySize: array indices run from 0 to MaxArraySize - 1.
DEFAULT_MAX_ARRAY_SIZE = 1001
# Job states in which a task still has to run or is running (sacct and squeue spellings).
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "CONFIGURING",
        "COMPLETING",
        "RESIZING",
        "SUSPENDED",
        "STOPPED",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
    }
)


@dataclass(frozen=True)
class JobInfo:
    state: str
    elapsed: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def query(command: list[str], *, empty_if: str | None = None) -> str | None:
    """stdout of a scheduler command, or None when it is missing, fails or does not answer; ''
    when it fails saying `empty_if` (squeue -j of jobs the controller has forgotten)."""
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, check=True
        )
    except subprocess.CalledProcessError as error:
        return "" if empty_if and empty_if in (error.stderr or "") else None
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def has_sbatch() -> bool:
    return shutil.which("sbatch") is not None


def partitions() -> list[str] | None:
    """Partition names the cluster knows, or None when sinfo does not answer."""
    out = query(["sinfo", "-h", "-o", "%R"])
    return None if out is None else sorted(set(out.split()))


def max_array_size() -> int:
    """The cluster's MaxArraySize (`scontrol show config`), SLURM's default when unknown."""
    out = query(["scontrol", "show", "config"]) or ""
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, flags=re.MULTILINE)
    # MaxArraySize=0 disables arrays: each task then goes in an array of its own (a plain job).
    return max(1, int(match.group(1))) if match else DEFAULT_MAX_ARRAY_SIZE


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """`sacct -X -n -P -o JobID,State,Elapsed` lines as {'123_4': JobInfo}, ranges expanded."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 2 or not fields[0] or "." in fields[0]:
            continue
        # 'CANCELLED by 0' -> 'CANCELLED'
        info = JobInfo(
            fields[1].split()[0] if fields[1].strip() else "UNKNOWN",
            fields[2] if len(fields) > 2 else "",
        )
        for parts in _job_id_parts(fields[0]):
            if len(parts) == 1:
                jobs[parts[0]] = info
                continue
            for index in range(int(parts[1]), int(parts[-1]) + 1):
                jobs[f"{parts[0]}_{index}"] = info
    return jobs


def _job_id_parts(job_id: str) -> list[tuple[str, ...]]:
    try:
        from submitit.slurm.slurm import read_job_id  # only for array ranges ('12_[0-3]')

        return read_job_id(job_id)
    except ValueError:  # a heterogeneous job ('12+0') or another form samat never submits
        return []


def job_states(
    job_ids: Iterable[str], *, need_controller: bool = False
) -> dict[str, JobInfo] | None:
    """What the scheduler knows of these jobs ('123' or '123_4'); None when SLURM does not answer.

    sacct gives finished jobs too (while accounting remembers them); squeue's answer wins for jobs
    still queued or running, since it is the controller's own view. need_controller: None unless
    squeue answered, since with slurmctld down accounting (slurmdbd) still reports the last state
    it saw, e.g. RUNNING for a task that has ended since.
    """
    bases = {job_id.split("_")[0] for job_id in job_ids if is_slurm_id(job_id)}
    if not bases:
        return {}
    known: dict[str, JobInfo] = {}
    ids = ",".join(sorted(bases))
    # whoever submitted them: a teammate's job that holds a run of a shared output directory
    # is that run's job (sacct shows only one's own jobs without --allusers)
    sacct = query(["sacct", "-X", "-n", "-P", "--allusers", "-o", "JobID,State,Elapsed", "-j", ids])
    if sacct is not None:
        known.update(parse_sacct(sacct))
    squeue = query(
        ["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T|%M"],
        empty_if="Invalid job id specified",  # none of them is queued or running any more
    )
    for job_id, info in parse_sacct(squeue or "").items():
        if job_id.split("_")[0] in bases:
            # sacct's elapsed time reads like the rest of the table ('00:01:02', not '1:02')
            known[job_id] = JobInfo(
                info.state, known[job_id].elapsed if job_id in known else info.elapsed
            )
    if squeue is None and (need_controller or sacct is None):
        return None
    return known


def is_slurm_id(job_id: str) -> bool:
    return re.fullmatch(r"\d+(_\d+)?", job_id) is not None


def array_id(job_id: str) -> str:
    """'123' for '123_4' (an array task) and for '123'."""
    return job_id.split("_")[0]


def jobs_named(name: str) -> list[tuple[str, str]] | None:
    """(array job id, batch script path) of this user's queued or running jobs named `name`;
    None when squeue does not answer. %F, the array's id: %A is each running task's own id."""
    return _named(name, "%o")


def job_comments(name: str) -> list[tuple[str, str]] | None:
    """(array job id, SLURM comment) of this user's queued or running jobs named `name`; None
    when squeue does not answer."""
    return _named(name, "%k")


def _named(name: str, field: str) -> list[tuple[str, str]] | None:
    out = query(["squeue", "-h", "--me", f"--name={name}", "-o", f"%F|{field}"])
    if out is None:
        return None
    jobs = []
    for line in out.splitlines():
        job_id, _, value = line.strip().partition("|")
        if is_slurm_id(job_id):
            jobs.append((job_id, value))
    return sorted(set(jobs))


def scancel(job_ids: Iterable[str]) -> str | None:
    """Cancel jobs ('123' a whole array, '123_4' one task): None when done, else scancel's first
    line of complaint. Jobs that have already ended are not a complaint."""
    ids = sorted(set(job_ids))
    if not ids:
        return None
    try:
        done = subprocess.run(
            ["scancel", *ids], capture_output=True, text=True, timeout=QUERY_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"scancel did not run ({type(error).__name__}: {error})"
    if done.returncode == 0:
        return None
    lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
    # a job that ended (or was purged) since it was looked at is not a failure to cancel
    ended = ("already completing or completed", "invalid job id")
    real = [ln for ln in lines if not any(mark in ln.lower() for mark in ended)]
    if lines and not real:
        return None
    return real[0] if real else f"scancel exited with status {done.returncode}"
