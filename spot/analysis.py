"""Transferability study analysis: reads a `spot study` folder (no JAX, numpy/scipy only).

A study folder holds
    results.jsonl     one row per (source, target, seed): baseline_score, transfer_score (the
                      task metric x 100; MCC down to -100), relative_error_reduction,
                      similarity {name: cosine of source key and target query},
                      zero_step_score (legacy rows: sim_mean / sim_token)
    weighted.jsonl    optional: SPoT's weighted top-k init per (target, seed)
    similarity.jsonl  {"a", "b", "metric": <similarity name>, "similarity"} for ordered pairs
    tasks.json        optional {task: {"family": str, "role": "source"|"target"|"both", ...}}
    study.json        optional settings (sources, targets, seeds, pick_seeds, k, pick_by, ...)

Conventions used throughout:
- relative error reduction (RER) = (e_base - e_transfer) / e_base with e = 100 - score; a perfect
  baseline (e_base <= 0) has nothing to reduce and gives 0.0 (`relative_error_reduction`, the one
  implementation: `spot.transfer` and `spot.study` use it).
- grid statistics (correlations, gain kept, random baselines, the summary) use complete
  (target, seed) groups only, those holding every source (`Study.complete_groups`); seeds that
  ran only a target's top picks, and unfinished targets, are left out of them.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from math import comb
from typing import Any

import numpy as np
from scipy import stats

from spot.analysis_io import (
    ALL_TARGETS,
    Row,
    Study,
    StudyError,
    WeightedRun,
    _ordered,
    load_study,
    relative_error_reduction,
)

# --------------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1; NaN for one value); (NaN, NaN) for none."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std


@dataclass(frozen=True)
class PairStats:
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
    similarity: dict[str, float]  # name -> mean over seeds
    zero_step: float | None  # mean of the measured zero-step scores, None when none

    def sim(self, name: str) -> float:
        if name not in self.similarity:
            raise ValueError(f"unknown similarity {name!r}; this pair has {list(self.similarity)}")
        return self.similarity[name]


def _pair(source: str, target: str, group: Sequence[Row]) -> PairStats:
    baseline, baseline_std = mean_std([r.baseline_score for r in group])
    transfer, transfer_std = mean_std([r.transfer_score for r in group])
    rer, rer_std = mean_std([r.relative_error_reduction for r in group])
    sims = {name: float(np.mean([r.similarity[name] for r in group]))
            for name in group[0].similarity}
    zero = [r.zero_step_score for r in group if r.zero_step_score is not None]
    return PairStats(source, target, len(group), baseline, baseline_std, transfer, transfer_std,
                     rer, rer_std, sims, float(np.mean(zero)) if zero else None)


def aggregate(study: Study, complete_only: bool = False) -> list[PairStats]:
    """Per (source, target) means and stds over seeds, in target-then-source order; over the
    complete groups only with `complete_only` (the grid statistics), else over every row."""
    rows = ([r for g in study.complete_groups().values() for r in g] if complete_only
            else study.rows)
    pairs: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        pairs.setdefault((row.source, row.target), []).append(row)
    return [_pair(source, target, pairs[source, target])
            for target in study.targets for source in study.sources if (source, target) in pairs]


def rer_matrix(study: Study) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(sources, targets, mean RER [sources, targets], std RER) over every seed run; NaN where a
    pair is missing."""
    sources, targets = study.sources, study.targets
    mean = np.full((len(sources), len(targets)), np.nan)
    std = np.full_like(mean, np.nan)
    for pair in aggregate(study):
        i, j = sources.index(pair.source), targets.index(pair.target)
        mean[i, j], std[i, j] = pair.rer, pair.rer_std
    return sources, targets, mean, std


def similarity_matrix(study: Study, name: str) -> tuple[list[str], np.ndarray]:
    """(tasks, [n, n] matrix) with matrix[i, j] = similarity(tasks[i], tasks[j]) from
    similarity.jsonl; NaN for a pair it lacks.

    Rows are `a`, columns `b`; the matrix need not be symmetric, and the diagonal is each task's
    self-similarity (1 for "mean", below 1 for "token").
    """
    if name not in study.similarity:
        raise ValueError(f"no similarity.jsonl rows for {name!r}; it has {list(study.similarity)}")
    pairs = study.similarity[name]
    tasks = _ordered({a for a, _ in pairs} | {b for _, b in pairs}, study._order)
    matrix = np.array([[pairs.get((a, b), np.nan) for b in tasks] for a in tasks], dtype=np.float64)
    return tasks, matrix


# --------------------------------------------------------------------------- correlation


@dataclass(frozen=True)
class Correlation:
    """Pearson r and Spearman rho (two-sided p) of x vs y over one target's sources; NaN with a
    `note` when undefined. `metric` names x: a similarity name, or "zero_step"."""

    target: str  # a target task, or ALL_TARGETS for the pooled correlation
    metric: str
    n: int
    r: float
    p: float
    rho: float
    rho_p: float
    note: str = ""


def _undefined(x: np.ndarray, y: np.ndarray, labels: tuple[str, str]) -> str:
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of equal length, got {x.shape}, {y.shape}")
    if x.size < 2:
        return f"undefined: {x.size} point(s)"
    constant = [label for label, a in zip(labels, (x, y), strict=True)
                if np.ptp(a) <= 1e-12 * max(1.0, float(np.abs(a).max()))]
    return f"undefined: constant {' and '.join(constant)}" if constant else ""


def _correlate(method, x: Sequence[float], y: Sequence[float],
               labels: tuple[str, str]) -> tuple[float, float, str]:
    x_arr, y_arr = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    note = _undefined(x_arr, y_arr, labels)
    if note:
        return math.nan, math.nan, note
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = method(x_arr, y_arr)
    note = "only 2 points: r is +-1 by construction" if x_arr.size == 2 else ""
    return float(result.statistic), float(result.pvalue), note


def pearson(x: Sequence[float], y: Sequence[float],
            labels: tuple[str, str] = ("similarity", "transfer")) -> tuple[float, float, str]:
    """(r, p, note): scipy.stats.pearsonr, but NaN and a note instead of errors and warnings.

    Undefined for fewer than 2 points or a constant input (the note names it by `labels`); with
    exactly 2 points r is +-1 by construction and p is 1, which the note says.
    """
    return _correlate(stats.pearsonr, x, y, labels)


def spearman(x: Sequence[float], y: Sequence[float],
             labels: tuple[str, str] = ("similarity", "transfer")) -> tuple[float, float, str]:
    """(rho, p, note): scipy.stats.spearmanr (ties: average ranks), undefined cases as `pearson`."""
    return _correlate(stats.spearmanr, x, y, labels)


def correlate(target: str, metric: str, x: Sequence[float], y: Sequence[float],
              labels: tuple[str, str] = ("similarity", "transfer")) -> Correlation:
    """Both correlations of x vs y as one `Correlation`."""
    r, p, note = pearson(x, y, labels)
    rho, rho_p, _ = spearman(x, y, labels)
    return Correlation(target, metric, len(x), r, p, rho, rho_p, note)


def correlations(study: Study, name: str) -> list[Correlation]:
    """Similarity `name` vs RER per complete target (over its sources) and pooled over them
    (ALL_TARGETS, last). One point per source -> target pair: similarity and RER both averaged
    over the complete groups' seeds; self transfers are left out."""
    study.check_name(name)
    pairs = [p for p in aggregate(study, complete_only=True) if p.source != p.target]
    out = []
    for target in [*study.complete_targets, ALL_TARGETS]:
        chosen = pairs if target == ALL_TARGETS else [p for p in pairs if p.target == target]
        out.append(correlate(target, name, [c.sim(name) for c in chosen], [c.rer for c in chosen]))
    return out


# --------------------------------------------------------------------------- retrieval


@dataclass(frozen=True)
class TargetGrid:
    """One target's complete groups as arrays, sources in study order (self left out)."""

    target: str
    sources: list[str]
    seeds: list[int]
    baseline: np.ndarray  # [seeds], mean of the group's baseline scores
    scores: np.ndarray  # [seeds, sources] transfer scores
    rer: np.ndarray  # [seeds, sources]
    similarity: dict[str, np.ndarray]  # name -> [seeds, sources]
    zero_step: np.ndarray  # [sources] mean measured zero-step score, NaN when not measured

    @property
    def oracle(self) -> np.ndarray:
        return self.scores.max(axis=1)

    @property
    def room(self) -> np.ndarray:
        """[seeds] whether some source beats the baseline: where gain kept is defined."""
        return self.oracle > self.baseline

    def ranking(self, name: str) -> np.ndarray:
        """[seeds, sources] source indices by `name` similarity, highest first (ties: order)."""
        return np.argsort(-self.similarity[name], axis=1, kind="stable")


def target_grids(study: Study) -> list[TargetGrid]:
    """The complete groups of each target, in study target order."""
    grouped: dict[str, list[tuple[int, list[Row]]]] = {}
    for (target, seed), group in study.complete_groups().items():
        grouped.setdefault(target, []).append((seed, group))
    out = []
    for target, seeded in grouped.items():
        sources = study.expected_sources(target)
        rows = [[next(r for r in group if r.source == s) for s in sources] for _, group in seeded]
        zero = [[r.zero_step_score for r in column if r.zero_step_score is not None]
                for column in zip(*rows, strict=True)]
        out.append(TargetGrid(
            target, sources, [seed for seed, _ in seeded],
            np.array([np.mean([r.baseline_score for r in group]) for _, group in seeded]),
            np.array([[r.transfer_score for r in line] for line in rows]),
            np.array([[r.relative_error_reduction for r in line] for line in rows]),
            {name: np.array([[r.similarity[name] for r in line] for line in rows])
             for name in study.similarity_names},
            np.array([np.mean(z) if z else np.nan for z in zero])))
    return out


def gain_kept(best: Any, oracle: Any, baseline: Any) -> np.ndarray:
    """(best - baseline) / (oracle - baseline), elementwise; NaN (undefined: there is no gain
    to keep) where oracle <= baseline."""
    best, oracle, baseline = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64)
                                                   for a in (best, oracle, baseline)))
    room = oracle - baseline
    return np.divide(best - baseline, room, out=np.full(room.shape, np.nan), where=room > 0)


def with_room(grids: Sequence[TargetGrid]) -> list[TargetGrid]:
    """The grids where some source beats the baseline at some seed: those with a gain to keep."""
    return [g for g in grids if g.room.any()]


def expected_random_best(scores: Sequence[float], k: int) -> float:
    """E[max of k scores drawn without replacement]: sum_i s_(i) C(i-1, k-1) / C(n, k)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = ordered.size
    k = min(k, n)
    weights = np.array([comb(i - 1, k - 1) for i in range(1, n + 1)], dtype=np.float64)
    return float(ordered @ weights / comb(n, k))


def grid_gain(grid: TargetGrid, name: str, k: int) -> float:
    """Gain kept by the best of the top-k by `name`, mean over the grid's seeds with room."""
    ranked = np.take_along_axis(grid.scores, grid.ranking(name), axis=1)
    best = ranked[:, :min(k, ranked.shape[1])].max(axis=1)
    return float(gain_kept(best, grid.oracle, grid.baseline)[grid.room].mean())


def grid_random_gain(grid: TargetGrid, k: int) -> float:
    """Expected gain kept by k sources drawn uniformly at random, mean over the grid's seeds
    with room."""
    best = [expected_random_best(line, k) for line in grid.scores]
    return float(gain_kept(best, grid.oracle, grid.baseline)[grid.room].mean())


@dataclass(frozen=True)
class RetrievalCurve:
    """Fraction of the achievable gain kept by best-of-top-k retrieval, k = 1..K.

    For one target and complete seed, sources are ranked by similarity (highest first),
    best_k = the best transfer score among the top k, oracle = the best over all sources, and
        gain_kept(k) = (best_k - baseline) / (oracle - baseline).
    When oracle <= baseline no source improves on the baseline: there is no gain to keep, and
    that seed is left out (a target with no such seed is left out of `per_target`). It can be
    negative when the retrieved sources are worse than the baseline while another source is
    better; it is not clipped. gain_kept(K) = 1 always.
    Averaged over seeds per target (`per_target`), then over targets (`mean`, `std` across
    targets). `random` is the exact expectation for k sources drawn uniformly at random, the
    reference a similarity metric has to beat. For a target with fewer than k sources, top-k
    takes all of them.
    """

    metric: str
    ks: np.ndarray  # [K] = 1..K
    mean: np.ndarray  # [K]
    std: np.ndarray  # [K], across targets (ddof=1; NaN for one target)
    random: np.ndarray  # [K], expected gain kept by k random sources, averaged the same way
    per_target: dict[str, np.ndarray]  # target -> [K], averaged over seeds


NO_GROUP = "no complete (target, seed) group (every source run on a target at one seed) to rank"
NO_GAIN = "no source beats the baseline on any target: there is no gain to keep"


def no_retrieval(grids: Sequence[TargetGrid]) -> str | None:
    """Why `grids` leave retrieval nothing to measure (NO_GROUP, NO_GAIN), else None."""
    if not grids:
        return NO_GROUP
    return None if with_room(grids) else NO_GAIN


def _grids_or_raise(study: Study) -> list[TargetGrid]:
    """The complete targets with a gain to keep (`with_room`), else a ValueError saying why."""
    grids = target_grids(study)
    if why := no_retrieval(grids):
        raise ValueError(f"{study.path}: {why}")
    return with_room(grids)


def retrieval_curve(study: Study, name: str, k_max: int | None = None) -> RetrievalCurve:
    """Best-of-top-k retrieval by `name` similarity (see `RetrievalCurve`)."""
    study.check_name(name)
    grids = _grids_or_raise(study)
    ks = np.arange(1, (k_max or max(len(g.sources) for g in grids)) + 1)
    per_target = {g.target: np.array([grid_gain(g, name, k) for k in ks]) for g in grids}
    stacked = np.stack(list(per_target.values()))
    std = stacked.std(axis=0, ddof=1) if len(grids) > 1 else np.full(len(ks), np.nan)
    random = np.mean([[grid_random_gain(g, k) for k in ks] for g in grids], axis=0)
    return RetrievalCurve(name, ks, stacked.mean(axis=0), std, random, per_target)


def retrieval_table(study: Study) -> list[dict[str, Any]]:
    """One row per k: {"k", <each similarity name>: mean gain kept, "gain_random"}."""
    curves = [retrieval_curve(study, name) for name in study.similarity_names]
    return [{"k": int(k), **{c.metric: float(c.mean[i]) for c in curves},
             "gain_random": float(curves[0].random[i])} for i, k in enumerate(curves[0].ks)]


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class SummaryRow:
    """Per target: the best source by mean transfer score over its complete seeds, its numbers,
    and `top_source`, the source similarity retrieval would pick first (by the summary's name).

    `rer` is the mean over seeds of the per-seed RER (the heatmap's number), which is not in
    general the RER of the mean scores.
    """

    target: str
    best_source: str
    baseline: float
    best_transfer: float
    rer: float
    n_seeds: int
    baseline_std: float
    best_transfer_std: float
    top_source: str


def summary_table(study: Study, name: str | None = None) -> list[SummaryRow]:
    """One row per complete target (self transfers left out), in study target order;
    `top_source` by `name` (default: `Study.pick_by`)."""
    name = study.check_name(name or study.pick_by)
    out = []
    pairs = [p for p in aggregate(study, complete_only=True) if p.source != p.target]
    for target in study.complete_targets:
        mine = [p for p in pairs if p.target == target]
        best = max(mine, key=lambda p: p.transfer)  # first one on ties (source order)
        top = max(mine, key=lambda p: p.sim(name))
        out.append(SummaryRow(target, best.source, best.baseline, best.transfer, best.rer,
                              best.n_seeds, best.baseline_std, best.transfer_std, top.source))
    return out


def format_table(rows: Sequence[Any], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """Plain-text table of dataclass or mapping rows (floats with `digits` decimals, tiny ones
    as 1.2e-05)."""
    if not rows:
        return "(no rows)"
    first = rows[0]
    columns = list(columns or ([f.name for f in fields(first)] if is_dataclass(first)
                               else list(first)))

    def get(row: Any, column: str) -> Any:
        return row[column] if isinstance(row, Mapping) else getattr(row, column)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            if 0 < abs(value) < 0.5 * 10.0 ** -digits:  # e.g. tiny p values: not 0.000
                return f"{value:.1e}"
            return f"{value:.{digits}f}"
        return str(value)

    body = [[cell(get(row, c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(lines)


__all__ = [
    "ALL_TARGETS", "NO_GAIN", "NO_GROUP", "Correlation", "PairStats", "RetrievalCurve", "Row",
    "Study", "StudyError", "SummaryRow", "TargetGrid", "WeightedRun", "aggregate", "correlate",
    "correlations", "expected_random_best", "format_table", "gain_kept", "grid_gain",
    "grid_random_gain", "load_study", "mean_std", "no_retrieval", "pearson",
    "relative_error_reduction", "rer_matrix", "retrieval_curve", "retrieval_table",
    "similarity_matrix", "spearman", "summary_table", "target_grids", "with_room",
]
