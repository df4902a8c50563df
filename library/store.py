"""A prompt library: a directory with a manifest, content-addressed prompt files and key indexes.

    manifest.sqlite                                 entries (`library.manifest`), SQLite WAL
    objects/<sha[:2]>/<sha256>.safetensors          prompt files named by the sha256 of their bytes
                                                    (entries and key protocols' start prompts)
    indexes/<backbone hash>/<protocol>.<metric>.<kind>.safetensors
                                                    derived FAISS indexes of the keys of one key
                                                    protocol (`none`: keys that record none)
    lock                                            flock: shared to publish or read objects,
                                                    exclusive to delete or sweep

Publishing holds the shared lock, inserts the entries and writes their object files inside one
SQLite transaction, and commits last: a killed publisher leaves the entries absent and at most
unreferenced object files, which `verify()` sweeps under the exclusive lock (so never a file an
in-flight publish is about to commit). Indexes are refreshed when read: a query whose index is
behind the manifest's per-backbone generation adds the new keys (or rebuilds after deletes)
under a per-index lock, and the file is rewritten once it lags by 10% or after a rebuild.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from library.atomic import TEMP_PREFIX, atomic_write, fsync_dir
from library.errors import EntryNotFound, LibraryCorrupt, LibraryError
from library.index import KINDS, IndexKind, KeyIndex
from library.key_indexes import NO_PROTOCOL, KeyIndexes
from library.locks import file_lock
from library.manifest import Entry, Manifest, select, where
from library.objects import (  # noqa: F401 - as_prompt is re-exported
    PromptLike,
    _entry_params,
    _Object,
    _prepare,
    _sha256,
    as_prompt,
)
from library.prompt_file import Metadata, check_prompt, decode_prompt, metadata_strings
from library.protocol import KeyProtocol
from library.protocols_store import Protocols
from library.similarity import DEFAULT_METRIC, check_metric, pool

MANIFEST = "manifest.sqlite"
ID_LENGTH = 16  # hex digits of the file's sha256 used as entry id
MAX_LIST = 10_000
DELETE_LOCK_TIMEOUT = 10.0  # seconds a delete waits for the publishers already inside
LOG = logging.getLogger(__name__)


class NoProtocolWarning(UserWarning):
    """A query searched keys that record no key protocol (a library from before protocols)."""


class Published(NamedTuple):
    """Ids of one published source: its key and (optionally) its value."""

    key: str
    value: str | None


class Match(NamedTuple):
    """One query result: a key entry (its `pair` is the value's id) and its similarity."""

    entry: Entry
    similarity: float


@dataclasses.dataclass
class VerifyReport:
    """What `Library.verify` found. Orphans and stale indexes are harmless and repairable."""

    entries: int
    missing: list[str]  # entry ids whose object file is absent
    corrupt: list[str]  # entry ids whose object file's sha256 differs from the manifest
    broken_pairs: list[str]  # entry ids whose `pair` names no entry
    orphans: list[
        str
    ]  # files under objects/ and indexes/ nothing references (swept when repairing)
    stale_indexes: list[str]  # index files behind the manifest (refreshed when repairing)
    repaired: bool

    @property
    def ok(self) -> bool:
        """No entry is missing or damaged."""
        return not (self.missing or self.corrupt or self.broken_pairs)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}



class Library(Protocols, KeyIndexes):
    """A directory of published soft prompts with similarity search over their keys.

    Safe for many threads and processes at once. `index_kind` is "flat" (exact), "hnsw" or
    "ivf" (approximate, for large libraries; IVF builds much faster and can remove keys in
    place); each kind keeps its own index files.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        index_kind: IndexKind = "flat",
        create: bool = True,
        read_only: bool = False,
    ) -> None:
        if index_kind not in KINDS:
            raise LibraryError(f"unknown index kind {index_kind!r}; choose one of {KINDS}")
        self.root = Path(root)
        self.index_kind: IndexKind = index_kind
        self.read_only = read_only  # nothing is written; indexes are kept in memory only
        if not (self.root / MANIFEST).exists() and (read_only or not create):
            raise LibraryError(f"{self.root} is not a prompt library (no {MANIFEST})")
        for folder in () if read_only else ("objects", "indexes"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / "lock"
        self._manifest = Manifest(self.root / MANIFEST, read_only=read_only)
        # (backbone, metric, kind) -> (index, how many of its vectors the index file holds)
        self._cache: dict[tuple[str, str, str], tuple[KeyIndex, int]] = {}

    def close(self) -> None:
        """Close this thread's and every other thread's manifest connections."""
        self._manifest.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------------

    def publish(
        self,
        key: PromptLike,
        value: PromptLike | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Published:
        """Store a source task's key prompt and (optionally) its value prompt, atomically.

        A prompt is an array, an (array, metadata) pair or a prompt-file path; its own metadata
        (step, score, ...) is merged with `metadata` (task, backbone, ...), conflicts are errors.
        Ids are derived from file contents: publishing the same prompts again returns the same ids.
        """
        return self.publish_many([(key, value, metadata)])[0]

    def publish_many(
        self,
        items: Iterable[tuple[PromptLike, PromptLike | None, Mapping[str, Any] | None]],
    ) -> list[Published]:
        """`publish` for many sources in one transaction (all or nothing)."""
        prepared = []
        for key, value, metadata in items:
            common = metadata_strings(metadata)
            key_obj = _prepare(key, "key", common)
            value_obj = None if value is None else _prepare(value, "value", common)
            if value_obj is not None:
                for name in ("task", "backbone", "d_model"):
                    if key_obj.fields[name] != value_obj.fields[name]:
                        raise LibraryError(
                            f"key and value disagree on {name}: {key_obj.fields[name]!r} vs {value_obj.fields[name]!r}"
                        )
            prepared.append((key_obj, value_obj))
        created = time.time()
        with file_lock(self._lock_path, shared=True), self._manifest.write() as conn:
            return [
                self._insert_pair(conn, key_obj, value_obj, created)
                for key_obj, value_obj in prepared
            ]

    def _insert_pair(
        self, conn: Any, key: _Object, value: _Object | None, created: float
    ) -> Published:
        key_id = self._insert(conn, key, created)
        if value is None:
            return Published(key_id, None)
        value_id = self._insert(conn, value, created)
        (current,) = conn.execute("SELECT pair FROM entries WHERE id = ?", (key_id,)).fetchone()
        if current not in (None, value_id):
            raise LibraryError(f"key {key_id} is already paired with {current}, not {value_id}")
        conn.execute("UPDATE entries SET pair = ? WHERE id = ?", (value_id, key_id))
        # a value may have several keys (one per recipe); it names the first
        conn.execute("UPDATE entries SET pair = ? WHERE id = ? AND pair IS NULL", (key_id, value_id))
        return Published(key_id, value_id)

    @staticmethod
    def _ensure_backbone(conn: Any, backbone: str, d_model: int) -> None:
        known = conn.execute(
            "SELECT d_model FROM backbones WHERE backbone = ?", (backbone,)
        ).fetchone()
        if known is None:
            conn.execute(
                "INSERT INTO backbones (backbone, d_model) VALUES (?, ?)", (backbone, d_model)
            )
        elif known[0] != d_model:
            raise LibraryError(
                f"backbone {backbone!r} has d_model {known[0]}, this prompt has {d_model}"
            )

    def _insert(self, conn: Any, obj: _Object, created: float) -> str:
        entry_id = obj.sha256[:ID_LENGTH]
        row = conn.execute("SELECT sha256 FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is not None and row[0] != obj.sha256:
            raise LibraryError(
                f"id collision: {obj.sha256} and {row[0]} share the prefix {entry_id}"
            )
        if row is None:
            backbone = obj.fields["backbone"]
            self._ensure_backbone(conn, backbone, obj.fields["d_model"])
            if obj.fields["role"] == "key":
                self._check_key_protocol(conn, backbone, obj.fields["protocol"])
            params = _entry_params(obj, entry_id, created)
            conn.execute(
                f"INSERT INTO entries ({', '.join(params)}) VALUES ({', '.join('?' * len(params))})",
                tuple(params.values()),
            )
            if obj.fields["role"] == "key":
                conn.execute(
                    "UPDATE backbones SET generation = generation + 1 WHERE backbone = ?",
                    (backbone,),
                )
        self._write_object(
            obj
        )  # also restores a missing file when an existing entry is republished
        return entry_id

    def _object_path(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / f"{sha}.safetensors"

    def _write_object(self, obj: _Object) -> None:
        path = self._object_path(obj.sha256)
        if path.exists() and _sha256(path.read_bytes()) == obj.sha256:
            return
        if not path.parent.exists():
            path.parent.mkdir(exist_ok=True)
            fsync_dir(path.parent.parent)
        atomic_write(path, obj.data)

    def delete(self, entry_id: str) -> list[str]:
        """Remove a source: the entry, its pair, and every other key of that value.

        Returns the removed ids, the given one first. Waits at most DELETE_LOCK_TIMEOUT
        seconds for the library's lock (LockTimeout), never behind publishes that start later."""
        with file_lock(self._lock_path, timeout=DELETE_LOCK_TIMEOUT):
            with self._manifest.write() as conn:
                entry = self._get(conn, entry_id)
                ids = [entry.id] + ([entry.pair] if entry.pair else [])
                group = "id IN (SELECT value FROM json_each(?1)) OR pair IN (SELECT value FROM json_each(?1))"
                removed = select(conn, f" WHERE {group}", (json.dumps(ids),))
                conn.execute(f"DELETE FROM entries WHERE {group}", (json.dumps(ids),))
                for _, gone in removed:
                    if gone.role == "key":
                        conn.execute(
                            "UPDATE backbones SET generation = generation + 1 WHERE backbone = ?",
                            (gone.backbone,),
                        )
            for _, gone in removed:
                self._object_path(gone.sha256).unlink(missing_ok=True)
                fsync_dir(self._object_path(gone.sha256).parent)
        gone_ids = [gone.id for _, gone in removed]
        return list(dict.fromkeys([i for i in ids if i in gone_ids] + gone_ids))

    # ---- reading -------------------------------------------------------------------------

    def _get(self, conn: Any, entry_id: str) -> Entry:
        rows = select(conn, " WHERE id = ?", (entry_id,))
        if not rows:
            raise EntryNotFound(f"no entry with id {entry_id!r}")
        return rows[0][1]

    def get(self, entry_id: str) -> Entry:
        """The manifest entry `entry_id` (EntryNotFound if absent)."""
        with self._manifest.read() as conn:
            return self._get(conn, entry_id)

    def list(
        self,
        *,
        task: str | None = None,
        backbone: str | None = None,
        role: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Entry]:
        """Entries matching every given filter, oldest first, one page at a time."""
        if not (0 < limit <= MAX_LIST) or offset < 0:
            raise LibraryError(
                f"need 0 < limit <= {MAX_LIST} and offset >= 0, got limit={limit} offset={offset}"
            )
        clause, params = where({"task": task, "backbone": backbone, "role": role})
        with self._manifest.read() as conn:
            rows = select(
                conn,
                f"{clause} ORDER BY seq LIMIT ? OFFSET ?",
                (*params, limit, offset),
            )
        return [entry for _, entry in rows]

    def count(
        self,
        *,
        task: str | None = None,
        backbone: str | None = None,
        role: str | None = None,
    ) -> int:
        """How many entries match every given filter."""
        clause, params = where({"task": task, "backbone": backbone, "role": role})
        with self._manifest.read() as conn:
            return conn.execute(f"SELECT count(*) FROM entries{clause}", params).fetchone()[0]

    def backbones(self) -> dict[str, int]:
        """Every backbone identity seen, with its d_model."""
        with self._manifest.read() as conn:
            return dict(conn.execute("SELECT backbone, d_model FROM backbones ORDER BY backbone"))

    def _read_object(self, entry_id: str, sha: str) -> bytes:
        path = self._object_path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LibraryCorrupt(
                f"entry {entry_id}: object file {path} is missing (run verify)"
            ) from None
        if _sha256(data) != sha:
            raise LibraryCorrupt(
                f"entry {entry_id}: object file {path} does not match its sha256 (run verify)"
            )
        return data

    def read_bytes(self, entry_id: str) -> bytes:
        """The entry's prompt file bytes, checked against the manifest's sha256."""
        with file_lock(self._lock_path, shared=True):  # no delete in between
            entry = self.get(entry_id)
            return self._read_object(entry.id, entry.sha256)

    def load(self, entry_id: str) -> tuple[np.ndarray, Metadata]:
        """The entry's prompt and metadata."""
        return decode_prompt(self.read_bytes(entry_id))

    def export(self, entry_id: str, path: str | os.PathLike[str]) -> Path:
        """Copy the entry's prompt file to `path` (atomically)."""
        atomic_write(path, self.read_bytes(entry_id))
        return Path(path)

    # ---- search --------------------------------------------------------------------------

    def query(
        self, prompt: Any, backbone: str, metric: str = DEFAULT_METRIC, k: int = 10,
        recipe: str | None = None,
    ) -> list[Match]:
        """The `k` keys of `backbone` most similar to `prompt` [L, d] under `metric`, best first.

        Only keys of one protocol are searched: `recipe`'s, else the backbone's default; keys
        that record no protocol are searched (with a warning) when the backbone has none."""
        return self.query_many([prompt], backbone, metric, k, recipe)[0]

    def query_many(
        self, prompts: Sequence[Any], backbone: str, metric: str = DEFAULT_METRIC, k: int = 10,
        recipe: str | None = None,
    ) -> list[list[Match]]:
        """`query` for several prompts in one batched search (BLAS from 16 prompts on)."""
        try:
            check_metric(metric)
        except ValueError as err:
            raise LibraryError(str(err)) from None
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise LibraryError(f"k must be a positive integer, got {k!r}")
        arrays = [check_prompt(prompt) for prompt in prompts]
        with self._manifest.read() as conn:
            row = conn.execute(
                "SELECT d_model, generation FROM backbones WHERE backbone = ?", (backbone,)
            ).fetchone()
        if row is None:
            known = sorted(self.backbones())
            raise LibraryError(f"unknown backbone {backbone!r}; this library has {known}")
        d_model, generation = row
        protocol = self.resolve_protocol(backbone, recipe)
        if protocol is None:
            warnings.warn(
                f"the keys of backbone {backbone} in this library record no key protocol: their "
                "similarities compare however each key was made", NoProtocolWarning, stacklevel=2,
            )
        length, start = self._space(backbone, protocol, metric)
        for array in arrays:
            if array.shape[1] != d_model:
                raise LibraryError(
                    f"query prompt has d_model {array.shape[1]}, backbone {backbone!r} has {d_model}"
                )
            if length is not None and array.shape[0] != length:
                raise LibraryError(
                    f"query prompt has length {array.shape[0]}; metric {metric!r} over these "
                    f"keys needs length {length}"
                )
        if not arrays:
            return []
        pid = protocol.id if protocol is not None else None
        index = self._index(backbone, pid, metric, self.index_kind, generation)
        rowids, scores = index.search(np.stack([pool(a, metric, start) for a in arrays]), int(k))
        wanted = sorted({int(r) for r in rowids.ravel() if r >= 0})
        with self._manifest.read() as conn:
            suffix = " WHERE seq IN (SELECT value FROM json_each(?))"
            entries = dict(select(conn, suffix, (json.dumps(wanted),)))
        return [  # an entry deleted meanwhile is skipped
            [
                Match(entries[r], float(s))
                for r, s in zip(row_ids, row_scores, strict=True)
                if r in entries
            ]
            for row_ids, row_scores in zip(rowids.tolist(), scores.tolist(), strict=True)
        ]

    def _save_index(self, path: Path, data: bytes, *, required: bool) -> bool:
        """Write an index file; whether it was written. Unless `required`, a failed write (a
        full disk) only keeps the index in memory, so queries go on."""
        try:
            with file_lock(self._lock_path, shared=True):
                atomic_write(path, data)
        except OSError as err:
            if required:
                raise
            LOG.warning("index %s kept in memory: %s", path.name, err.strerror or err)
            return False
        return True

    # ---- maintenance ---------------------------------------------------------------------

    def verify(self, *, repair: bool = True) -> VerifyReport:
        """Check every object file against the manifest; sweep orphans and refresh stale indexes if `repair`."""
        with file_lock(self._lock_path, shared=not repair):
            with self._manifest.read() as conn:
                rows = conn.execute("SELECT id, sha256, pair FROM entries ORDER BY seq").fetchall()
                starts = conn.execute("SELECT id, spec FROM protocols ORDER BY id").fetchall()
            rows += [
                (f"protocol:{pid}", KeyProtocol.from_json(spec).start, None) for pid, spec in starts
            ]
            ids = {entry_id for entry_id, _, _ in rows}
            missing, corrupt = [], []
            for entry_id, sha, _ in rows:
                try:
                    self._read_object(entry_id, sha)
                except LibraryCorrupt:
                    (corrupt if self._object_path(sha).exists() else missing).append(entry_id)
            expected = {self._object_path(sha) for _, sha, _ in rows}
            orphans = [
                path
                for path in sorted((self.root / "objects").rglob("*"))
                if path.is_file() and path not in expected
            ]
            orphans += sorted((self.root / "indexes").rglob(f"{TEMP_PREFIX}*"))
            if repair:
                for path in orphans:
                    path.unlink(missing_ok=True)
        stale = self._stale_indexes()
        if repair:
            for backbone, pid, metric, kind in stale:
                self._index(backbone, pid, metric, kind, 0, persist=True)
        return VerifyReport(
            entries=len(rows) - len(starts),
            missing=missing,
            corrupt=corrupt,
            broken_pairs=[
                entry_id for entry_id, _, pair in rows if pair is not None and pair not in ids
            ],
            orphans=[str(path.relative_to(self.root)) for path in orphans],
            stale_indexes=[
                f"{backbone}/{pid or NO_PROTOCOL}.{metric}.{kind}"
                for backbone, pid, metric, kind in stale
            ],
            repaired=repair,
        )
