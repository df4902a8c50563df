"""Transferability study analysis: reads a `spot study` folder (no JAX, numpy/scipy only).

A study folder holds
    results.jsonl     one row per (source, target, seed): baseline_score, transfer_score (0-100),
                      relative_error_reduction, sim_mean / sim_token (source key vs target query)
    similarity.jsonl  {"a", "b", "metric": "mean"|"token", "similarity"} for every ordered pair
    tasks.json        optional {task: {"family": str, "role": "source"|"target"|"both", ...}}

Conventions used throughout:
- relative error reduction (RER) = (e_base - e_transfer) / e_base with e = 100 - score; a perfect
  baseline (e_base <= 0) has nothing to reduce and gives 0.0 (`relative_error_reduction`, the one
  implementation: `spot.transfer` and `spot.study` use it).
- means over seeds first (per source x target pair), then over targets, so every target weighs
  the same whatever its number of seeds; std is the sample std (ddof=1), NaN for a single seed.
- self-transfer rows (source == target, a task with role "both") stay in `Study.rows` and in the
  RER matrix, but are left out of correlations, retrieval curves and the summary: a target is
  never retrieved for itself.
- retrieval ranks sources by similarity, highest first; ties keep the source order of the study.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from math import comb
from typing import Any

import numpy as np
from scipy import stats

from spot.analysis_io import (
    ALL_TARGETS,
    STUDY_METRICS,
    Row,
    Study,
    StudyError,
    _check_metric,
    _groups,
    _KeySimilarities,
    _ordered,
    load_study,
    relative_error_reduction,
)

# --------------------------------------------------------------------------- aggregation


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std


@dataclass(frozen=True)
class PairStats(_KeySimilarities):
    """One source -> target pair aggregated over its seeds (std: ddof=1, NaN for one seed)."""

    source: str
    target: str
    n_seeds: int
    baseline: float
    baseline_std: float
    transfer: float
    transfer_std: float
    rer: float
    rer_std: float
    sim_mean: float
    sim_token: float


def aggregate(study: Study) -> list[PairStats]:
    """Per (source, target) means and stds over seeds, in target-then-source order."""
    pairs: dict[tuple[str, str], list[Row]] = {}
    for row in study.rows:
        pairs.setdefault((row.source, row.target), []).append(row)
    out = []
    for target in study.targets:
        for source in study.sources:
            group = pairs.get((source, target))
            if not group:
                continue
            baseline, baseline_std = _mean_std([r.baseline_score for r in group])
            transfer, transfer_std = _mean_std([r.transfer_score for r in group])
            rer, rer_std = _mean_std([r.relative_error_reduction for r in group])
            out.append(PairStats(
                source, target, len(group), baseline, baseline_std, transfer, transfer_std,
                rer, rer_std, float(np.mean([r.sim_mean for r in group])),
                float(np.mean([r.sim_token for r in group]))))
    return out


def rer_matrix(study: Study) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(sources, targets, mean RER [sources, targets], std RER); NaN where a pair is missing."""
    sources, targets = study.sources, study.targets
    mean = np.full((len(sources), len(targets)), np.nan)
    std = np.full_like(mean, np.nan)
    for pair in aggregate(study):
        i, j = sources.index(pair.source), targets.index(pair.target)
        mean[i, j], std[i, j] = pair.rer, pair.rer_std
    return sources, targets, mean, std


def similarity_matrix(study: Study, metric: str) -> tuple[list[str], np.ndarray]:
    """(tasks, [n, n] matrix) with matrix[i, j] = similarity(tasks[i], tasks[j]) from similarity.jsonl.

    Rows are `a`, columns `b`; the matrix need not be symmetric, and the diagonal is each task's
    self-similarity (1 for "mean", below 1 for "token").
    """
    pairs = study.similarity[_check_metric(metric)]
    tasks = _ordered({a for a, _ in pairs}, study._order)
    matrix = np.array([[pairs[a, b] for b in tasks] for a in tasks], dtype=np.float64)
    return tasks, matrix


# --------------------------------------------------------------------------- correlation


@dataclass(frozen=True)
class Correlation:
    """Pearson r and two-sided p of similarity vs RER; NaN with a `note` when undefined."""

    target: str  # a target task, or ALL_TARGETS for the pooled correlation
    metric: str
    n: int
    r: float
    p: float
    note: str = ""


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, str]:
    """(r, p, note): scipy.stats.pearsonr, but NaN and a note instead of errors and warnings.

    Undefined for fewer than 2 points or a constant input; with exactly 2 points r is +-1 by
    construction and p is 1, which the note says.
    """
    x_arr, y_arr = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x_arr.shape != y_arr.shape or x_arr.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of equal length, got {x_arr.shape}, {y_arr.shape}")
    n = x_arr.size
    if n < 2:
        return math.nan, math.nan, f"undefined: {n} point(s)"
    constant = [name for name, a in (("similarity", x_arr), ("transfer", y_arr))
                if np.ptp(a) <= 1e-12 * max(1.0, float(np.abs(a).max()))]
    if constant:
        return math.nan, math.nan, f"undefined: constant {' and '.join(constant)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.pearsonr(x_arr, y_arr)
    note = "only 2 points: r is +-1 by construction" if n == 2 else ""
    return float(result.statistic), float(result.pvalue), note


def correlations(study: Study, metric: str) -> list[Correlation]:
    """Per target (over its sources) and pooled over all targets (ALL_TARGETS, last).

    One point per source -> target pair: similarity and RER both averaged over seeds; self
    transfers are left out.
    """
    pairs = [p for p in aggregate(study) if p.source != p.target]
    out = []
    for target in [*study.targets, ALL_TARGETS]:
        chosen = pairs if target == ALL_TARGETS else [p for p in pairs if p.target == target]
        r, p, note = pearson([c.sim(metric) for c in chosen], [c.rer for c in chosen])
        out.append(Correlation(target, metric, len(chosen), r, p, note))
    return out


# --------------------------------------------------------------------------- retrieval


@dataclass(frozen=True)
class RetrievalCurve:
    """Fraction of the achievable gain kept by best-of-top-k retrieval, k = 1..K.

    For one target and seed, sources are ranked by similarity (highest first), best_k = the best
    transfer score among the top k, oracle = the best over all sources, and
        gain_kept(k) = (best_k - baseline) / (oracle - baseline).
    When oracle <= baseline no source improves on the baseline, so there is no gain to lose and
    gain_kept is 1.0 for every k. It can be negative when the retrieved sources are worse than
    the baseline while another source is better; it is not clipped. gain_kept(K) = 1 always.
    Averaged over seeds per target (`per_target`), then over targets (`mean`, `std` across
    targets). `random` is the exact expectation for k sources drawn uniformly at random, the
    reference a similarity metric has to beat. For a target with fewer than k sources (a partial
    grid), top-k takes all of them.
    """

    metric: str
    ks: np.ndarray  # [K] = 1..K
    mean: np.ndarray  # [K]
    std: np.ndarray  # [K], across targets (ddof=1; NaN for one target)
    random: np.ndarray  # [K], expected gain kept by k random sources, averaged the same way
    per_target: dict[str, np.ndarray]  # target -> [K], averaged over seeds


def _gain(best: float, oracle: float, baseline: float) -> float:
    if oracle <= baseline:
        return 1.0
    return (best - baseline) / (oracle - baseline)


def expected_random_best(scores: Sequence[float], k: int) -> float:
    """E[max of k scores drawn without replacement]: sum_i s_(i) C(i-1, k-1) / C(n, k)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = ordered.size
    k = min(k, n)
    weights = np.array([comb(i - 1, k - 1) for i in range(1, n + 1)], dtype=np.float64)
    return float(ordered @ weights / comb(n, k))


def retrieval_curve(study: Study, metric: str, k_max: int | None = None) -> RetrievalCurve:
    """Best-of-top-k retrieval by `metric` similarity (see `RetrievalCurve`)."""
    _check_metric(metric)
    groups = _groups(study.rows, include_self=False)
    if not groups:
        raise ValueError("no (non-self) transfer rows to rank")
    rank = {name: i for i, name in enumerate(study.sources)}
    k_max = k_max or max(len(g) for g in groups.values())
    ks = np.arange(1, k_max + 1)
    per_seed: dict[str, list[np.ndarray]] = {}
    per_seed_random: dict[str, list[np.ndarray]] = {}
    for (target, _seed), group in groups.items():
        ranked = sorted(group, key=lambda r: (-r.sim(metric), rank[r.source]))
        scores = np.array([r.transfer_score for r in ranked])
        baseline = float(np.mean([r.baseline_score for r in group]))
        oracle = float(scores.max())
        best = np.maximum.accumulate(scores)
        curve = [_gain(best[min(k, len(scores)) - 1], oracle, baseline) for k in ks]
        chance = [_gain(expected_random_best(scores, k), oracle, baseline) for k in ks]
        per_seed.setdefault(target, []).append(np.array(curve))
        per_seed_random.setdefault(target, []).append(np.array(chance))
    targets = [t for t in study.targets if t in per_seed]
    per_target = {t: np.mean(per_seed[t], axis=0) for t in targets}
    stacked = np.stack([per_target[t] for t in targets])
    std = stacked.std(axis=0, ddof=1) if len(targets) > 1 else np.full(len(ks), np.nan)
    random = np.mean([np.mean(per_seed_random[t], axis=0) for t in targets], axis=0)
    return RetrievalCurve(metric, ks, stacked.mean(axis=0), std, random, per_target)


@dataclass(frozen=True)
class RetrievalRow:
    """Mean gain kept at k when ranking by each metric, and by k random sources (expected)."""

    k: int
    gain_mean: float
    gain_token: float
    gain_random: float


def retrieval_table(study: Study) -> list[RetrievalRow]:
    """The retrieval curves of both metrics side by side, one row per k."""
    mean, token = (retrieval_curve(study, metric) for metric in STUDY_METRICS)
    return [RetrievalRow(int(k), float(a), float(b), float(c))
            for k, a, b, c in zip(mean.ks, mean.mean, token.mean, mean.random, strict=True)]


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class SummaryRow:
    """Per target: the best source by mean transfer score over seeds, and its numbers.

    `rer` is the mean over seeds of the per-seed RER (the heatmap's number), which is not in
    general the RER of the mean scores. `top_source_mean` / `top_source_token` are the sources
    that similarity retrieval would pick first (similarity averaged over seeds).
    """

    target: str
    best_source: str
    baseline: float
    best_transfer: float
    rer: float
    n_seeds: int
    baseline_std: float
    best_transfer_std: float
    top_source_mean: str
    top_source_token: str


def summary_table(study: Study) -> list[SummaryRow]:
    """One row per target (self transfers left out), in study target order."""
    out = []
    pairs = [p for p in aggregate(study) if p.source != p.target]
    for target in study.targets:
        mine = [p for p in pairs if p.target == target]
        if not mine:
            continue
        best = max(mine, key=lambda p: p.transfer)  # first one on ties (source order)
        by_mean = max(mine, key=lambda p: p.sim_mean)
        by_token = max(mine, key=lambda p: p.sim_token)
        out.append(SummaryRow(target, best.source, best.baseline, best.transfer, best.rer,
                              best.n_seeds, best.baseline_std, best.transfer_std,
                              by_mean.source, by_token.source))
    return out


def format_table(rows: Sequence[Any], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """Plain-text table of dataclass rows (floats with `digits` decimals, tiny ones as 1.2e-05)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or [f.name for f in fields(rows[0])])

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            if 0 < abs(value) < 0.5 * 10.0 ** -digits:  # e.g. tiny p values: not 0.000
                return f"{value:.1e}"
            return f"{value:.{digits}f}"
        return str(value)

    body = [[cell(getattr(row, c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(lines)


__all__ = [
    "ALL_TARGETS", "STUDY_METRICS", "Correlation", "PairStats", "RetrievalCurve", "RetrievalRow",
    "Row", "Study", "StudyError", "SummaryRow", "aggregate", "correlations",
    "expected_random_best", "format_table", "load_study", "pearson", "relative_error_reduction",
    "rer_matrix", "retrieval_curve", "retrieval_table", "similarity_matrix", "summary_table",
]
