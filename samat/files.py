"""samat's one way to write a file: atomically (temp file, fsync, rename, fsync of the folder)
or appended, never through a link, with one mode policy (readable by the group, never writable
by it). A leaf module: the data loaders' caches use it as the run directory's files do."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_file(path: Path, mode: int = 0o644) -> tuple[int, str]:
    """A new file `.name.XXXXXXXXXXXX.tmp` beside path, open for writing: 0644 less the umask,
    readable by the group (no mkstemp 0600) and never writable by it, whatever the umask (a
    teammate replaces a run's file by renaming a new one over it, which needs only the
    directory's write bit)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(path.parent, f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name beside {path}")


def open_append(path: Path) -> Any:
    """`path` open for appending text, never through a link: a symbolic link put where a run's
    log or the journal should be (by a teammate with write access to a shared output directory)
    is removed and a new file made in its place, so nothing samat writes lands in the link's
    target. Created 0644 less the umask: readable by the group, never writable by it."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        fd = open_no_follow(path, flags, 0o644)
    except PermissionError:
        # a teammate's file (group-readable, not writable): replaced by our own copy of it
        write_atomic(path, Path(path).read_bytes())
        fd = open_no_follow(path, flags, 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def open_no_follow(path: Path, flags: int, mode: int) -> int:
    """os.open that never follows a link in place of `path`: the link itself is removed (its
    target untouched) and a new file made. flags should hold O_CREAT."""
    flags |= os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, mode)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        os.unlink(path)
        return os.open(path, flags | os.O_EXCL, mode)


def fsync_dir(path: Path) -> None:
    # a rename is durable only once the directory entry is: matters on NFS and after power loss
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(
    path: Path, *, sync: bool = True, mode: int = 0o644, make_parent: bool = True
) -> Any:
    """samat's one atomic writer: the block writes a temp file beside `path` (its name is
    yielded; a library may write it by name), which is then fsynced and renamed over `path`,
    and the folder fsynced. An exception leaves `path` as it was and no temp file. Created
    `mode` less the umask: by default readable by the group, never writable by it."""
    path = Path(path)
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path, mode)
    os.close(fd)
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, *, sync: bool = True, mode: int = 0o644) -> None:
    """`data` written to `path` through atomic_file."""
    with atomic_file(path, sync=sync, mode=mode) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
