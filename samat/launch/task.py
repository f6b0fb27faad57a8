"""One run as a submitit task, in-process or in a container; requeued on the time-limit signal.

On the time-limit (or preemption) signal the run is not cut mid-step: the signal sets a flag,
training checkpoints at the next step boundary (evaluation stores the batch in progress), and
only then does submitit's handler requeue the task. The next attempt resumes from there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from submitit import JobEnvironment
from submitit.helpers import Checkpointable, DelayedSubmission

from samat import claim
from samat.launch import container
from samat.store import LOG, RunDir

log = logging.getLogger("samat")

# How long a container child may take to reach a step boundary and exit after a forwarded
# time-limit signal before submitit requeues the job (requeueing kills what is left).
CHILD_GRACE_S = 60
# Exit status of `samat run` when a signal stopped it after storing its progress.
EXIT_INTERRUPTED = 3
# How long the docker/podman stop command may take inside a signal handler.
STOP_TIMEOUT_S = 30
# How long a signalled container client may take to exit when the task ends (Ctrl-C) before it
# is killed.
CHILD_EXIT_S = 5
# Local runs: the file a `samat submit` holds an flock on while its runs go on (see
# watch_session), and how often a run looks.
SESSION_ENV = "SAMAT_LOCAL_SESSION"
SESSION_POLL_S = 1.0


def time_limit_signal() -> int:
    return getattr(signal, f"SIG{JobEnvironment.USR_SIG}")


def own_job_id() -> str | None:
    """The SLURM job id of this task, only when submitit's SLURM executor started it: a local run
    inside an salloc allocation must not claim the allocation's id."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    from samat.train import slurm_job_id

    return slurm_job_id()


class RunTask(Checkpointable):
    """Bring one run directory up to date; on the time-limit / preemption signal, requeue itself.

    Without a container the run executes in submitit's own process. With one, `container` is the
    full argv (e.g. `apptainer exec ... samat run RUN_DIR`) and runs as a child, so that submitit's
    process stays on the host, where `scontrol requeue` works.
    """

    def __init__(
        self, run_dir: Path, container: list[str] | None = None, stop: list[str] | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.container = container
        # docker/podman: the container runs under the engine, outside the job's processes, so
        # `scancel`'s SIGTERM to our child (the client) does not reach it; stop it by name instead
        self.stop = stop
        # Set by checkpoint(): the next call is a requeued one and is counted in state.json.
        self.requeued = False

    def __call__(self) -> dict[str, Any] | None:
        run = RunDir(self.run_dir)
        who = claim.holder(run.path)
        if who is not None:  # another live process has it: touch nothing of the run
            raise claim.RunClaimed(
                f"run {run.run_id} is being trained or evaluated by {who}; not started twice"
            )
        if self.requeued:
            run.mark_requeued()
            self.requeued = False
        with watch_session(os.environ.get(SESSION_ENV)):
            if self.container is None:
                return self._run_here()
            return self._run_container(run, self.container)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Resubmit this task; it resumes from checkpoint.safetensors, not from a pickled model."""
        self.requeued = True
        return DelayedSubmission(self, *args, **kwargs)

    def _run_here(self) -> dict[str, Any] | None:
        from samat.evaluate import Interrupted, StopFlag
        from samat.train import execute

        flag = StopFlag()
        # the time limit (USR2) and SIGTERM (preemption, scancel) alike: training stops at the
        # next step boundary with its progress stored, then the signal's own handler runs
        signals = (time_limit_signal(), signal.SIGTERM)
        previous = {signum: signal.signal(signum, flag.set) for signum in signals}
        try:
            return execute(self.run_dir, job_id=own_job_id(), stop=flag)
        except Interrupted as stopped:
            # progress is on disk: now submitit's own handler checkpoints and requeues (USR2),
            # or ends the task (SIGTERM)
            signum = stopped.signum if stopped.signum in previous else signals[0]
            _call(previous[signum], signum)
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run_container(self, run: RunDir, argv: list[str]) -> dict[str, Any] | None:
        job_id = own_job_id()
        if job_id is not None:
            run.mark_submitted(job_id)
        # the argv was built on the submitting node: give the container this job's own GPUs
        argv = container.bind_job_gpus(argv, os.environ)
        child = _start(run, argv)
        (code,) = _supervise([child], _stopper([self.stop]))
        if code != 0:
            raise RuntimeError(
                f"container command exited with status {code}; see {run.file(LOG)} and the job log"
            )
        return run.result()

    def __repr__(self) -> str:
        return f"RunTask({str(self.run_dir)!r})"


@contextlib.contextmanager
def watch_session(session: str | None) -> Any:
    """A local run stops as on SIGTERM (progress stored at the next step boundary, claim
    released) once the `samat submit` that started it is gone, however it went (kill -9
    included): submitit's local controller outlives its submitter, and a run left training
    would hold its claim, with nobody to report it, until it ended.

    The submit holds an flock on `session` while it lives; the kernel drops it with the
    process. A thread here looks every SESSION_POLL_S: a lock it can take means nobody holds
    it any more. Outside a local submit (SLURM, `samat run`) there is no session to watch.
    """
    if not session:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(SESSION_POLL_S):
            if not _held(session):
                log.warning("the samat submit that started this run is gone: stopping it")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    watcher = threading.Thread(target=watch, name="samat-session", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _held(session: str) -> bool:
    """Whether a live process holds the flock on the session file (a missing file: nobody)."""
    import fcntl

    try:
        fd = os.open(session, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True  # no locks on this file system: nothing to learn, keep running
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def hold_session(folder: Path) -> Any:
    """The submit's side of watch_session: an flock held for the block, its path in the
    environment the local runs inherit."""
    import fcntl

    from samat.files import open_no_follow

    path = Path(folder) / f"session-{os.getpid()}.lock"
    fd = open_no_follow(path, os.O_RDWR | os.O_CREAT, 0o600)
    previous = os.environ.get(SESSION_ENV)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.environ[SESSION_ENV] = str(path)
        yield
    finally:
        if previous is None:
            os.environ.pop(SESSION_ENV, None)
        else:
            os.environ[SESSION_ENV] = previous
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


class PackedTask(Checkpointable):
    """Several runs side by side in one array task (`slurm.runs_per_task`), sharing its GPUs and
    splitting its CPUs: each run is a child process of its own (`samat run RUN_DIR`, or its
    container command) with its own checkpoint, requeue count and result.

    The time-limit signal goes to every child; each stores its progress at its next step
    boundary, then the task requeues and the next attempt starts the runs not yet complete.
    """

    def __init__(self, members: list[RunTask]) -> None:
        self.members = members
        self.requeued = False

    @property
    def run_dirs(self) -> list[Path]:
        return [member.run_dir for member in self.members]

    def __call__(self) -> list[dict[str, Any] | None]:
        runs = [RunDir(member.run_dir) for member in self.members]
        todo = [
            (run, m) for run, m in zip(runs, self.members, strict=True) if not run.is_complete()
        ]
        if self.requeued:
            for run, _ in todo:
                run.mark_requeued()
            self.requeued = False
        job_id = own_job_id()
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "") or os.cpu_count() or 1)
        env = {**os.environ, "SAMAT_NUM_THREADS": str(max(1, cpus // max(1, len(todo))))}
        children: list[tuple[RunDir, subprocess.Popen[bytes]]] = []
        stop = _stopper([member.stop for _, member in todo])
        try:
            for run, member in todo:
                if job_id is not None:
                    run.mark_submitted(job_id)
                if member.container is not None:
                    argv = container.bind_job_gpus(member.container, os.environ)
                else:
                    argv = [sys.executable, "-m", "samat", "run", str(member.run_dir)]
                children.append((run, _start(run, argv, env=env)))
        except BaseException:
            for _, child in children:  # a run that could not start: the others do not run alone
                child.kill()
                child.wait()
            stop()
            raise
        codes = _supervise([child for _, child in children], stop)
        failed = [run for (run, _), code in zip(children, codes, strict=True) if code != 0]
        if failed:
            names = ", ".join(run.run_id for run in failed)
            raise RuntimeError(
                f"{len(failed)} of {len(children)} packed runs failed ({names}); see their logs"
            )
        return [run.result() for run in runs]

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Resubmit the pack; each run resumes from its own checkpoint."""
        self.requeued = True
        return DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"PackedTask({[str(d) for d in self.run_dirs]!r})"


def _stopper(commands: list[list[str] | None]) -> Callable[[], None]:
    """A function that runs each docker/podman stop command once; a failing (missing, hanging,
    refusing) one is logged and never escapes, since it runs inside a signal handler."""
    done = False

    def stop() -> None:
        nonlocal done
        if done:
            return
        done = True
        for command in commands:
            if not command:
                continue
            try:
                subprocess.run(command, check=False, timeout=STOP_TIMEOUT_S, capture_output=True)
            except Exception as error:  # logged: the run ends either way
                log.warning("could not stop the container (%s): %s", command[0], error)

    return stop


def _supervise(children: list[subprocess.Popen[bytes]], stop: Callable[[], None]) -> list[int]:
    """Wait for the children and return their exit statuses, in order.

    SIGTERM, SIGINT and the time-limit signal go on to every child that still runs. SIGTERM and
    SIGINT (scancel, Ctrl-C, `samat cancel`) also stop the containers, which docker/podman run
    outside the job's processes. On the time-limit signal each child gets CHILD_GRACE_S to store
    its progress and exit. Then submitit's own handler runs: checkpoint() and `scontrol requeue`
    on the time limit, KeyboardInterrupt on SIGINT. A child still running when this returns or
    raises is killed, and the containers stopped.
    """
    limit = time_limit_signal()
    signalled = False

    def forward(signum: int, frame: types.FrameType | None) -> None:
        nonlocal signalled
        signalled = True
        for child in children:
            if child.poll() is None:
                with contextlib.suppress(OSError):
                    child.send_signal(signum)
        if signum in (signal.SIGTERM, signal.SIGINT):
            stop()
        if signum == limit:
            for child in children:
                try:
                    child.wait(CHILD_GRACE_S)
                except subprocess.TimeoutExpired:
                    child.kill()
        _call(handlers[signum], signum, frame)

    signals = (signal.SIGTERM, signal.SIGINT, limit)
    handlers = {sig: signal.signal(sig, forward) for sig in signals}
    codes = []
    try:
        for child in children:
            # with a timeout, wait() polls from Python: a signal that reached another thread is
            # then handled at once rather than when the child happens to exit
            code = None
            while code is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = child.wait(timeout=3600)
            codes.append(code)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for child in children:
            if child.poll() is None:
                # a signalled child gets a moment to store its progress before it is killed
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(CHILD_EXIT_S if signalled else 0)
            if child.poll() is None:
                child.kill()
                child.wait()
                stop()
    return codes


def _start(
    run: RunDir, argv: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start the container's runtime (or samat); a runtime this node lacks fails the run (an
    infrastructure failure: another node may have it), with the reason in state.json."""
    host = socket.gethostname()
    reason = None
    if shutil.which(argv[0]) is None:
        reason = f"container runtime {argv[0]!r} not found on {host}"
    else:
        try:
            return subprocess.Popen(argv, env=env)
        except OSError as error:
            reason = f"container runtime {argv[0]!r} did not start on {host} ({error.strerror})"
    message = f"{reason}; install it on the compute nodes or set container.executable"
    run.mark_failed(message, deterministic=False)
    raise RuntimeError(message)


def _call(handler: Callable[..., Any] | int | None, signum: int, frame: Any = None) -> None:
    if callable(handler):
        handler(signum, frame)
