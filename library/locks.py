"""Advisory inter-process locks (POSIX flock): released by the kernel if the holder dies.

flock alone lets a steady stream of shared holders starve an exclusive waiter, so every lock
has a gate file beside it (`<name>.gate`): an exclusive locker holds the gate while it waits,
and a shared locker passes through the gate (takes and drops it) before it locks. New shared
holders thus queue behind a waiting exclusive one, which only waits for those already inside.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from library.errors import LibraryError

_POLL = (0.001, 0.05)  # first and largest sleep between tries when a timeout is given
# errors of creating a lock file that leave opening an existing one (or going without) to try
_NO_CREATE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOENT)


class LockTimeout(LibraryError):
    """A lock was not granted within its timeout (the library is busy: retry later)."""


def _open(path: Path) -> int | None:
    """A descriptor on `path` (created if absent); None if it is absent and cannot be created.

    flock works on read-only descriptors, so a read-only or full file system still locks files
    that exist; a lock file that cannot be made there (nor in a missing folder) has no holder
    to exclude either.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if err.errno not in _NO_CREATE:
            raise
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def _flock(fd: int, operation: int, deadline: float | None, path: Path) -> None:
    """flock `fd`, blocking until granted or, with a deadline, until it passes (LockTimeout)."""
    if deadline is None:
        fcntl.flock(fd, operation)
        return
    pause = _POLL[0]
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"{path.name}: not granted in time (library busy); retry later"
                ) from None
        time.sleep(pause)
        pause = min(pause * 2, _POLL[1])


@contextmanager
def _held(path: Path, operation: int, deadline: float | None) -> Iterator[None]:
    fd = _open(path)
    try:
        if fd is not None:
            _flock(fd, operation, deadline, path)
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def file_lock(path: Path, *, shared: bool = False, timeout: float | None = None) -> Iterator[None]:
    """Hold a shared or exclusive lock on `path` (created if absent) for the block.

    Fair: an exclusive locker waits only for holders that came before it (see the module
    docstring). With `timeout` (seconds), raises LockTimeout instead of waiting longer.
    Each call opens its own descriptors, so threads of one process exclude each other too.
    Never nest two locks on the same file in one thread: that can deadlock.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    gate = path.with_name(f"{path.name}.gate")
    with contextlib.ExitStack() as stack:
        with _held(gate, fcntl.LOCK_EX, deadline):
            stack.enter_context(_held(path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, deadline))
        yield
