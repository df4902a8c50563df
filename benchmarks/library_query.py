"""Query latency of the prompt library's key index: exact (flat) vs approximate (IVF, HNSW).

For each library size: single-query latency p50/p99 of `KeyIndex.search` for each kind, build
times, and the approximate kinds' recall@10 against the exact result (HNSW only up to
`--hnsw-max` keys: its build does not finish in reasonable time at 1M keys on a 2-core machine).
Keys are synthetic pooled vectors of rank 32 (`--data lowrank`, like structured real keys) or
uniform on the sphere (`--data uniform`, worst case for any approximate index). `--end-to-end N`
also times `Library.query` on a real on-disk library of N published [L, d] keys (pooling + index
+ manifest lookup).

    .venv/bin/python benchmarks/library_query.py --sizes 1000 100000 1000000 --end-to-end 1000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator

import faiss
import numpy as np

from library import Library
from library.index import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    IVF_NPROBE,
    IVF_POINTS_PER_LIST,
    IndexKind,
    KeyIndex,
)


def synthetic(n: int, d: int, data: str, rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    """n unit vectors: rank-32 (`lowrank`, via the shared `basis`) or uniform on the sphere."""
    x = rng.standard_normal((n, basis.shape[0] if data == "lowrank" else d), dtype=np.float32)
    if data == "lowrank":
        x = x @ basis
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def latencies(index: KeyIndex, queries: np.ndarray, k: int) -> tuple[dict[str, float], np.ndarray]:
    """p50/p99 milliseconds of one-query searches, and the rowids found."""
    index.search(queries[:1], k)  # warm up
    times, found = [], []
    for query in queries:
        start = time.perf_counter()
        rowids, _ = index.search(query[None], k)
        times.append(time.perf_counter() - start)
        found.append(rowids[0])
    ms = np.array(times) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }, np.array(found)


def bench_size(
    n: int, args: argparse.Namespace, rng: np.random.Generator, basis: np.ndarray
) -> Iterator[dict[str, object]]:
    """One result line for the flat index, then one for IVF and one for HNSW (or why not)."""
    keys = synthetic(n, args.d, args.data, rng, basis)
    queries = synthetic(args.queries, args.d, args.data, rng, basis)
    rowids = np.arange(n, dtype=np.int64)
    exact = np.zeros((0, args.k), np.int64)
    kinds: list[IndexKind] = ["flat", "ivf"] + (["hnsw"] if n <= args.hnsw_max else [])
    for kind in kinds:
        start = time.perf_counter()
        index = KeyIndex.build(kind, args.d, rowids, keys, 0)
        result: dict[str, object] = {
            "keys": n,
            "kind": kind,
            "build_s": round(time.perf_counter() - start, 2),
        }
        if isinstance(index.index, faiss.IndexIVF):
            result["nlist"] = index.index.nlist
        result["single_query"], found = latencies(index, queries, args.k)
        start = time.perf_counter()
        index.search(queries, args.k)
        result["batch_qps"] = round(len(queries) / (time.perf_counter() - start), 1)
        if kind == "flat":
            exact = found
        else:
            recall = np.mean(
                [len(set(a) & set(b)) / args.k for a, b in zip(exact, found, strict=True)]
            )
            result["recall_at_10"] = round(float(recall), 4)
        result["load"] = os.getloadavg()
        yield result
        del index
    if n > args.hnsw_max:
        yield {"keys": n, "kind": "hnsw", "skipped": f"{n} keys > --hnsw-max {args.hnsw_max}"}


def bench_end_to_end(
    n: int, args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, object]:
    """Library.query (pool + index + manifest) on an on-disk library of n [L, d] keys, both metrics."""
    with tempfile.TemporaryDirectory() as root, Library(root) as lib:
        prompts = rng.standard_normal((n, args.length, args.d), dtype=np.float32)
        start = time.perf_counter()
        lib.publish_many(
            [(p, None, {"task": f"task{i}", "backbone": "bench"}) for i, p in enumerate(prompts)]
        )
        result: dict[str, object] = {
            "keys": n,
            "prompt_length": args.length,
            "publish_s": round(time.perf_counter() - start, 2),
        }
        for metric in ("mean", "token"):
            start = time.perf_counter()
            lib.query(prompts[0], "bench", metric, args.k)  # builds the index
            result[f"{metric}_first_query_s"] = round(time.perf_counter() - start, 2)
            times = []
            for query in prompts[: args.queries]:
                start = time.perf_counter()
                lib.query(query, "bench", metric, args.k)
                times.append(time.perf_counter() - start)
            ms = np.array(times) * 1e3
            result[metric] = {
                "p50_ms": round(float(np.percentile(ms, 50)), 3),
                "p99_ms": round(float(np.percentile(ms, 99)), 3),
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    parser.add_argument(
        "--d", type=int, default=576, help="key width (the default backbone's d_model)"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--data", choices=("lowrank", "uniform"), default="lowrank")
    parser.add_argument(
        "--hnsw-max",
        type=int,
        default=100_000,
        help="skip HNSW above this size (a 1M-key build did not finish on a 2-core machine)",
    )
    parser.add_argument(
        "--end-to-end", type=int, default=0, help="also time Library.query with this many keys"
    )
    parser.add_argument("--length", type=int, default=100, help="prompt length for --end-to-end")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((32, args.d), dtype=np.float32)
    config = {
        "d": args.d,
        "k": args.k,
        "data": args.data,
        "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH},
        "ivf": {"nprobe": IVF_NPROBE, "train_points_per_list": IVF_POINTS_PER_LIST},
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    print(
        json.dumps({"config": config, "cpus": os.cpu_count(), "load": os.getloadavg()}), flush=True
    )
    for n in args.sizes:
        for result in bench_size(n, args, rng, basis):
            print(json.dumps(result), flush=True)
    if args.end_to_end:
        print(json.dumps({"end_to_end": bench_end_to_end(args.end_to_end, args, rng)}), flush=True)


if __name__ == "__main__":
    main()
