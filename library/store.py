"""A prompt library: a directory with a manifest, content-addressed prompt files and key indexes.

    manifest.sqlite                                 entries (`library.manifest`), SQLite WAL
    objects/<sha[:2]>/<sha256>.safetensors          prompt files named by the sha256 of their bytes
    indexes/<backbone hash>/<metric>.<kind>.safetensors   derived FAISS indexes of the keys
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
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors

from library.atomic import TEMP_PREFIX, atomic_write, fsync_dir
from library.errors import EntryNotFound, LibraryCorrupt, LibraryError
from library.index import KINDS, IndexKind, KeyIndex, index_metadata
from library.locks import file_lock
from library.manifest import Entry, Manifest, select, where
from library.prompt_file import (
    FIELDS,
    Metadata,
    check_prompt,
    decode_prompt,
    encode_prompt,
    load_prompt,
    metadata_strings,
    typed_fields,
)
from library.similarity import METRICS, check_metric, pool

PromptLike = np.ndarray | tuple[np.ndarray, Mapping[str, Any]] | str | os.PathLike[str]
MANIFEST = "manifest.sqlite"
ID_LENGTH = 16  # hex digits of the file's sha256 used as entry id
MAX_LIST = 10_000


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


@dataclasses.dataclass(frozen=True)
class _Object:
    data: bytes
    sha256: str
    fields: dict[str, Any]  # typed known fields, plus `extra`


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def as_prompt(prompt: PromptLike) -> tuple[np.ndarray, Metadata]:
    """An array, (array, metadata) pair or prompt-file path -> validated (prompt, metadata)."""
    if isinstance(prompt, (str, os.PathLike)):
        return load_prompt(prompt)
    if isinstance(prompt, tuple):
        array, metadata = prompt
        return check_prompt(array), metadata_strings(metadata)
    return check_prompt(prompt), {}


def _prepare(prompt: PromptLike, role: str, common: Metadata) -> _Object:
    """Merge a prompt's own metadata with the publish metadata and encode its object file."""
    array, meta = as_prompt(prompt)
    for name, value in common.items():
        if meta.get(name, value) != value:
            raise LibraryError(
                f"{role} metadata {name!r}: the prompt says {meta[name]!r}, the request says {value!r}"
            )
        meta[name] = value
    if meta.get("role", role) != role:
        raise LibraryError(f"a prompt with role {meta['role']!r} was given as the {role}")
    meta["role"] = role
    for required in ("task", "backbone"):
        if not meta.get(required):
            raise LibraryError(f"{role} metadata must include a non-empty {required!r}")
    data = encode_prompt(array, meta)
    fields = {**typed_fields(meta), "length": array.shape[0], "d_model": array.shape[1]}
    fields["extra"] = {name: text for name, text in meta.items() if name not in FIELDS}
    return _Object(data, _sha256(data), fields)


def _entry_params(obj: _Object, entry_id: str, created: float) -> dict[str, Any]:
    fields = obj.fields
    return {
        **{
            name: fields.get(name)
            for name in (
                "task",
                "backbone",
                "role",
                "step",
                "score",
                "metric",
                "init",
                "seed",
            )
        },
        "id": entry_id,
        "sha256": obj.sha256,
        "length": fields["length"],
        "d_model": fields["d_model"],
        "created": created,
        "extra": json.dumps(fields["extra"], sort_keys=True),
    }


def _file_generation(path: Path) -> int:
    """The generation recorded in an index file, -1 if absent or unreadable."""
    try:
        return int(index_metadata(path)["generation"])
    except Exception:  # noqa: BLE001 - index files are derived data: damage just means "rebuild"
        return -1


def _read_index(path: Path) -> KeyIndex | None:
    """The index file at `path`, or None if absent or unreadable."""
    try:
        return KeyIndex.from_file(path)
    except Exception:  # noqa: BLE001 - index files are derived data: damage just means "rebuild"
        return None


class Library:
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
    ) -> None:
        if index_kind not in KINDS:
            raise LibraryError(f"unknown index kind {index_kind!r}; choose one of {KINDS}")
        self.root = Path(root)
        self.index_kind: IndexKind = index_kind
        if not (self.root / MANIFEST).exists() and not create:
            raise LibraryError(f"{self.root} is not a prompt library (no {MANIFEST})")
        for folder in ("objects", "indexes"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / "lock"
        self._manifest = Manifest(self.root / MANIFEST)
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
        for this, other in ((key_id, value_id), (value_id, key_id)):
            (current,) = conn.execute("SELECT pair FROM entries WHERE id = ?", (this,)).fetchone()
            if current not in (None, other):
                raise LibraryError(f"entry {this} is already paired with {current}, not {other}")
            conn.execute("UPDATE entries SET pair = ? WHERE id = ?", (other, this))
        return Published(key_id, value_id)

    def _insert(self, conn: Any, obj: _Object, created: float) -> str:
        entry_id = obj.sha256[:ID_LENGTH]
        row = conn.execute("SELECT sha256 FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is not None and row[0] != obj.sha256:
            raise LibraryError(
                f"id collision: {obj.sha256} and {row[0]} share the prefix {entry_id}"
            )
        if row is None:
            backbone, d_model = obj.fields["backbone"], obj.fields["d_model"]
            known = conn.execute(
                "SELECT d_model FROM backbones WHERE backbone = ?", (backbone,)
            ).fetchone()
            if known is None:
                conn.execute(
                    "INSERT INTO backbones (backbone, d_model) VALUES (?, ?)",
                    (backbone, d_model),
                )
            elif known[0] != d_model:
                raise LibraryError(
                    f"backbone {backbone!r} has d_model {known[0]}, this prompt has {d_model}"
                )
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
        """Remove an entry together with its pair; returns the removed ids."""
        with file_lock(self._lock_path):
            with self._manifest.write() as conn:
                entry = self._get(conn, entry_id)
                ids = [entry.id] + ([entry.pair] if entry.pair else [])
                removed = select(conn, " WHERE id IN (?, ?)", (ids[0], ids[-1]))
                conn.execute("DELETE FROM entries WHERE id IN (?, ?)", (ids[0], ids[-1]))
                for _, gone in removed:
                    if gone.role == "key":
                        conn.execute(
                            "UPDATE backbones SET generation = generation + 1 WHERE backbone = ?",
                            (gone.backbone,),
                        )
            for _, gone in removed:
                self._object_path(gone.sha256).unlink(missing_ok=True)
                fsync_dir(self._object_path(gone.sha256).parent)
        gone_ids = {gone.id for _, gone in removed}
        return [entry_id for entry_id in dict.fromkeys(ids) if entry_id in gone_ids]

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

    def query(self, prompt: Any, backbone: str, metric: str = "mean", k: int = 10) -> list[Match]:
        """The `k` keys of `backbone` most similar to `prompt` [L, d] under `metric`, best first."""
        return self.query_many([prompt], backbone, metric, k)[0]

    def query_many(
        self, prompts: Sequence[Any], backbone: str, metric: str = "mean", k: int = 10
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
        for array in arrays:
            if array.shape[1] != d_model:
                raise LibraryError(
                    f"query prompt has d_model {array.shape[1]}, backbone {backbone!r} has {d_model}"
                )
        if not arrays:
            return []
        index = self._index(backbone, metric, self.index_kind, generation)
        rowids, scores = index.search(np.stack([pool(a, metric) for a in arrays]), int(k))
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

    def _index_path(self, backbone: str, metric: str, kind: str) -> Path:
        folder = hashlib.sha256(backbone.encode()).hexdigest()[:16]
        return self.root / "indexes" / folder / f"{metric}.{kind}.safetensors"

    def _index(
        self,
        backbone: str,
        metric: str,
        kind: IndexKind,
        generation: int,
        *,
        persist: bool = False,
    ) -> KeyIndex:
        """The (backbone, metric, kind) index at `generation` or later, refreshed if stale."""
        name = (backbone, metric, kind)
        cached = self._cache.get(name)
        if cached is not None and cached[0].generation >= generation and not persist:
            return cached[0]
        path = self._index_path(backbone, metric, kind)
        path.parent.mkdir(exist_ok=True)
        with file_lock(path.with_suffix(".lock")):
            cached = self._cache.get(name)
            if cached is not None and cached[0].generation >= generation and not persist:
                return cached[0]
            base, on_disk = cached if cached is not None else (None, 0)
            if _file_generation(path) > (-1 if base is None else base.generation):
                disk = _read_index(path)
                if disk is not None:
                    base, on_disk = disk, len(disk)
            index, rebuilt = self._refresh(backbone, metric, kind, base)
            if persist or rebuilt or (len(index) - on_disk) * 10 >= len(index):
                with file_lock(self._lock_path, shared=True):
                    atomic_write(path, index.to_bytes({"backbone": backbone, "metric": metric}))
                on_disk = len(index)
            self._cache[name] = (index, on_disk)
            return index

    def _refresh(
        self, backbone: str, metric: str, kind: IndexKind, base: KeyIndex | None
    ) -> tuple[KeyIndex, bool]:
        """`base` brought up to the manifest: new keys appended, or rebuilt if keys were removed."""
        key_rows = "FROM entries WHERE backbone = ? AND role = 'key'"
        with file_lock(self._lock_path, shared=True):
            with self._manifest.read() as conn:
                d_model, generation = conn.execute(
                    "SELECT d_model, generation FROM backbones WHERE backbone = ?",
                    (backbone,),
                ).fetchone()
                if base is not None and base.generation == generation:
                    return base, False
                last = int(base.rowids.max()) if base is not None and len(base) else 0
                new = conn.execute(
                    f"SELECT seq, id, sha256 {key_rows} AND seq > ? ORDER BY seq",
                    (backbone, last),
                ).fetchall()
                (count,) = conn.execute(f"SELECT count(*) {key_rows}", (backbone,)).fetchone()
                removed = base is not None and len(base) + len(new) != count
                alive = (
                    [seq for (seq,) in conn.execute(f"SELECT seq {key_rows}", (backbone,))]
                    if removed
                    else []
                )
            vectors = np.zeros((len(new), d_model), np.float32)
            for i, (_, entry_id, sha) in enumerate(new):
                vectors[i] = pool(decode_prompt(self._read_object(entry_id, sha))[0], metric)
        rowids = np.array([seq for seq, _, _ in new], dtype=np.int64)
        if base is None:
            return KeyIndex.build(kind, d_model, rowids, vectors, generation), True
        if removed:
            base = base.kept(np.isin(base.rowids, alive), generation)
        return base.added(rowids, vectors, generation), removed

    # ---- maintenance ---------------------------------------------------------------------

    def verify(self, *, repair: bool = True) -> VerifyReport:
        """Check every object file against the manifest; sweep orphans and refresh stale indexes if `repair`."""
        with file_lock(self._lock_path, shared=not repair):
            with self._manifest.read() as conn:
                rows = conn.execute("SELECT id, sha256, pair FROM entries ORDER BY seq").fetchall()
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
            for backbone, metric, kind in stale:
                self._index(backbone, metric, kind, 0, persist=True)
        return VerifyReport(
            entries=len(rows),
            missing=missing,
            corrupt=corrupt,
            broken_pairs=[
                entry_id for entry_id, _, pair in rows if pair is not None and pair not in ids
            ],
            orphans=[str(path.relative_to(self.root)) for path in orphans],
            stale_indexes=[f"{backbone}/{metric}.{kind}" for backbone, metric, kind in stale],
            repaired=repair,
        )

    def _stale_indexes(self) -> list[tuple[str, str, IndexKind]]:
        """(backbone, metric, kind) of index files whose generation or keys disagree with the manifest.

        Unreadable index files, or ones of a backbone the manifest does not know, are removed.
        """
        stale = []
        for path in sorted((self.root / "indexes").glob("*/*.safetensors")):
            try:
                meta = index_metadata(path)
                backbone, metric, kind, generation = (
                    meta["backbone"],
                    meta["metric"],
                    meta["kind"],
                    int(meta["generation"]),
                )
                with safetensors.safe_open(str(path), framework="np") as handle:
                    rowids = set(handle.get_tensor("rowids").tolist())
            except Exception:  # noqa: BLE001 - derived data: remove, it is rebuilt on use
                path.unlink(missing_ok=True)
                continue
            with self._manifest.read() as conn:
                current = conn.execute(
                    "SELECT generation FROM backbones WHERE backbone = ?", (backbone,)
                ).fetchone()
                alive = {
                    seq
                    for (seq,) in conn.execute(
                        "SELECT seq FROM entries WHERE backbone = ? AND role = 'key'",
                        (backbone,),
                    )
                }
            if current is None:
                path.unlink(missing_ok=True)
            elif current[0] != generation or rowids != alive:
                stale.append((backbone, metric, kind))
        return stale

    def rebuild(self) -> dict[str, int]:
        """Recompute every index from the prompt files (this library's kind, plus kinds on disk).

        Returns the number of keys in each index, by "backbone/metric.kind".
        """
        kinds = {self.index_kind} | {
            path.name.split(".")[1] for path in (self.root / "indexes").glob("*/*.safetensors")
        }
        sizes = {}
        for backbone in self.backbones():
            for metric in METRICS:
                for kind in sorted(kinds & set(KINDS)):
                    path = self._index_path(backbone, metric, kind)
                    path.parent.mkdir(exist_ok=True)
                    with file_lock(path.with_suffix(".lock")):
                        index, _ = self._refresh(backbone, metric, kind, None)
                        with file_lock(self._lock_path, shared=True):
                            atomic_write(
                                path,
                                index.to_bytes({"backbone": backbone, "metric": metric}),
                            )
                        self._cache[(backbone, metric, kind)] = (index, len(index))
                    sizes[f"{backbone}/{metric}.{kind}"] = len(index)
        return sizes
