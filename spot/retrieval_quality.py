"""Retrieval quality of a study: does a similarity name pick the sources that transfer well?

Per similarity name, over the complete (target, seed) groups (see `spot.analysis`):
- Spearman rho and Pearson r of similarity vs relative error reduction per target, and their
  mean over the targets where they are defined;
- gain kept at k (best of the top-k vs the oracle, `spot.analysis.gain_kept`), mean over
  the targets where some source beats the baseline (elsewhere it is undefined), against k
  sources drawn at random (the exact expectation over all k-subsets) and a permutation p-value:
  each target's source order is shuffled independently, the mean gain kept recomputed,
  p = (1 + #{shuffled >= observed}) / (1 + n_permutations);
- with zero-step scores (each source value scored untuned on the target): similarity vs the
  zero-step score, and the zero-step score vs RER (does the cheap grid predict the tuned one).
Per target: baseline, transfer range, best source, sources above the baseline. Over every
seed run: SPoT's weighted top-k init vs the baseline (`weighted_table`), and each
target's top picks vs the baseline (`pick_table`). `retrieval_quality_markdown` renders it all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from spot.analysis import (
    ALL_TARGETS,
    Correlation,
    Study,
    TargetGrid,
    aggregate,
    correlate,
    correlations,
    gain_kept,
    grid_gain,
    grid_random_gain,
    mean_std,
    target_grids,
    with_room,
)
from spot.analysis_io import _ordered

N_PERMUTATIONS = 10_000
KS = (1, 3)
ZERO_STEP = "zero_step"  # `Correlation.metric` of zero-step score vs RER
DASH = "–"


@dataclass(frozen=True)
class MeanCorrelation:
    """Per-target correlations averaged over the targets where they are defined (`n`)."""

    n: int
    rho: float  # mean Spearman rho
    r: float  # mean Pearson r


def mean_correlation(found: Sequence[Correlation]) -> MeanCorrelation:
    """Mean of the per-target rho and r (the pooled ALL_TARGETS entry is left out)."""
    per = [c for c in found if c.target != ALL_TARGETS]
    rho = [c.rho for c in per if math.isfinite(c.rho)]
    r = [c.r for c in per if math.isfinite(c.r)]
    return MeanCorrelation(len(r), float(np.mean(rho)) if rho else math.nan,
                           float(np.mean(r)) if r else math.nan)


@dataclass(frozen=True)
class RetrievalQuality:
    """How well one similarity name retrieves, over the study's complete targets."""

    name: str
    n_targets: int
    correlation: MeanCorrelation  # similarity vs RER
    gain: dict[int, float]  # k -> mean over targets with room of the gain kept by the top k
    random: dict[int, float]  # k -> the same for k sources drawn at random (expectation)
    p_value: dict[int, float]  # k -> permutation p of `gain`
    zero_step: MeanCorrelation | None  # similarity vs zero-step score; None when not measured


def _shuffled_gains(grid: TargetGrid, name: str, k: int, n: int,
                    rng: np.random.Generator) -> np.ndarray:
    """[n] gain kept (mean over the grid's seeds) by the top k of n random source orders: one
    order for all seeds when `name` ranks every seed alike (a library's keys), else one per
    seed (keys measured in each seed's run)."""
    count, seeds = len(grid.sources), len(grid.seeds)
    similarity = grid.similarity[name]
    shared = bool(np.all(similarity == similarity[:1]))
    orders = rng.permuted(np.tile(np.arange(count), (1 if shared else seeds, n, 1)), axis=-1)
    top = np.broadcast_to(orders[..., :min(k, count)], (seeds, n, min(k, count)))
    best = np.take_along_axis(grid.scores[:, None, :], top, axis=-1).max(axis=-1)  # [seeds, n]
    return gain_kept(best, grid.oracle[:, None], grid.baseline[:, None])[grid.room].mean(axis=0)


def permutation_p_value(grids: Sequence[TargetGrid], name: str, k: int,
                        n_permutations: int = N_PERMUTATIONS, seed: int = 0) -> float:
    """p of the mean-over-targets gain kept at k under `name`, against source orders shuffled
    within each target independently (a seeded numpy Generator). Targets without a gain to
    keep are left out (`with_room`)."""
    if not (grids := with_room(grids)):
        return math.nan
    observed = float(np.mean([grid_gain(g, name, k) for g in grids]))
    rng = np.random.default_rng(seed)
    null = np.mean([_shuffled_gains(g, name, k, n_permutations, rng) for g in grids], axis=0)
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + n_permutations))


def zero_step_correlations(study: Study, name: str) -> list[Correlation]:
    """Similarity `name` vs zero-step score per complete target (sources with a score)."""
    study.check_name(name)
    out = []
    for grid in target_grids(study):
        measured = np.isfinite(grid.zero_step)
        if measured.any():
            sims = grid.similarity[name].mean(axis=0)[measured]
            out.append(correlate(grid.target, name, sims, grid.zero_step[measured],
                                 ("similarity", "zero-step score")))
    return out


def zero_step_transfer_correlations(study: Study) -> list[Correlation]:
    """Zero-step score vs RER (mean over complete seeds) per complete target."""
    out = []
    for grid in target_grids(study):
        measured = np.isfinite(grid.zero_step)
        if measured.any():
            out.append(correlate(grid.target, ZERO_STEP, grid.zero_step[measured],
                                 grid.rer.mean(axis=0)[measured], ("zero-step score", "transfer")))
    return out


def retrieval_quality(
    study: Study, ks: Sequence[int] = KS, n_permutations: int = N_PERMUTATIONS, seed: int = 0,
) -> list[RetrievalQuality]:
    """One `RetrievalQuality` per similarity name, in the study's name order."""
    grids = target_grids(study)
    roomy = with_room(grids)
    out = []
    for name in study.similarity_names:
        zero = zero_step_correlations(study, name)
        out.append(RetrievalQuality(
            name, len(grids), mean_correlation(correlations(study, name)),
            {k: float(np.mean([grid_gain(g, name, k) for g in roomy])) if roomy else math.nan
             for k in ks},
            {k: float(np.mean([grid_random_gain(g, k) for g in roomy])) if roomy else math.nan
             for k in ks},
            {k: permutation_p_value(grids, name, k, n_permutations, seed) for k in ks},
            mean_correlation(zero) if zero else None))
    return out


# --------------------------------------------------------------------------- over seeds


@dataclass(frozen=True)
class WeightedRow:
    """Per target: SPoT's weighted top-k init and the baseline, mean and std over its seeds."""

    target: str
    k: int
    by: str
    sources: tuple[str, ...]  # of the first seed
    n_seeds: int
    baseline: float
    baseline_std: float
    weighted: float
    weighted_std: float
    rer: float  # mean over seeds of the per-seed RER


def weighted_table(study: Study) -> list[WeightedRow]:
    """One row per target of weighted.jsonl, in study target order."""
    runs: dict[str, list] = {}
    for run in sorted(study.weighted, key=lambda w: w.seed):
        runs.setdefault(run.target, []).append(run)
    out = []
    for target in _ordered(runs, study._order):
        mine = runs[target]
        out.append(WeightedRow(
            target, mine[0].k, mine[0].by, mine[0].sources, len(mine),
            *mean_std([w.baseline_score for w in mine]),
            *mean_std([w.transfer_score for w in mine]),
            float(np.mean([w.relative_error_reduction for w in mine]))))
    return out


def weighted_wins(rows: Sequence[WeightedRow]) -> int:
    """How many targets' weighted mean is above their baseline mean."""
    return sum(row.weighted > row.baseline for row in rows)


def weighted_sign_test(rows: Sequence[WeightedRow]) -> float:
    """One-sided sign test of `weighted_wins` against no effect (ties dropped): the chance of at
    least that many wins if each target were a fair coin; nan without a non-tied target."""
    n = sum(row.weighted != row.baseline for row in rows)
    return binomtest(weighted_wins(rows), n, alternative="greater").pvalue if n else math.nan


@dataclass(frozen=True)
class PickRow:
    """Per target: the top-1 and the best of the top-k picks vs the baseline, mean and std over
    the seeds where every pick was run (the baseline over the same seeds)."""

    target: str
    by: str
    picks: tuple[str, ...]  # best first
    n_seeds: int
    baseline: float
    baseline_std: float
    top1: float
    top1_std: float
    best_of_k: float
    best_of_k_std: float


def pick_table(study: Study, name: str | None = None, k: int = 3) -> list[PickRow]:
    """Per complete target, its top-k sources by `name` (default `Study.pick_by`; similarity
    averaged over the complete groups), scored over every seed that ran all of them."""
    name = study.check_name(name or study.pick_by)
    pairs = [p for p in aggregate(study, complete_only=True) if p.source != p.target]
    score = {(r.source, r.target, r.seed): r.transfer_score for r in study.rows}
    baselines: dict[tuple[str, int], list[float]] = {}
    for row in study.rows:
        baselines.setdefault((row.target, row.seed), []).append(row.baseline_score)
    out = []
    for target in study.complete_targets:
        mine = sorted([p for p in pairs if p.target == target], key=lambda p: -p.sim(name))
        picks = tuple(p.source for p in mine[:k])
        seeds = [s for s in study.seeds if all((p, target, s) in score for p in picks)]
        top = [[score[p, target, s] for p in picks] for s in seeds]
        out.append(PickRow(target, name, picks, len(seeds),
                           *mean_std([float(np.mean(baselines[target, s])) for s in seeds]),
                           *mean_std([line[0] for line in top]), *mean_std([max(t) for t in top])))
    return out


# --------------------------------------------------------------------------- markdown


def _num(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    value = round(value, digits) + 0.0  # no "-0.00" for a value that rounds to zero
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _pm(mean: float, std: float, digits: int = 2) -> str:
    if not math.isfinite(std):
        return _num(mean, digits)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _p(value: float) -> str:
    if not math.isfinite(value):
        return DASH
    return f"{value:.3f}" if value >= 0.001 else f"{value:.0e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _coverage(study: Study) -> list[str]:
    complete = study.complete_targets
    seeds = sorted({seed for _, seed in study.complete_groups()})
    lines = [f"Grid statistics over {len(complete)} of {len(study.targets)} target(s) with every "
             f"source run (seed(s) {', '.join(map(str, seeds)) or DASH})."]
    left_out = [t for t in study.targets if t not in complete]
    planned = study.config.get("targets")
    waiting = [t for t in planned if t not in study.targets] if isinstance(planned, list) else []
    if left_out:
        lines.append(f"Left out (grid not complete): {', '.join(left_out)}.")
    if waiting:
        lines.append(f"Not run yet: {', '.join(map(str, waiting))}.")
    return [" ".join(lines), ""]


def _quality_section(study: Study, quality: list[RetrievalQuality], ks: Sequence[int],
                     n_permutations: int) -> list[str]:
    lines = ["Spearman ρ / Pearson r: similarity vs relative error reduction per target, mean "
             "over targets (n: targets where defined). Gain kept at k = (best of top-k − "
             "baseline) / (oracle − baseline), mean over the targets and seeds where some source "
             "beats the baseline; random: expectation over all "
             f"k-subsets; p: {n_permutations:,} shuffles of each target's source order.", ""]
    grids = target_grids(study)
    roomless = [g.target for g in grids if not g.room.any()]
    if roomless:
        lines += [f"No source beats the baseline on {', '.join(roomless)} ({len(roomless)} of "
                  f"{len(grids)} targets): there is no gain to keep, so the gain columns "
                  f"average the other {len(grids) - len(roomless)}.", ""]
    header = ["similarity", "targets", "Spearman ρ", "Pearson r", "n"]
    for k in ks:
        header += [f"gain@{k}", f"random@{k}", f"p@{k}"]
    rows = []
    for q in quality:
        row = [q.name, str(q.n_targets), _num(q.correlation.rho), _num(q.correlation.r),
               str(q.correlation.n)]
        for k in ks:
            row += [_num(q.gain[k]), _num(q.random[k]), _p(q.p_value[k])]
        rows.append(row)
    lines += _table(header, rows)
    per = {name: {c.target: c for c in correlations(study, name)}
           for name in study.similarity_names}
    for label, attr in (("Spearman ρ", "rho"), ("Pearson r", "r")):
        lines.append(f"{label} per target (similarity vs relative error reduction):")
        lines.append("")
        body = [[t, *(_num(getattr(per[n][t], attr)) for n in study.similarity_names)]
                for t in study.complete_targets]
        body.append(["mean", *(_num(getattr(q.correlation, attr)) for q in quality)])
        lines += _table(["target", *study.similarity_names], body)
    roomy = with_room(grids)
    for k in ks:
        lines += [f"Gain kept at k={k} per target with a gain to keep (the ratio is unbounded "
                  "below when the oracle is barely above the baseline):", ""]
        body = [[g.target, *(_num(grid_gain(g, n, k)) for n in study.similarity_names),
                 _num(grid_random_gain(g, k))] for g in roomy]
        body.append(["mean", *(_num(q.gain[k]) for q in quality), _num(quality[0].random[k])
                     if quality else DASH])
        lines += _table(["target", *study.similarity_names, "random"], body)
    return lines


def _targets_section(study: Study) -> list[str]:
    lines = ["### Targets", "",
             "Per target, means over its complete seeds: the baseline, the range and standard "
             "deviation of the sources' transfer scores (to read against the seed-to-seed "
             "spread of the top picks over seeds, below), the best source and how many sources "
             "beat the baseline.", ""]
    rows = []
    for g in target_grids(study):
        baseline, scores = float(g.baseline.mean()), g.scores.mean(axis=0)
        best = int(np.argmax(scores))
        spread = float(scores.std(ddof=1)) if scores.size > 1 else math.nan
        rows.append([g.target, str(len(g.seeds)), _num(baseline),
                     f"{_num(float(scores.min()))} to {_num(float(scores.max()))}",
                     _num(spread), f"{g.sources[best]} ({_num(float(scores[best]))})",
                     f"{int((scores > baseline).sum())} of {len(g.sources)}"])
    return lines + _table(["target", "seeds", "baseline", "transfer range", "sd across sources",
                           "best source", "sources above baseline"], rows)


def _zero_step_section(study: Study, quality: list[RetrievalQuality]) -> list[str]:
    found = zero_step_transfer_correlations(study)
    if not found:
        return []
    lines = ["### Zero-step scores", "",
             "Each source value scored untuned on the target's test rows: similarity vs the "
             "zero-step score (mean of per-target correlations), and the zero-step score vs the "
             "tuned relative error reduction.", ""]
    lines += _table(["similarity", "n", "Spearman ρ", "Pearson r"],
                    [[q.name, str(q.zero_step.n), _num(q.zero_step.rho), _num(q.zero_step.r)]
                     for q in quality if q.zero_step is not None])
    mean = mean_correlation(found)
    lines += _table(["target", "sources", "zero-step vs RER: Spearman ρ", "Pearson r"],
                    [[c.target, str(c.n), _num(c.rho), _num(c.r)] for c in found]
                    + [[f"mean ({mean.n} targets)", "", _num(mean.rho), _num(mean.r)]])
    return lines


def _weighted_section(study: Study) -> list[str]:
    rows = weighted_table(study)
    if not rows:
        return []
    lines = ["### SPoT weighted top-k vs baseline", "",
             "Test score, mean ± std over seeds; Δ = weighted − baseline.", ""]
    lines += _table(["target", "k", "by", "sources", "seeds", "baseline", "weighted", "Δ", "RER"],
                    [[r.target, str(r.k), r.by, ", ".join(r.sources), str(r.n_seeds),
                      _pm(r.baseline, r.baseline_std), _pm(r.weighted, r.weighted_std),
                      _num(r.weighted - r.baseline, sign=True), _num(r.rer, 3, sign=True)]
                     for r in rows])
    return lines + [f"Weighted above baseline on {weighted_wins(rows)} of {len(rows)} targets "
                    f"(one-sided sign test, ties dropped: p {_p(weighted_sign_test(rows))}).", ""]


def _pick_section(study: Study, k: int) -> list[str]:
    rows = pick_table(study, k=k)
    if not rows:
        return []
    lines = [f"### Top picks over seeds (by {study.pick_by})", "",
             f"Test score, mean ± std over the seeds where all top-{k} picks ran (baseline over "
             "the same seeds).", ""]
    lines += _table(["target", "picks", "seeds", "baseline", "top-1", f"best of top-{k}"],
                    [[r.target, ", ".join(r.picks), str(r.n_seeds), _pm(r.baseline, r.baseline_std),
                      _pm(r.top1, r.top1_std), _pm(r.best_of_k, r.best_of_k_std)] for r in rows])
    return lines


def retrieval_quality_markdown(study: Study, ks: Sequence[int] = KS,
                               n_permutations: int = N_PERMUTATIONS, seed: int = 0,
                               quality: list[RetrievalQuality] | None = None) -> str:
    """Markdown tables of retrieval quality, zero-step, weighted and pick results (for a README);
    `quality`: `retrieval_quality(study, ks, n_permutations, seed)` if already computed."""
    lines = ["### Retrieval quality", ""]
    if study.synthetic:
        lines += ["**SYNTHETIC example data, not a result.**", ""]
    lines += _coverage(study)
    if quality is None:
        quality = retrieval_quality(study, ks, n_permutations, seed)
    if study.complete_targets:
        lines += _quality_section(study, quality, ks, n_permutations)
        lines += _targets_section(study)
        lines += _zero_step_section(study, quality)
    lines += _weighted_section(study)
    if study.complete_targets:
        lines += _pick_section(study, max(ks))
    return "\n".join(lines).rstrip() + "\n"


__all__ = [
    "KS", "N_PERMUTATIONS", "MeanCorrelation", "PickRow", "RetrievalQuality", "WeightedRow",
    "mean_correlation", "permutation_p_value", "pick_table", "retrieval_quality",
    "retrieval_quality_markdown", "weighted_sign_test", "weighted_table", "weighted_wins",
    "zero_step_correlations",
    "zero_step_transfer_correlations",
]
