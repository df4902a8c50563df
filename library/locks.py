"""Advisory inter-process locks (POSIX flock): released by the kernel if the holder dies."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold a shared or exclusive lock on `path` (created if absent) for the block.

    Each call opens its own descriptor, so threads of one process exclude each other too.
    Never nest two locks on the same file in one thread: that can deadlock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
