"""One lock per output directory, so that two `samat submit` (or cancel, eval) of one grid take
turns: the second waits, then finds the first one's runs queued and does not queue them again.

The lock is a POSIX record lock (`fcntl.lockf`, i.e. fcntl(F_SETLK) on the whole file) on
`<output>/.samat.lock`. It holds across the machines that share the directory over NFS: NFSv4
has byte-range locks in the protocol, NFSv3 goes through lockd/statd (NLM), and a client that
dies loses its locks when its lease ends (v4) or its statd reports the reboot (v3). Two things
do not hold it:

- `flock()`: on Linux before 2.6.12 it was local to the client on NFS, and a mount with
  `local_lock=flock` (or `all`) still makes it local; other kernels emulate it with fcntl locks.
- a mount with `nolock` (or `local_lock=posix`): every lock is then local to the machine.

POSIX locks belong to a process, not to a file descriptor: a second lock of the same file from
the same process succeeds at once, and closing any descriptor of the file drops the lock. So
this module opens the lock file once per process and counts nested holders; threads of one
process take turns on a threading lock first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from samat.config import ConfigError
from samat.files import open_no_follow

LOCK_FILE = ".samat.lock"
# Seconds between two tries while another process holds the lock.
POLL_S = 0.5


@dataclass
class _Held:
    fd: int
    count: int


_HELD: dict[str, _Held] = {}
_REGISTRY = threading.Lock()
_THREADS: dict[str, threading.RLock] = {}


def lock_path(output: Path) -> Path:
    return Path(output) / LOCK_FILE


def holder(output: Path) -> str:
    """Who holds (or last held) the lock, as it wrote itself into the file; '' if unknown."""
    try:
        return lock_path(output).read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def output_lock(
    output: Path,
    *,
    purpose: str,
    say: Callable[[str], None] | None = None,
    timeout_s: float | None = ...,  # type: ignore[assignment]
) -> Iterator[Path]:
    """Hold `<output>/.samat.lock` (creating the output directory) for the block.

    When another process holds it, `say` gets one line naming the holder, then this waits (Ctrl-C
    stops the waiting), by default up to WAIT_S (a holder that hangs gives one line naming it,
    not an endless wait; SAMAT_LOCK_WAIT_S sets it); then, or after timeout_s, a ConfigError.
    timeout_s None waits for ever.
    """
    if timeout_s is ...:
        timeout_s = _default_wait()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(output)
    with _REGISTRY:
        thread_lock = _THREADS.setdefault(key, threading.RLock())
    if not thread_lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
        raise ConfigError(_busy(output, timeout_s))
    try:
        held = _HELD.get(key)
        if held is not None:  # this process (this thread) holds it already
            held.count += 1
            try:
                yield lock_path(output)
            finally:
                held.count -= 1
            return
        fd = _acquire(output, purpose=purpose, say=say, timeout_s=timeout_s)
        _HELD[key] = _Held(fd, 1)
        try:
            yield lock_path(output)
        finally:
            del _HELD[key]
            os.close(fd)  # closing the descriptor releases the lock
    finally:
        thread_lock.release()


def _open_lock_file(path: Path) -> int:
    """The lock file, never through a link (one put there would make samat write the holder's
    name into the link's target): a link is removed and the file made anew. Writable by the
    group, as teammates sharing the output directory must take the lock too (a POSIX lock needs
    a descriptor open for writing); it holds only the holder's name, nothing samat runs."""
    return open_no_follow(path, os.O_RDWR | os.O_CREAT, 0o666)


def _acquire(
    output: Path, *, purpose: str, say: Callable[[str], None] | None, timeout_s: float | None
) -> int:
    path = lock_path(output)
    try:
        fd = _open_lock_file(path)
    except OSError as error:
        raise ConfigError(
            f"cannot open the lock file {path} ({error.strerror}); samat needs write access to "
            f"{output} to submit, cancel or evaluate its runs"
        ) from None
    try:
        began = time.monotonic()
        told = False
        while not _try_lock(fd):
            if not told and say is not None:
                who = holder(output) or "another process"
                say(f"waiting for the lock on {output} (held by {who}) ...")
                told = True
            if timeout_s is not None and time.monotonic() - began >= timeout_s:
                raise ConfigError(_busy(output, timeout_s))
            time.sleep(POLL_S)
        # who holds it, for the message of whoever waits next
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        text = f"samat {purpose}, pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if error.errno == errno.ENOLCK:
            raise ConfigError(
                "this file system refuses POSIX locks (ENOLCK: NFS mounted with nolock, or "
                "no lockd); put the grid's output on a file system with locking"
            ) from None
        raise
    return True


# how long a submit, eval or cancel waits for another's lock before it gives up in one line
WAIT_S = 3600.0


def _default_wait() -> float:
    value = os.environ.get("SAMAT_LOCK_WAIT_S", "")
    try:
        return float(value) if value else WAIT_S
    except ValueError:
        raise ConfigError(
            f"SAMAT_LOCK_WAIT_S={value!r} is not a number of seconds; unset it or fix it"
        ) from None


def _busy(output: Path, timeout_s: float | None) -> str:
    who = holder(output) or "another process"
    return (
        f"{output} is locked by {who} for more than {timeout_s:g} s; "
        "wait for it to finish, then try again"
    )
