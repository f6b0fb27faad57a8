"""A run's claim: the one process that trains or evaluates a run directory holds it.

The claim is an flock(2) on `<run>/.claim`, taken without waiting by `train.execute` for as long
as it brings the run up to date, with the holder's host, pid and job id written inside for the
message of whoever finds it taken. The kernel (or NFS's lock manager) drops it when the holder
exits, however it exits (kill -9 included), so a claim is taken over exactly when its holder is
provably gone, with no timeout to guess. flock, not a POSIX lock: another descriptor of the same
file closed in the holding process (a status check of the same run) does not drop it.

torch-free: status, plan and submit ask `holder()` of every run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from samat.errors import ConfigError
from samat.files import open_no_follow

CLAIM_FILE = ".claim"


class RunClaimed(ConfigError):
    """The run is being trained or evaluated by another live process: not started twice."""


def _open(path: Path) -> tuple[int, bool]:
    """The claim file's descriptor, and whether the holder's name can be written into it.
    Writable by the group (a teammate's task must be able to take a shared run's claim; the
    file only names the holder); never through a link (a link is replaced). A claim file this
    user may not write (made by another account, a container's user) still takes the flock,
    which needs no write access."""
    try:
        return open_no_follow(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)), False


def _try_lock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise ConfigError(
                f"{path}: this file system does not support locks ({error.strerror}); put the "
                "output directory on one that does (Lustre: mount with -o flock)"
            ) from None
        raise
    return True


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return "another process"
    if not isinstance(info, dict):
        return "another process"
    job = f", job {info['job_id']}" if info.get("job_id") else ""
    since = info.get("since")
    when = (
        time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
        if isinstance(since, int | float)
        else ""
    )
    return f"pid {info.get('pid')} on {info.get('host')}{job}{when}"


@contextlib.contextmanager
def claim(run_dir: Path, job_id: str | None = None) -> Iterator[None]:
    """Hold the run's claim for the block; RunClaimed (one line, naming the holder) when a live
    process holds it."""
    path = Path(run_dir) / CLAIM_FILE
    fd, writable = _open(path)
    try:
        if not _try_lock(fd, path):
            raise RunClaimed(
                f"run {Path(run_dir).name} is being trained or evaluated by {_describe(path)}; "
                "it is not started twice (samat status shows it; samat cancel stops it)"
            )
        holder_info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": job_id,
            "since": time.time(),
        }
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_info).encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def holder(run_dir: Path) -> str | None:
    """Who holds the run's claim ('pid 12 on node3, job 42_1 since ...'), or None when nobody
    does (or the run has no claim file yet)."""
    path = Path(run_dir) / CLAIM_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if _try_lock(fd, path):
            return None
        return _describe(path)
    except ConfigError:
        return None  # no locks here: nobody can hold one
    finally:
        os.close(fd)


def is_claimed(run_dir: Path) -> bool:
    return holder(run_dir) is not None
