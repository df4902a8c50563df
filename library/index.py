"""FAISS inner-product indexes over pooled key vectors (derived data; see `library.store`)."""

from __future__ import annotations

import math
import os
from typing import Literal, cast

import faiss
import numpy as np
import safetensors
import safetensors.numpy
from faiss.contrib.inspect_tools import get_invlist

IndexKind = Literal["flat", "hnsw", "ivf"]
KINDS: tuple[IndexKind, ...] = ("flat", "hnsw", "ivf")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
IVF_MIN_NLIST = 16
IVF_MAX_NLIST = 4096
# k-means trains on this many vectors per list: FAISS warns below 39; 64 or 128 per list took
# 1.4x and 1.8x as long and gave the same recall@10 (100k rank-32 keys, d=576).
IVF_POINTS_PER_LIST = 39
# Lists searched per query: recall@10 0.97 at 100k and 0.93 at 1M rank-32 keys (d=576).
IVF_NPROBE = 256
IVF_SEED = 0

# FAISS's default only switches to BLAS for huge query batches; batches of >= 16 queries use sgemm.
BATCH = 16
faiss.cvar.distance_compute_blas_threshold = BATCH


def ivf_nlist(n: int) -> int:
    """Inverted lists of an IVF index over n vectors; 0 means too few to train (use a flat index).

    About 4 sqrt(n) (the low end of FAISS's 4-16 sqrt(n) guideline, so that `IVF_NPROBE` lists
    cover more of the data), at most n / `IVF_POINTS_PER_LIST` so k-means has enough points per
    centroid, and at most `IVF_MAX_NLIST` to bound training time. Fewer than `IVF_MIN_NLIST`
    lists (n < 624) gives 0: exact search is as fast there and needs no training.
    """
    nlist = min(round(4 * math.sqrt(n)), n // IVF_POINTS_PER_LIST, IVF_MAX_NLIST)
    return nlist if nlist >= IVF_MIN_NLIST else 0


def _nlist(index: faiss.Index) -> int:
    return index.nlist if isinstance(index, faiss.IndexIVF) else 0


def _new_faiss(kind: IndexKind, vectors: np.ndarray) -> faiss.Index:
    """An empty index for `vectors` [n, d]; an IVF one is trained on a fixed-seed sample of them."""
    d = vectors.shape[1]
    if kind == "flat" or (kind == "ivf" and not ivf_nlist(len(vectors))):
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    if kind == "ivf":
        nlist = ivf_nlist(len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(IVF_SEED).choice(
            len(vectors), IVF_POINTS_PER_LIST * nlist, replace=False
        )
        index.train(vectors[np.sort(sample)])
        index.nprobe = IVF_NPROBE
        return index
    raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")


def _add(index: faiss.Index, rowids: np.ndarray, vectors: np.ndarray) -> None:
    """Append vectors: IVF indexes label them with their rowids (they survive `remove_ids`), the
    others with their position."""
    if not len(vectors):
        return
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if isinstance(index, faiss.IndexIVF):
        index.add_with_ids(vectors, np.asarray(rowids, dtype=np.int64))
    else:
        index.add(vectors)


class KeyIndex:
    """Pooled keys of one (backbone, metric): a FAISS index plus the manifest rowid of each vector.

    Never modified after construction (updates return a new KeyIndex), so concurrent searches
    are safe. `generation` is the manifest generation the index reflects. `kind` is the kind
    asked for: an "ivf" KeyIndex holds a flat FAISS index until it has enough vectors to train.
    """

    def __init__(
        self, index: faiss.Index, rowids: np.ndarray, generation: int, kind: IndexKind
    ) -> None:
        if index.ntotal != len(rowids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(rowids)} rowids")
        self.index = index
        self.rowids = np.asarray(rowids, dtype=np.int64)
        self.generation = generation
        self.kind = kind

    @classmethod
    def build(
        cls,
        kind: IndexKind,
        d: int,
        rowids: np.ndarray,
        vectors: np.ndarray,
        generation: int,
    ) -> KeyIndex:
        """An index of `vectors` [n, d] (float32) whose i-th vector belongs to `rowids[i]`."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, d)
        index = _new_faiss(kind, vectors)
        _add(index, rowids, vectors)
        return cls(index, rowids, generation, kind)

    def __len__(self) -> int:
        return len(self.rowids)

    def vectors(self) -> np.ndarray:
        """A copy of all vectors [n, d], in `rowids` order."""
        if not isinstance(self.index, faiss.IndexIVF):
            return (
                self.index.reconstruct_n(0, len(self))
                if len(self)
                else np.zeros((0, self.index.d), np.float32)
            )
        lists = [get_invlist(self.index.invlists, i) for i in range(self.index.nlist)]
        ids = np.concatenate([ids for ids, _ in lists])
        vectors = np.concatenate([codes for _, codes in lists]).view(np.float32)
        order = np.argsort(ids)
        return vectors[order[np.searchsorted(ids[order], self.rowids)]]

    def added(self, rowids: np.ndarray, vectors: np.ndarray, generation: int) -> KeyIndex:
        """A copy with more vectors appended.

        An "ivf" index is retrained on all vectors once they are enough for twice its lists (or,
        while flat, for any), so its lists keep up with a growing library at amortised cost.
        """
        all_rowids = np.concatenate([self.rowids, np.asarray(rowids, dtype=np.int64)])
        nlist = ivf_nlist(len(all_rowids))
        if self.kind == "ivf" and nlist and nlist >= 2 * _nlist(self.index):
            all_vectors = np.concatenate([self.vectors(), np.asarray(vectors, np.float32)])
            return KeyIndex.build("ivf", self.index.d, all_rowids, all_vectors, generation)
        index = faiss.clone_index(self.index)
        _add(index, rowids, vectors)
        return KeyIndex(index, all_rowids, generation, self.kind)

    def kept(self, keep: np.ndarray, generation: int) -> KeyIndex:
        """A copy holding only the vectors where the boolean mask `keep` is true.

        IVF removes the others in place (its lists stay trained); flat and HNSW are rebuilt
        (HNSW has no removal, and removal from a flat index would renumber positions anyway).
        """
        if not isinstance(self.index, faiss.IndexIVF):
            return KeyIndex.build(
                self.kind, self.index.d, self.rowids[keep], self.vectors()[keep], generation
            )
        index = faiss.clone_index(self.index)
        index.remove_ids(self.rowids[~keep])
        return KeyIndex(index, self.rowids[keep], generation, self.kind)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product for queries [nq, d] -> (rowids, scores), each [nq, min(k, n)]."""
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = None
        if isinstance(self.index, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k))
        elif isinstance(self.index, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(nprobe=IVF_NPROBE)
        # FAISS parallelises over queries: for a few, OpenMP's thread wake-ups only add latency
        # (badly so on a busy machine). The setting is per calling thread, so restore it.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1 if len(queries) < BATCH else threads)
        try:
            scores, labels = self.index.search(queries, k, params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        if isinstance(self.index, faiss.IndexIVF):  # labelled by rowid; -1 pads short results
            return labels, scores
        return np.where(labels >= 0, self.rowids[np.maximum(labels, 0)], -1), scores

    def to_bytes(self, metadata: dict[str, str]) -> bytes:
        """safetensors bytes: rowids plus the vectors (flat) or FAISS's serialisation (hnsw, ivf)."""
        tensors = {"rowids": self.rowids}
        if isinstance(self.index, faiss.IndexFlat):
            tensors["vectors"] = self.vectors()
        else:
            tensors["faiss"] = faiss.serialize_index(self.index)
        meta = {
            **metadata,
            "kind": self.kind,
            "d": str(self.index.d),
            "generation": str(self.generation),
        }
        return safetensors.numpy.save(tensors, metadata=meta)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyIndex:
        """Read an index file written from `to_bytes`."""
        with safetensors.safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        kind, d, generation = (
            metadata["kind"],
            int(metadata["d"]),
            int(metadata["generation"]),
        )
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r} in {path}")
        if "faiss" in tensors:
            index = faiss.deserialize_index(tensors["faiss"])
        else:
            index = faiss.IndexFlatIP(d)
            _add(index, tensors["rowids"], tensors["vectors"])
        return cls(index, tensors["rowids"], generation, cast(IndexKind, kind))


def index_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of an index file (kind, d, generation, plus what the writer added), read cheaply."""
    with safetensors.safe_open(str(path), framework="np") as handle:
        return handle.metadata() or {}
