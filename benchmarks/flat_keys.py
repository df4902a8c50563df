"""The "flat" key metric's cost: an exact index over L*d-wide vectors (11,520 for SmolLM2, L=20).

For each library size: the flat index's memory (FAISS's vectors, n * width * 4 bytes, plus the
process's peak RSS), build time, one-query p50/p99 latency; and, as the way to shrink it, a
seeded Gaussian random projection to a few widths, with its recall@10 against exact search and
its own latency. Keys are synthetic: a random rank-`--rank` signal in the full space plus
isotropic noise of `--noise` times the signal's norm (real keys are few: see
studies/task_embeddings for their spectrum).

    .venv/bin/python benchmarks/flat_keys.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
from library_query import latencies  # benchmarks/ is on sys.path when run as a script

from library.index import KeyIndex

L, D, K = 20, 576, 10


def keys(n: int, width: int, rank: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    basis = rng.standard_normal((rank, width), dtype=np.float32)
    out = np.empty((n, width), np.float32)
    for lo in range(0, n, 10_000):  # in chunks: the noise of all keys at once doubles the peak
        x = rng.standard_normal((min(10_000, n - lo), rank), dtype=np.float32) @ basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        eps = rng.standard_normal(x.shape, dtype=np.float32)
        x += noise * eps / np.linalg.norm(eps, axis=1, keepdims=True)
        out[lo : lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 1152, 2304])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    width = L * D
    rows = []
    for n in args.sizes:
        data = keys(n + args.queries, width, args.rank, args.noise, rng)
        vectors, queries = data[:n], data[n:]
        start = time.perf_counter()
        index = KeyIndex.build("flat", width, np.arange(n), vectors, 0)
        build = time.perf_counter() - start
        lat, exact = latencies(index, queries, K)
        row = {"keys": n, "width": width, "index_mb": round(n * width * 4 / 2**20),
               "build_s": round(build, 2), **lat, "projections": []}
        del index
        for out in args.widths:
            projection = np.random.default_rng(1).standard_normal((width, out), dtype=np.float32)
            reduce = lambda x, p=projection: x @ p / np.linalg.norm(x @ p, axis=1, keepdims=True)  # noqa: E731
            small = KeyIndex.build("flat", out, np.arange(n), reduce(vectors), 0)
            lat, found = latencies(small, reduce(queries), K)
            row["projections"].append({"width": out, "index_mb": round(n * out * 4 / 2**20),
                                       "recall@10": round(recall(found, exact), 3), **lat})
        row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        rows.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
