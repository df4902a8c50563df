"""FAISS inner-product indexes over pooled key vectors (derived data; see `library.store`)."""

from __future__ import annotations

import os
from typing import Literal

import faiss
import numpy as np
import safetensors
import safetensors.numpy

IndexKind = Literal["flat", "hnsw"]
KINDS: tuple[IndexKind, ...] = ("flat", "hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128

# FAISS's default only switches to BLAS for huge query batches; batches of >= 16 queries use sgemm.
BATCH = 16
faiss.cvar.distance_compute_blas_threshold = BATCH


def _new_faiss(kind: IndexKind, d: int) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")


class KeyIndex:
    """Pooled keys of one (backbone, metric): a FAISS index plus the manifest rowid of each vector.

    Never modified after construction (updates return a new KeyIndex), so concurrent searches
    are safe. `generation` is the manifest generation the index reflects.
    """

    def __init__(self, index: faiss.Index, rowids: np.ndarray, generation: int) -> None:
        if index.ntotal != len(rowids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(rowids)} rowids")
        self.index = index
        self.rowids = np.asarray(rowids, dtype=np.int64)
        self.generation = generation

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
        index = _new_faiss(kind, d)
        if len(vectors):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index, rowids, generation)

    @property
    def kind(self) -> IndexKind:
        return "hnsw" if isinstance(self.index, faiss.IndexHNSW) else "flat"

    def __len__(self) -> int:
        return len(self.rowids)

    def vectors(self) -> np.ndarray:
        """A copy of all vectors [n, d]."""
        return (
            self.index.reconstruct_n(0, len(self))
            if len(self)
            else np.zeros((0, self.index.d), np.float32)
        )

    def added(self, rowids: np.ndarray, vectors: np.ndarray, generation: int) -> KeyIndex:
        """A copy with more vectors appended."""
        index = faiss.clone_index(self.index)
        if len(vectors):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return KeyIndex(
            index,
            np.concatenate([self.rowids, np.asarray(rowids, dtype=np.int64)]),
            generation,
        )

    def kept(self, keep: np.ndarray, generation: int) -> KeyIndex:
        """A rebuilt copy holding only the vectors where the boolean mask `keep` is true."""
        return KeyIndex.build(
            self.kind, self.index.d, self.rowids[keep], self.vectors()[keep], generation
        )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product for queries [nq, d] -> (rowids, scores), each [nq, min(k, n)]."""
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = (
            faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k))
            if self.kind == "hnsw"
            else None
        )
        # FAISS parallelises over queries: for a few, OpenMP's thread wake-ups only add latency
        # (badly so on a busy machine). The setting is per calling thread, so restore it.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1 if len(queries) < BATCH else threads)
        try:
            scores, positions = self.index.search(queries, k, params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        rowids = np.where(positions >= 0, self.rowids[np.maximum(positions, 0)], -1)
        return rowids, scores

    def to_bytes(self, metadata: dict[str, str]) -> bytes:
        """safetensors bytes: rowids plus the vectors (flat) or FAISS's own serialisation (hnsw)."""
        tensors = {"rowids": self.rowids}
        if self.kind == "flat":
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
        if kind == "flat":
            return cls.build("flat", d, tensors["rowids"], tensors["vectors"], generation)
        return cls(faiss.deserialize_index(tensors["faiss"]), tensors["rowids"], generation)


def index_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of an index file (kind, d, generation, plus what the writer added), read cheaply."""
    with safetensors.safe_open(str(path), framework="np") as handle:
        return handle.metadata() or {}
