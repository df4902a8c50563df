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

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

STUDY_METRICS = ("mean", "token")  # what a study records (sim_mean, sim_token): a subset of
# library.similarity.METRICS, the metrics a library can query by
ROLES = ("source", "target", "both")
RESULTS_FILE = "results.jsonl"
SIMILARITY_FILE = "similarity.jsonl"
TASKS_FILE = "tasks.json"
ALL_TARGETS = "all"  # `Correlation.target` of the pooled (over all targets) correlation

_RESULT_FIELDS: dict[str, type] = {
    "source": str, "target": str, "seed": int, "metric": str, "steps": int,
    "baseline_score": float, "transfer_score": float, "relative_error_reduction": float,
    "sim_mean": float, "sim_token": float,
}
_SIMILARITY_FIELDS: dict[str, type] = {"a": str, "b": str, "metric": str, "similarity": float}
_RER_TOLERANCE = 1e-4  # stored vs recomputed RER (scores may have been rounded)
_COSINE_SLACK = 1e-5  # cosines a little outside [-1, 1] from float32 rounding


class StudyError(ValueError):
    """A study file is missing or malformed; the message names the file and line."""


class _KeySimilarities:
    """The similarities of a source key and a target query, by metric."""

    sim_mean: float
    sim_token: float

    def sim(self, metric: str) -> float:
        """The `metric` similarity of the source key and the target query."""
        return self.sim_mean if _check_metric(metric) == "mean" else self.sim_token


@dataclass(frozen=True)
class Row(_KeySimilarities):
    """One (source, target, seed) transfer."""

    source: str
    target: str
    seed: int
    metric: str
    steps: int
    baseline_score: float
    transfer_score: float
    relative_error_reduction: float
    sim_mean: float
    sim_token: float

    @property
    def self_transfer(self) -> bool:
        return self.source == self.target


@dataclass
class Study:
    """A loaded study folder. Task lists follow tasks.json order, then first appearance."""

    path: Path
    rows: list[Row]
    similarity: dict[str, dict[tuple[str, str], float]]  # metric -> (a, b) -> cosine
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # non-fatal findings of the loader

    @property
    def sources(self) -> list[str]:
        return _ordered({r.source for r in self.rows}, self._order)

    @property
    def targets(self) -> list[str]:
        return _ordered({r.target for r in self.rows}, self._order)

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.rows})

    @property
    def all_tasks(self) -> list[str]:
        names = {r.source for r in self.rows} | {r.target for r in self.rows}
        for pairs in self.similarity.values():
            names |= {a for a, _ in pairs}
        return _ordered(names, self._order)

    @property
    def synthetic(self) -> bool:
        """True when tasks.json marks the study (or any task in it) as synthetic example data."""
        return any(bool(meta.get("synthetic")) for meta in self.tasks.values())

    def family(self, task: str) -> str | None:
        return self.tasks.get(task, {}).get("family")

    @property
    def _order(self) -> list[str]:
        seen = list(self.tasks)
        for row in self.rows:
            seen += [row.source, row.target]
        for pairs in self.similarity.values():
            for a, b in pairs:
                seen += [a, b]
        return list(dict.fromkeys(seen))


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _check_metric(metric: str) -> str:
    if metric not in STUDY_METRICS:
        raise ValueError(f"unknown similarity metric {metric!r}; choose one of {STUDY_METRICS}")
    return metric


# --------------------------------------------------------------------------- loading


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise StudyError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise StudyError(f"{path.name} line {number}: invalid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise StudyError(f"{path.name} line {number}: expected a JSON object")
            rows.append((number, row))
    if not rows:
        raise StudyError(f"{path}: no rows")
    return rows


def _typed(row: dict[str, Any], spec: dict[str, type], where: str) -> dict[str, Any]:
    missing = [name for name in spec if name not in row]
    if missing:
        raise StudyError(f"{where}: missing field(s) {', '.join(missing)}")
    out = {}
    for name, kind in spec.items():
        value = row[name]
        if kind is str:
            if not isinstance(value, str) or not value:
                raise StudyError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise StudyError(f"{where}: field {name!r} must be an integer, got {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise StudyError(f"{where}: field {name!r} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise StudyError(f"{where}: field {name!r} is not finite ({value})")
        out[name] = value
    return out


def relative_error_reduction(baseline: float, transfer: float) -> float:
    """(e_base - e_transfer) / e_base with e = 100 - score; 0.0 when the baseline is perfect."""
    error = 100.0 - float(baseline)
    if error <= 0:
        return 0.0
    return (error - (100.0 - float(transfer))) / error


def _load_results(path: Path, notes: list[str]) -> list[Row]:
    rows: list[Row] = []
    seen: dict[tuple[str, str, int], int] = {}
    for number, raw in _read_jsonl(path):
        where = f"{path.name} line {number}"
        values = _typed(raw, _RESULT_FIELDS, where)
        for name in ("baseline_score", "transfer_score"):
            if not 0.0 <= values[name] <= 100.0:
                raise StudyError(f"{where}: {name} {values[name]} is outside the 0-100 scale")
        for name in ("sim_mean", "sim_token"):
            if abs(values[name]) > 1.0 + _COSINE_SLACK:
                raise StudyError(f"{where}: {name} {values[name]} is not a cosine in [-1, 1]")
        key = (values["source"], values["target"], values["seed"])
        if key in seen:
            raise StudyError(f"{where}: duplicate row for source {key[0]!r}, target {key[1]!r}, "
                             f"seed {key[2]} (first on line {seen[key]})")
        seen[key] = number
        expected = relative_error_reduction(values["baseline_score"], values["transfer_score"])
        if abs(expected - values["relative_error_reduction"]) > _RER_TOLERANCE:
            notes.append(f"{where}: relative_error_reduction {values['relative_error_reduction']:.6g}"
                         f" differs from the one recomputed from the scores ({expected:.6g})")
        rows.append(Row(**values))
    return rows


def _load_similarity(path: Path, tasks: set[str]) -> dict[str, dict[tuple[str, str], float]]:
    table: dict[str, dict[tuple[str, str], float]] = {metric: {} for metric in STUDY_METRICS}
    lines: dict[tuple[str, str, str], int] = {}
    for number, raw in _read_jsonl(path):
        where = f"{path.name} line {number}"
        values = _typed(raw, _SIMILARITY_FIELDS, where)
        metric, a, b = values["metric"], values["a"], values["b"]
        if metric not in STUDY_METRICS:
            raise StudyError(f"{where}: metric {metric!r} is not one of {STUDY_METRICS}")
        if abs(values["similarity"]) > 1.0 + _COSINE_SLACK:
            raise StudyError(f"{where}: similarity {values['similarity']} is not a cosine")
        if (metric, a, b) in lines:
            raise StudyError(f"{where}: duplicate pair ({a!r}, {b!r}) for metric {metric!r} "
                             f"(first on line {lines[metric, a, b]})")
        lines[metric, a, b] = number
        table[metric][a, b] = values["similarity"]
    names = set(tasks)
    for pairs in table.values():
        names |= {a for a, _ in pairs} | {b for _, b in pairs}
    for metric, pairs in table.items():
        missing = [(a, b) for a in sorted(names) for b in sorted(names) if (a, b) not in pairs]
        if missing:
            raise StudyError(f"{path.name}: {len(missing)} of {len(names) ** 2} ordered pairs "
                             f"missing for metric {metric!r}, e.g. {missing[0]}")
    return table


def _load_tasks(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise StudyError(f"{path.name}: invalid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(meta, dict):
        raise StudyError(f"{path.name}: expected an object {{task: {{family, role}}}}")
    for task, entry in meta.items():
        if not isinstance(entry, dict):
            raise StudyError(f"{path.name}: entry for {task!r} must be an object")
        if "family" in entry and not isinstance(entry["family"], str):
            raise StudyError(f"{path.name}: family of {task!r} must be a string")
        if "role" in entry and entry["role"] not in ROLES:
            raise StudyError(f"{path.name}: role of {task!r} must be one of {ROLES}, "
                             f"got {entry['role']!r}")
    return meta


def load_study(path: str | Path) -> Study:
    """Read and validate a study folder; `StudyError` (a ValueError) names file and line.

    Non-fatal findings (an incomplete source x target x seed grid, per-source differences of a
    target's baseline, stored RER that disagrees with the scores) go to `Study.notes` and are
    also issued as warnings.
    """
    path = Path(path)
    if not path.is_dir():
        raise StudyError(f"{path}: not a study folder")
    notes: list[str] = []
    tasks = _load_tasks(path / TASKS_FILE)
    rows = _load_results(path / RESULTS_FILE, notes)
    if not (path / SIMILARITY_FILE).is_file():
        raise StudyError(f"{path / SIMILARITY_FILE}: file not found (`spot study` writes it when "
                         "every transfer is done: is the study unfinished?)")
    names = {r.source for r in rows} | {r.target for r in rows}
    similarity = _load_similarity(path / SIMILARITY_FILE, names)
    study = Study(path=path, rows=rows, similarity=similarity, tasks=tasks, notes=notes)
    _check_grid(study)
    for note in notes:
        warnings.warn(f"{path}: {note}", stacklevel=2)
    return study


def _check_grid(study: Study) -> None:
    have = {(r.source, r.target, r.seed) for r in study.rows}
    missing = [(s, t, seed) for t in study.targets for seed in study.seeds for s in study.sources
               if (s, t, seed) not in have]
    if missing:
        study.notes.append(f"incomplete grid: {len(missing)} (source, target, seed) rows missing, "
                           f"e.g. {missing[0]}; aggregates use the rows present")
    for (target, seed), group in _groups(study.rows, include_self=True).items():
        baselines = {r.baseline_score for r in group}
        if max(baselines) - min(baselines) > 1e-9:
            study.notes.append(f"target {target!r} seed {seed}: baseline_score differs between "
                               f"sources ({min(baselines)} .. {max(baselines)}); using the mean")


def _groups(rows: Iterable[Row], include_self: bool) -> dict[tuple[str, int], list[Row]]:
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        if include_self or not row.self_transfer:
            groups.setdefault((row.target, row.seed), []).append(row)
    return groups


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
