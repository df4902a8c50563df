"""Reading and validating a `spot study` folder (results.jsonl, similarity.jsonl, tasks.json) into
a `Study`; the statistics over it are in `spot.analysis`, whose conventions apply here too.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

