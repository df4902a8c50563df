"""Prompt similarity (SPoT task embeddings): both metrics are inner products of pooled vectors.

- "mean":  cos(mean_i a_i, mean_j b_j)          pool = unit(mean(a))
- "token": (1/L^2) sum_ij cos(a_i, b_j)        pool = mean(unit(a_i)), not renormalised

so `pool(a) @ pool(b)` is exactly the metric, and a key index is an inner-product index over
pooled keys. Zero vectors count as having cosine 0 with everything.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METRICS = ("mean", "token")


def check_metric(metric: str) -> str:
    """`metric` if it is one of METRICS, else a ValueError naming the choices."""
    if metric not in METRICS:
        raise ValueError(f"unknown similarity metric {metric!r}; choose one of {METRICS}")
    return metric


def _unit(x: np.ndarray) -> np.ndarray:
    # divide by the largest |entry| first: the norm of a tiny vector loses precision to underflow
    scale = np.abs(x).max(axis=-1, keepdims=True)
    x = np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _pool64(prompts: Any, metric: str) -> np.ndarray:
    x = np.asarray(prompts, dtype=np.float64)
    if check_metric(metric) == "mean":
        return _unit(x.mean(axis=-2))
    return _unit(x).mean(axis=-2)


def pool(prompts: Any, metric: str) -> np.ndarray:
    """[..., L, d] prompts -> [..., d] float32 vectors whose inner products are `metric`."""
    return _pool64(prompts, metric).astype(np.float32)


def similarity(a: Any, b: Any, metric: str) -> float:
    """The `metric` similarity of two [L, d] prompts (float64 throughout)."""
    return float(_pool64(a, metric) @ _pool64(b, metric))


def top_k(query: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force search of one pooled query [d] over pooled keys [n, d] -> (indices, scores).

    Highest score first; ties keep key order.
    """
    scores = keys.astype(np.float64) @ query.astype(np.float64)
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]
