"""Prompt similarity (SPoT task embeddings): every metric is an inner product of pooled vectors.

- "mean":  cos(mean_i a_i, mean_j b_j)          pool = unit(mean(a))         [d]
- "token": (1/L^2) sum_ij cos(a_i, b_j)        pool = mean(unit(a_i))        [d] (not renormalised)
- "flat":  cos(vec(a), vec(b))                  pool = unit(vec(a))           [L*d]

so `pool(a) @ pool(b)` is exactly the metric, and a key index is an inner-product index over
pooled keys. "delta-<metric>" applies <metric> to the displacement (key - start) of keys
trained from a shared start (see `library.protocol`). Zero vectors have cosine 0 with everything.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BASE_METRICS = ("mean", "token", "flat")
DELTA = "delta-"
METRICS = BASE_METRICS + tuple(DELTA + m for m in BASE_METRICS)
DEFAULT_METRIC = "token"  # retrieval's default everywhere (library, service, CLI, transfer)


def check_metric(metric: str) -> str:
    """`metric` if it is one of METRICS, else a ValueError naming the choices."""
    if metric not in METRICS:
        raise ValueError(f"unknown similarity metric {metric!r}; choose one of {METRICS}")
    return metric


def pooled_dim(metric: str, length: int, d_model: int) -> int:
    """Width of a pooled vector: d, or L*d for the flat metrics."""
    return length * d_model if check_metric(metric).endswith("flat") else d_model


def _unit(x: np.ndarray) -> np.ndarray:
    # divide by the largest |entry| first: the norm of a tiny vector loses precision to underflow
    scale = np.abs(x).max(axis=-1, keepdims=True)
    x = np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _pool64(prompts: Any, metric: str, start: Any = None) -> np.ndarray:
    x = np.asarray(prompts, dtype=np.float64)
    if check_metric(metric).startswith(DELTA):
        if start is None:
            raise ValueError(f"metric {metric!r} needs the keys' shared start prompt")
        x = x - np.asarray(start, dtype=np.float64)
        metric = metric.removeprefix(DELTA)
    if metric == "mean":
        return _unit(x.mean(axis=-2))
    if metric == "token":
        return _unit(x).mean(axis=-2)
    return _unit(x.reshape(*x.shape[:-2], -1))


def pool(prompts: Any, metric: str, start: Any = None) -> np.ndarray:
    """[..., L, d] prompts -> float32 vectors whose inner products are `metric`.

    `start` [L, d] is required by the delta metrics."""
    return _pool64(prompts, metric, start).astype(np.float32)


def similarity(a: Any, b: Any, metric: str, start: Any = None) -> float:
    """The `metric` similarity of two [L, d] prompts (float64 throughout)."""
    return float(_pool64(a, metric, start) @ _pool64(b, metric, start))


def top_k(query: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force search of one pooled query [d] over pooled keys [n, d] -> (indices, scores).

    Highest score first; ties keep key order.
    """
    scores = keys.astype(np.float64) @ query.astype(np.float64)
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]
