"""One run as a submitit task, in-process or in a container; requeued on the time-limit signal."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import types
from pathlib import Path
from typing import Any

from submitit import JobEnvironment
from submitit.helpers import Checkpointable, DelayedSubmission

from samat.store import LOG, RunDir

# How long a container child may take to exit after a forwarded time-limit signal before submitit
# requeues the job (requeueing kills what is left); the last epoch's checkpoint is already on disk.
CHILD_GRACE_S = 20


class RunTask(Checkpointable):
    """Run or resume one run directory; on the time-limit / preemption signal, requeue itself.

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
        if self.requeued:
            run.update_state(requeues=run.state()["requeues"] + 1)
            self.requeued = False
        if self.container is None:
            from samat.train import execute

            return execute(self.run_dir)
        return self._run_container(run, self.container)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Resubmit this task; it resumes from checkpoint.safetensors, not from a pickled model."""
        self.requeued = True
        return DelayedSubmission(self, *args, **kwargs)

    def _run_container(self, run: RunDir, argv: list[str]) -> dict[str, Any] | None:
        child = subprocess.Popen(argv)
        time_limit = getattr(signal, f"SIG{JobEnvironment.USR_SIG}")

        def forward(signum: int, frame: types.FrameType | None) -> None:
            if child.poll() is None:
                child.send_signal(signum)
            if signum == signal.SIGTERM and self.stop:
                subprocess.run(self.stop, check=False, timeout=30, capture_output=True)
            if signum == time_limit:
                try:
                    child.wait(CHILD_GRACE_S)
                except subprocess.TimeoutExpired:
                    child.kill()
            # then submitit's own handler: checkpoint() and `scontrol requeue` on the time limit
            previous = handlers[signum]
            if callable(previous):
                previous(signum, frame)

        handlers = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, time_limit)}
        try:
            # with a timeout, wait() polls from Python: a signal that reached another thread is
            # then handled at once rather than when the child happens to exit
            code = None
            while code is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = child.wait(timeout=3600)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if child.poll() is None:
                child.kill()
                child.wait()
        if code != 0:
            raise RuntimeError(
                f"container command exited with status {code}; see {run.file(LOG)} and the job log"
            )
        return run.result()

    def __repr__(self) -> str:
        return f"RunTask({str(self.run_dir)!r})"
