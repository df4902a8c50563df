"""Library locks are fair and bounded; opening a library writes nothing (issue 26)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from library import Library, LibraryError
from library.locks import LockTimeout, file_lock


def test_exclusive_lock_is_not_starved_by_overlapping_shared_holders(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    stop = threading.Event()
    inside = threading.Barrier(3)

    def reader(offset: float) -> None:
        time.sleep(offset)
        with file_lock(lock, shared=True):
            inside.wait(5)
        while not stop.is_set():  # back-to-back holds: some reader always holds the lock
            with file_lock(lock, shared=True):
                time.sleep(0.05)

    readers = [threading.Thread(target=reader, args=(d,)) for d in (0.0, 0.025)]
    for thread in readers:
        thread.start()
    inside.wait(5)
    start = time.monotonic()
    try:
        with file_lock(lock, timeout=10):  # plain flock waits until the readers stop
            waited = time.monotonic() - start
    finally:
        stop.set()
        for thread in readers:
            thread.join(10)
    assert waited < 2.0


def test_lock_timeout(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with file_lock(lock, shared=True):
        start = time.monotonic()
        with pytest.raises(LockTimeout, match="retry later"), file_lock(lock, timeout=0.2):
            pass
        assert time.monotonic() - start >= 0.2
        with file_lock(lock, shared=True, timeout=0.2):  # shared holders still share
            pass


def test_opening_a_library_writes_nothing(tmp_path: Path) -> None:
    """A writer holding SQLite's write lock does not delay opening (it used to wait 60 s)."""
    root = tmp_path / "lib"
    rng = np.random.default_rng(0)
    with Library(root) as lib:
        key = lib.publish(rng.normal(size=(4, 8)), None, {"task": "t", "backbone": "bb"}).key
    writer = sqlite3.connect(root / "manifest.sqlite", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    opened: list[Library] = []
    thread = threading.Thread(target=lambda: opened.append(Library(root)))
    thread.start()
    thread.join(10)
    writer.execute("ROLLBACK")
    writer.close()
    assert opened and opened[0].get(key).task == "t"
    opened[0].close()


def test_read_only_library(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    with pytest.raises(LibraryError, match="not a prompt library"):
        Library(root, read_only=True)
    assert not root.exists()
    rng = np.random.default_rng(1)
    with Library(root) as lib:
        query = rng.normal(size=(4, 8))
        key = lib.publish(query, None, {"task": "t", "backbone": "bb"}).key
    manifest = (root / "manifest.sqlite").read_bytes()
    files = sorted(root.rglob("*.safetensors"))
    with Library(root, read_only=True) as lib:
        assert [m.entry.id for m in lib.query(query, "bb", k=1)] == [key]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            lib.publish(rng.normal(size=(4, 8)), None, {"task": "u", "backbone": "bb"})
    assert (root / "manifest.sqlite").read_bytes() == manifest
    assert sorted(root.rglob("*.safetensors")) == files  # the index was kept in memory
