"""One writer at a time: an exclusive lock on an output for the length of a run.

The lock is ``fcntl.flock`` on a sidecar file (``.NAME.lock`` beside an output file, ``.lock`` inside an
output folder), not on the output itself: ``.json`` outputs and manifests are replaced atomically, which
would leave a lock on the old file. The kernel drops the lock when the process ends, however it ends, so a
killed run never blocks the next one. Where ``fcntl`` does not exist (Windows) nothing is locked.

One file can have many names: a symbolic link, a hard link. :func:`output` locks what a path names, not the name:
the sidecar lives beside the file the path resolves to (symbolic links followed), and the file itself, when it
exists, is locked too (``flock`` on its inode), which a run through a hard link takes as well.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import LockedError, OutputError, os_reason
from .names import display

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def sidecar(path: str | Path) -> Path:
    """The lock file of an output file: ``.NAME.lock`` beside the file ``path`` resolves to (hidden, never taken
    as input), so a symbolic link and its target share one lock."""
    real = Path(os.path.realpath(path))
    return real.with_name(f".{real.name}.lock")


@contextlib.contextmanager
def output(path: str | Path) -> Iterator[None]:
    """Hold the one-writer lock of output file ``path`` for the block: its :func:`sidecar`, and the file's own
    inode when it exists (another name for it, a hard link, has another sidecar but the same inode)."""
    with exclusive(sidecar(path), str(path)):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # not there yet (no other name can point at it), unreadable: the sidecar lock holds
            fd = -1
        try:
            if fd >= 0 and fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise LockedError(f"{display(str(path))} is being written by another capcli run through another "
                                      "name (a hard link to the same file); wait for it to finish or write "
                                      "elsewhere") from None
            yield
        finally:
            if fd >= 0:
                os.close(fd)


@contextlib.contextmanager
def exclusive(lock: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on file ``lock`` for the block, or raise :class:`LockedError` at once naming ``what``
    (:class:`OutputError` when the lock file cannot be made: a read-only folder, a full disk).

    The lock file is removed at the end (still locked). A run that opened it just before that removal would
    hold a lock on a file no longer there, so after locking the file is checked to still be at its path.
    """
    lock = Path(lock)
    if fcntl is None:
        yield
        return
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write {display(what)}: {os_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockedError(f"{display(what)} is being written by another capcli run{holder}; wait for it to "
                              "finish or write elsewhere") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # removed by the run that held it: lock the new one
    with contextlib.suppress(OSError):  # the holder's pid, for the message of the next run (a full disk may refuse)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (pid {pid})"
    return ""
