"""The library manifest: one SQLite database (WAL) listing every entry.

`backbones.generation` counts changes to a backbone's set of keys; indexes record the
generation they reflect, so a stale index is detected with one read.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "2"
# version 1 -> 2: key protocols (the `protocols` table and `entries.protocol`)
_MIGRATIONS = {"1": ("ALTER TABLE entries ADD COLUMN protocol TEXT",)}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS backbones (
    backbone TEXT PRIMARY KEY,
    d_model INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: index vectors are keyed by it
    id TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    backbone TEXT NOT NULL REFERENCES backbones (backbone),
    role TEXT NOT NULL CHECK (role IN ('key', 'value')),
    step INTEGER,
    score REAL,
    metric TEXT,
    init TEXT,
    seed INTEGER,
    length INTEGER NOT NULL,
    d_model INTEGER NOT NULL,
    created REAL NOT NULL,
    pair TEXT,
    extra TEXT NOT NULL,
    protocol TEXT  -- keys: id of the key protocol they were made by (NULL: none recorded)
);
CREATE TABLE IF NOT EXISTS protocols (
    id TEXT PRIMARY KEY,
    backbone TEXT NOT NULL,
    recipe TEXT NOT NULL,
    spec TEXT NOT NULL,  -- the KeyProtocol's canonical JSON
    is_default INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    UNIQUE (backbone, recipe)
);
CREATE INDEX IF NOT EXISTS entries_backbone_role ON entries (backbone, role, seq);
CREATE INDEX IF NOT EXISTS entries_task ON entries (task);
"""
_SCHEMA_NAMES = set(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", _SCHEMA))
FILTERS = ("task", "backbone", "role")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One stored prompt file, as listed in the manifest."""

    id: str
    task: str
    backbone: str
    role: str  # "key" (indexed, task embedding) or "value" (initialises a target prompt)
    step: int | None
    score: float | None
    metric: str | None
    init: str | None
    seed: int | None
    length: int
    d_model: int
    created: float  # unix time of the first publish
    sha256: str  # of the object file's bytes
    pair: str | None  # id of the matching value (for a key) or its first key (for a value)
    extra: dict[str, str]  # any other metadata of the prompt file
    protocol: str | None = None  # a key's protocol id (`library.protocol`); None: none recorded

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


COLUMNS = tuple(field.name for field in dataclasses.fields(Entry))
_SELECT = f"SELECT seq, {', '.join(COLUMNS)} FROM entries"


def row_entry(row: sqlite3.Row | tuple[Any, ...]) -> tuple[int, Entry]:
    """A `_SELECT` row -> (seq, Entry)."""
    values = dict(zip(COLUMNS, row[1:], strict=True))
    values["extra"] = json.loads(values["extra"])
    return row[0], Entry(**values)


class Manifest:
    """Thread-safe access to the manifest (one connection per thread)."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path, self.read_only = path, read_only
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if self._schema_current():
            return  # no write transaction: a read-only or full library opens as well
        if read_only:
            raise RuntimeError(f"{path}: a read-only manifest without schema {SCHEMA_VERSION}")
        with self.write() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO info VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
            version = conn.execute(
                "SELECT value FROM info WHERE name = 'schema_version'"
            ).fetchone()[0]
            if version in _MIGRATIONS:
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(
                    "UPDATE info SET value = ? WHERE name = 'schema_version'", (SCHEMA_VERSION,)
                )
                version = SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            raise RuntimeError(
                f"{path}: manifest schema version {version}, this code reads {SCHEMA_VERSION}"
            )

    def _schema_current(self) -> bool:
        """Whether every table and index of this code's schema exists, at its version."""
        with self.read() as conn:
            names = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
            if not _SCHEMA_NAMES <= names:
                return False
            row = conn.execute("SELECT value FROM info WHERE name = 'schema_version'").fetchone()
        return row is not None and row[0] == SCHEMA_VERSION

    def _connect_read_only(self) -> sqlite3.Connection:
        """A read-only connection; `immutable` if the WAL's shared memory cannot be opened
        (read-only media), which is safe because nothing can change the file there."""
        uri = self.path.resolve().as_uri()
        for query in ("mode=ro", "mode=ro&immutable=1"):
            conn = sqlite3.connect(
                f"{uri}?{query}",
                uri=True,
                timeout=60.0,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.OperationalError:
                conn.close()
        raise RuntimeError(f"{self.path.name}: cannot open the manifest read-only")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None and self.read_only:
            conn = self._local.conn = self._connect_read_only()
            with self._lock:
                self._all.append(conn)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: writers queue on SQLite's busy timeout)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")  # may fail too (a full disk): never leave it open
        except BaseException:
            if conn.in_transaction:  # SQLite already rolled back on some errors (a full disk)
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for the whole block."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


def where(filters: dict[str, str | None]) -> tuple[str, list[Any]]:
    """A WHERE clause for equality filters on FILTERS columns (None = no filter)."""
    unknown = set(filters) - set(FILTERS)
    if unknown:
        raise ValueError(f"unknown filters {sorted(unknown)}; use {FILTERS}")
    used = {name: value for name, value in filters.items() if value is not None}
    clause = " AND ".join(f"{name} = ?" for name in used)
    return (f" WHERE {clause}" if clause else ""), list(used.values())


def select(conn: sqlite3.Connection, suffix: str = "", params: Any = ()) -> list[tuple[int, Entry]]:
    """(seq, Entry) rows of `SELECT ... FROM entries <suffix>`."""
    return [row_entry(row) for row in conn.execute(_SELECT + suffix, params)]
