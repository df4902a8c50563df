"""Key-index maintenance of a `library.store.Library`: the derived FAISS index files of each
(backbone, key protocol, metric, kind), refreshed from the manifest when read."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import safetensors

from library.errors import LibraryError
from library.index import KINDS, IndexKind, KeyIndex, index_metadata
from library.locks import file_lock
from library.prompt_file import decode_prompt
from library.protocol import KeyProtocol
from library.similarity import BASE_METRICS, DELTA, pool, pooled_dim

NO_PROTOCOL = "none"  # index file prefix of keys that record no protocol


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


class KeyIndexes:
    """The key-index methods of `Library` (a mixin; see `library.store`)."""

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
