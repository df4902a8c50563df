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

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings
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
from library.protocol import (
    RECIPES,
    KeyProtocol,
    ProtocolMismatch,
    check_start,
    start_bytes,
)
from library.similarity import BASE_METRICS, DELTA, check_metric, pool, pooled_dim

PromptLike = np.ndarray | tuple[np.ndarray, Mapping[str, Any]] | str | os.PathLike[str]
MANIFEST = "manifest.sqlite"
ID_LENGTH = 16  # hex digits of the file's sha256 used as entry id
MAX_LIST = 10_000
DELETE_LOCK_TIMEOUT = 10.0  # seconds a delete waits for the publishers already inside
LOG = logging.getLogger(__name__)
NO_PROTOCOL = "none"  # index file prefix of keys that record no protocol


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
    fields["extra"] = {
        name: text for name, text in meta.items() if name not in FIELDS and name != "protocol"
    }
    fields["protocol"] = _key_protocol(meta, role, array.shape[0])
    return _Object(data, _sha256(data), fields)


def _key_protocol(meta: Metadata, role: str, length: int) -> KeyProtocol | None:
    """The protocol a key's metadata records (its JSON under "protocol"), checked against it."""
    if "protocol" not in meta:
        return None
    if role != "key":
        raise LibraryError(f"only keys record a key protocol, not a {role}")
    protocol = KeyProtocol.from_json(meta["protocol"])
    if protocol.backbone != meta["backbone"] or protocol.prompt_length != length:
        raise ProtocolMismatch(
            f"key of backbone {meta['backbone']} with length {length} names a protocol for "
            f"{protocol.backbone} with length {protocol.prompt_length}"
        )
    return protocol


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
        "protocol": fields["protocol"].id if fields["protocol"] is not None else None,
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

    @staticmethod
    def _check_key_protocol(conn: Any, backbone: str, protocol: KeyProtocol | None) -> None:
        """Refuse a key whose protocol is not the library's for its backbone and recipe."""
        held = {
            recipe: KeyProtocol.from_json(spec)
            for recipe, spec in conn.execute(
                "SELECT recipe, spec FROM protocols WHERE backbone = ?", (backbone,)
            )
        }
        if protocol is None:
            if held:
                raise ProtocolMismatch(
                    f"keys of backbone {backbone} in this library follow the key protocols "
                    f"{sorted(p.id for p in held.values())}; this key records none"
                )
            return
        mine = held.get(protocol.recipe)
        if mine is None:
            raise ProtocolMismatch(
                f"this library has no {protocol.recipe!r} key protocol for backbone {backbone}; "
                f"register protocol {protocol.id} first (Library.register_protocol)"
            )
        if mine != protocol:
            raise ProtocolMismatch(
                f"this key was made by {protocol.recipe} protocol {protocol.id}, the library's is "
                f"{mine.id}; they differ in " + "; ".join(protocol.differences(mine))
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

    def register_protocol(
        self, protocol: KeyProtocol, start: Any, *, default: bool = False
    ) -> KeyProtocol:
        """Record how keys of `protocol.backbone` and `protocol.recipe` are made, with its start
        prompt [L, d]. Idempotent; a different protocol for the same backbone and recipe is
        refused (ProtocolMismatch naming what differs). The backbone's first protocol, or one
        registered with `default`, is the one queries use when they name no recipe."""
        data = start_bytes(start, protocol.backbone)
        array = check_start(protocol, data)
        obj = _Object(data, _sha256(data), {})
        with file_lock(self._lock_path, shared=True), self._manifest.write() as conn:
            self._ensure_backbone(conn, protocol.backbone, array.shape[1])
            row = conn.execute(
                "SELECT spec FROM protocols WHERE backbone = ? AND recipe = ?",
                (protocol.backbone, protocol.recipe),
            ).fetchone()
            if row is not None and KeyProtocol.from_json(row[0]) != protocol:
                held = KeyProtocol.from_json(row[0])
                raise ProtocolMismatch(
                    f"this library's {protocol.recipe} key protocol for {protocol.backbone} is "
                    f"{held.id}; protocol {protocol.id} differs in "
                    + "; ".join(protocol.differences(held))
                )
            (count,) = conn.execute(
                "SELECT count(*) FROM protocols WHERE backbone = ?", (protocol.backbone,)
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO protocols (id, backbone, recipe, spec, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (protocol.id, protocol.backbone, protocol.recipe, protocol.to_json(),
                     time.time()),
                )
            if default or count == 0:
                conn.execute(
                    "UPDATE protocols SET is_default = (id = ?) WHERE backbone = ?",
                    (protocol.id, protocol.backbone),
                )
            self._write_object(obj)
        return protocol

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

    # ---- key protocols -------------------------------------------------------------------

    def protocols(self, backbone: str | None = None) -> list[tuple[KeyProtocol, bool]]:
        """Every key protocol (of `backbone`, if given) with whether it is its backbone's default."""
        with self._manifest.read() as conn:
            rows = conn.execute(
                "SELECT spec, is_default FROM protocols WHERE ?1 IS NULL OR backbone = ?1 "
                "ORDER BY backbone, recipe",
                (backbone,),
            ).fetchall()
        return [(KeyProtocol.from_json(spec), bool(is_default)) for spec, is_default in rows]

    def resolve_protocol(self, backbone: str, recipe: str | None = None) -> KeyProtocol | None:
        """The protocol a query of `backbone` uses: `recipe`'s, else the default; None when the
        backbone's keys record no protocol (a library from before protocols)."""
        held = self.protocols(backbone)
        if recipe is not None:
            if recipe not in RECIPES:
                raise LibraryError(f"unknown key recipe {recipe!r}; choose one of {RECIPES}")
            for protocol, _ in held:
                if protocol.recipe == recipe:
                    return protocol
            raise LibraryError(
                f"this library has no {recipe!r} key protocol for backbone {backbone}; it has "
                f"{sorted(p.recipe for p, _ in held) or 'none'}"
            )
        return next((protocol for protocol, default in held if default), None)

    def protocol_start(self, protocol: KeyProtocol) -> np.ndarray:
        """The start prompt [L, d] of a registered protocol, checked against its hash."""
        with file_lock(self._lock_path, shared=True):
            return check_start(protocol, self._read_object(f"protocol {protocol.id}", protocol.start))

    def protocol(
        self, backbone: str, recipe: str | None = None
    ) -> tuple[KeyProtocol, np.ndarray] | None:
        """The protocol a query of `backbone` follows (see `resolve_protocol`) and its start
        prompt; None when the backbone's keys record no protocol."""
        protocol = self.resolve_protocol(backbone, recipe)
        return None if protocol is None else (protocol, self.protocol_start(protocol))

    # ---- search --------------------------------------------------------------------------

    def query(
        self, prompt: Any, backbone: str, metric: str = "mean", k: int = 10,
        recipe: str | None = None,
    ) -> list[Match]:
        """The `k` keys of `backbone` most similar to `prompt` [L, d] under `metric`, best first.

        Only keys of one protocol are searched: `recipe`'s, else the backbone's default; keys
        that record no protocol are searched (with a warning) when the backbone has none."""
        return self.query_many([prompt], backbone, metric, k, recipe)[0]

    def query_many(
        self, prompts: Sequence[Any], backbone: str, metric: str = "mean", k: int = 10,
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

    def _space(
        self, backbone: str, protocol: KeyProtocol | None, metric: str
    ) -> tuple[int | None, np.ndarray | None]:
        """(the key length a metric needs, or None; the start prompt a delta metric needs)."""
        if metric.startswith(DELTA) and (protocol is None or protocol.recipe != "trained"):
            raise LibraryError(
                f"metric {metric!r} compares displacements from a shared start: it needs keys of "
                "a 'trained' key protocol"
            )
        start = self.protocol_start(protocol) if metric.startswith(DELTA) else None
        if not metric.endswith("flat"):
            return None, start
        if protocol is not None:
            return protocol.prompt_length, start
        with self._manifest.read() as conn:
            lengths = [n for (n,) in conn.execute(
                "SELECT DISTINCT length FROM entries WHERE backbone = ? AND role = 'key' "
                "AND protocol IS NULL", (backbone,))]
        if len(lengths) > 1:
            raise LibraryError(f"metric {metric!r} needs keys of one length, found {sorted(lengths)}")
        return (lengths[0] if lengths else None), None

    def _index_path(self, backbone: str, pid: str | None, metric: str, kind: str) -> Path:
        folder = hashlib.sha256(backbone.encode()).hexdigest()[:16]
        return self.root / "indexes" / folder / f"{pid or NO_PROTOCOL}.{metric}.{kind}.safetensors"

    @staticmethod
    def _index_meta(backbone: str, pid: str | None, metric: str) -> dict[str, str]:
        return {"backbone": backbone, "protocol": pid or NO_PROTOCOL, "metric": metric}

    def _index(
        self,
        backbone: str,
        pid: str | None,
        metric: str,
        kind: IndexKind,
        generation: int,
        *,
        persist: bool = False,
    ) -> KeyIndex:
        """The (backbone, protocol, metric, kind) index at `generation` or later, refreshed if stale."""
        name = (backbone, pid or NO_PROTOCOL, metric, kind)
        cached = self._cache.get(name)
        if cached is not None and cached[0].generation >= generation and not persist:
            return cached[0]
        path = self._index_path(backbone, pid, metric, kind)
        with contextlib.suppress(OSError):  # read-only or full: the index is kept in memory
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
            index, rebuilt = self._refresh(backbone, pid, metric, kind, base)
            due = rebuilt or (len(index) - on_disk) * 10 >= len(index)
            if persist or (due and not self.read_only):
                data = index.to_bytes(self._index_meta(backbone, pid, metric))
                if self._save_index(path, data, required=persist):
                    on_disk = len(index)
            self._cache[name] = (index, on_disk)
            return index

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

    def _refresh(
        self, backbone: str, pid: str | None, metric: str, kind: IndexKind, base: KeyIndex | None
    ) -> tuple[KeyIndex, bool]:
        """`base` brought up to the manifest: new keys appended, or rebuilt if keys were removed."""
        key_rows = "FROM entries WHERE backbone = ? AND role = 'key' AND protocol IS ?"
        protocol = None
        if pid is not None:
            protocol = next((p for p, _ in self.protocols(backbone) if p.id == pid), None)
            if protocol is None:
                raise LibraryError(f"no key protocol {pid} for backbone {backbone}")
        length, start = self._space(backbone, protocol, metric)
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
                    (backbone, pid, last),
                ).fetchall()
                (count,) = conn.execute(f"SELECT count(*) {key_rows}", (backbone, pid)).fetchone()
                removed = base is not None and len(base) + len(new) != count
                alive = (
                    [seq for (seq,) in conn.execute(f"SELECT seq {key_rows}", (backbone, pid))]
                    if removed
                    else []
                )
            width = pooled_dim(metric, length or 1, d_model)
            vectors = np.zeros((len(new), width), np.float32)
            for i, (_, entry_id, sha) in enumerate(new):
                key = decode_prompt(self._read_object(entry_id, sha))[0]
                vectors[i] = pool(key, metric, start)
        rowids = np.array([seq for seq, _, _ in new], dtype=np.int64)
        if base is None:
            return KeyIndex.build(kind, width, rowids, vectors, generation), True
        if removed:
            base = base.kept(np.isin(base.rowids, alive), generation)
        return base.added(rowids, vectors, generation), removed

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

    def _stale_indexes(self) -> list[tuple[str, str | None, str, IndexKind]]:
        """(backbone, protocol, metric, kind) of index files whose generation or keys disagree
        with the manifest.

        Unreadable index files, ones of an older layout, or of a backbone or protocol the
        manifest does not know, are removed.
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
                pid = None if meta["protocol"] == NO_PROTOCOL else meta["protocol"]
                with safetensors.safe_open(str(path), framework="np") as handle:
                    rowids = set(handle.get_tensor("rowids").tolist())
            except Exception:  # noqa: BLE001 - derived data: remove, it is rebuilt on use
                path.unlink(missing_ok=True)
                continue
            with self._manifest.read() as conn:
                current = conn.execute(
                    "SELECT generation FROM backbones WHERE backbone = ?", (backbone,)
                ).fetchone()
                known = pid is None or conn.execute(
                    "SELECT 1 FROM protocols WHERE id = ?", (pid,)
                ).fetchone()
                alive = {
                    seq
                    for (seq,) in conn.execute(
                        "SELECT seq FROM entries WHERE backbone = ? AND role = 'key' "
                        "AND protocol IS ?",
                        (backbone, pid),
                    )
                }
            if current is None or not known:
                path.unlink(missing_ok=True)
            elif current[0] != generation or rowids != alive:
                stale.append((backbone, pid, metric, kind))
        return stale

    def rebuild(self) -> dict[str, int]:
        """Recompute every index from the prompt files: the index files on disk, plus this
        library's kind for the "mean" and "token" metrics of every protocol that has keys.

        Returns the number of keys in each index, by "backbone/protocol.metric.kind".
        """
        wanted = set()
        for path in (self.root / "indexes").glob("*/*.safetensors"):
            try:
                meta = index_metadata(path)
                pid = None if meta["protocol"] == NO_PROTOCOL else meta["protocol"]
                wanted.add((meta["backbone"], pid, meta["metric"], meta["kind"]))
            except Exception:  # noqa: BLE001 - derived data of an older layout: rebuilt below
                pass
            path.unlink(missing_ok=True)
        with self._manifest.read() as conn:
            groups = conn.execute(
                "SELECT DISTINCT backbone, protocol FROM entries WHERE role = 'key'"
            ).fetchall()
        wanted |= {(b, pid, m, self.index_kind) for b, pid in groups for m in BASE_METRICS[:2]}
        registered = {p.id for p, _ in self.protocols()}
        sizes = {}
        for backbone, pid, metric, kind in sorted(wanted, key=str):
            if kind not in KINDS or (pid is not None and pid not in registered):
                continue
            self._cache.pop((backbone, pid or NO_PROTOCOL, metric, kind), None)
            index = self._index(backbone, pid, metric, kind, 0, persist=True)
            sizes[f"{backbone}/{pid or NO_PROTOCOL}.{metric}.{kind}"] = len(index)
        return sizes
