"""Reading and validating a `spot study` folder (results.jsonl, weighted.jsonl, similarity.jsonl,
tasks.json, study.json) into a `Study`; the statistics over it are in `spot.analysis` and
`spot.retrieval_quality`, whose conventions apply here too.

Similarity names are strings: "<recipe>/<metric>" ("gradient/token", "trained/delta-flat", ...)
for a study over a library, "mean" and "token" for a study that trains its sources. Legacy rows
(`sim_mean`, `sim_token`, no `zero_step_score`) load as similarity {"mean", "token"}.

Seeds need not form a full grid: a (target, seed) group is *complete* when it holds every source
of the study (a target never counts as its own source); grid statistics use complete groups only.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEGACY_NAMES = ("mean", "token")  # the similarity names of legacy rows (sim_mean, sim_token)
ROLES = ("source", "target", "both")
RESULTS_FILE = "results.jsonl"
WEIGHTED_FILE = "weighted.jsonl"
SIMILARITY_FILE = "similarity.jsonl"
TASKS_FILE = "tasks.json"
CONFIG_FILE = "study.json"
ALL_TARGETS = "all"  # `Correlation.target` of the pooled (over all targets) correlation

_RUN_FIELDS: dict[str, type] = {
    "target": str, "seed": int, "metric": str, "steps": int,
    "baseline_score": float, "transfer_score": float, "relative_error_reduction": float,
}
_RESULT_FIELDS: dict[str, type] = {"source": str, **_RUN_FIELDS}
_LEGACY_FIELDS: dict[str, type] = {"sim_mean": float, "sim_token": float}
_WEIGHTED_FIELDS: dict[str, type] = {"k": int, "by": str, **_RUN_FIELDS}
_SIMILARITY_FIELDS: dict[str, type] = {"a": str, "b": str, "metric": str, "similarity": float}
_RER_TOLERANCE = 1e-4  # stored vs recomputed RER (scores may have been rounded)
_COSINE_SLACK = 1e-5  # cosines a little outside [-1, 1] from float32 rounding


class StudyError(ValueError):
    """A study file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Row:
    """One (source, target, seed) transfer; `similarity` maps name -> source key vs target query."""

    source: str
    target: str
    seed: int
    metric: str
    steps: int
    baseline_score: float
    transfer_score: float
    relative_error_reduction: float
    similarity: dict[str, float]
    zero_step_score: float | None = None  # the source value scored untuned on the target

    @property
    def self_transfer(self) -> bool:
        return self.source == self.target

    def sim(self, name: str) -> float:
        """The `name` similarity of the source key and the target query."""
        if name not in self.similarity:
            raise ValueError(f"unknown similarity {name!r}; this row has {list(self.similarity)}")
        return self.similarity[name]


@dataclass(frozen=True)
class WeightedRun:
    """One (target, seed) of SPoT's weighted top-k init (a weighted.jsonl row)."""

    target: str
    seed: int
    k: int
    by: str
    sources: tuple[str, ...]
    similarities: tuple[float, ...]
    metric: str
    steps: int
    baseline_score: float
    transfer_score: float
    relative_error_reduction: float


@dataclass
class Study:
    """A loaded study folder. Task lists follow tasks.json order, then first appearance."""

    path: Path
    rows: list[Row]
    similarity: dict[str, dict[tuple[str, str], float]]  # name -> (a, b) -> cosine
    similarity_names: list[str] = field(default_factory=list)  # of the rows, first seen first
    weighted: list[WeightedRun] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # study.json ({} when absent)
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
    def synthetic(self) -> bool:
        """True when tasks.json marks the study (or any task in it) as synthetic example data."""
        return any(bool(meta.get("synthetic")) for meta in self.tasks.values())

    @property
    def pick_by(self) -> str:
        """The name ranking each target's picks: study.json's pick_by, else the weighted runs'
        `by`, else the first similarity name."""
        for name in (self.config.get("pick_by"), *(w.by for w in self.weighted)):
            if name in self.similarity_names:
                return name
        return self.similarity_names[0]

    def check_name(self, name: str) -> str:
        """`name` if the study's rows have that similarity, else a ValueError naming the choices."""
        if name not in self.similarity_names:
            raise ValueError(f"unknown similarity {name!r}; this study has {self.similarity_names}")
        return name

    def family(self, task: str) -> str | None:
        return self.tasks.get(task, {}).get("family")

    def expected_sources(self, target: str) -> list[str]:
        """The sources a complete group of `target` holds: every source but the target itself."""
        return [s for s in self.sources if s != target]

    def complete_groups(self) -> dict[tuple[str, int], list[Row]]:
        """(target, seed) -> its non-self rows in source order, for complete groups only."""
        out = {}
        for (target, seed), group in _groups(self.rows, include_self=False).items():
            expected = self.expected_sources(target)
            if {r.source for r in group} >= set(expected):
                rank = {s: i for i, s in enumerate(expected)}
                out[target, seed] = sorted(group, key=lambda r: rank[r.source])
        rank = {t: i for i, t in enumerate(self.targets)}
        return {key: out[key] for key in sorted(out, key=lambda k: (rank[k[0]], k[1]))}

    @property
    def complete_targets(self) -> list[str]:
        """Targets with at least one complete group, in study order."""
        done = {t for t, _ in self.complete_groups()}
        return [t for t in self.targets if t in done]

    @property
    def _order(self) -> list[str]:
        seen = list(self.tasks)
        for key in ("sources", "targets"):
            value = self.config.get(key)
            if isinstance(value, list):
                seen += [name for name in value if isinstance(name, str)]
        for row in self.rows:
            seen += [row.source, row.target]
        for pairs in self.similarity.values():
            for a, b in pairs:
                seen += [a, b]
        return list(dict.fromkeys(seen))


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _groups(rows: Iterable[Row], include_self: bool) -> dict[tuple[str, int], list[Row]]:
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        if include_self or not row.self_transfer:
            groups.setdefault((row.target, row.seed), []).append(row)
    return groups


# --------------------------------------------------------------------------- field checks


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


def _value(value: Any, kind: type, name: str, where: str) -> Any:
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
    return value


def _typed(row: dict[str, Any], spec: dict[str, type], where: str) -> dict[str, Any]:
    missing = [name for name in spec if name not in row]
    if missing:
        raise StudyError(f"{where}: missing field(s) {', '.join(missing)}")
    return {name: _value(row[name], kind, name, where) for name, kind in spec.items()}


def _cosine(value: float, name: str, where: str) -> float:
    if abs(value) > 1.0 + _COSINE_SLACK:
        raise StudyError(f"{where}: {name} {value} is not a cosine in [-1, 1]")
    return value


def _score(value: float, name: str, where: str) -> float:
    """A task metric times 100: 0-100, or down to -100 for MCC (below chance)."""
    if not -100.0 <= value <= 100.0:
        raise StudyError(f"{where}: {name} {value} is outside the -100-100 scale")
    return value


def relative_error_reduction(baseline: float, transfer: float) -> float:
    """(e_base - e_transfer) / e_base with e = 100 - score; 0.0 when the baseline is perfect."""
    error = 100.0 - float(baseline)
    if error <= 0:
        return 0.0
    return (error - (100.0 - float(transfer))) / error


def _check_run(values: dict[str, Any], where: str, notes: list[str]) -> None:
    for name in ("baseline_score", "transfer_score"):
        _score(values[name], name, where)
    expected = relative_error_reduction(values["baseline_score"], values["transfer_score"])
    if abs(expected - values["relative_error_reduction"]) > _RER_TOLERANCE:
        notes.append(f"{where}: relative_error_reduction {values['relative_error_reduction']:.6g}"
                     f" differs from the one recomputed from the scores ({expected:.6g})")


# --------------------------------------------------------------------------- files


def _similarities(raw: dict[str, Any], where: str) -> dict[str, float]:
    if "similarity" not in raw and all(name in raw for name in _LEGACY_FIELDS):
        legacy = _typed(raw, _LEGACY_FIELDS, where)
        return {name: _cosine(legacy[f"sim_{name}"], f"sim_{name}", where) for name in LEGACY_NAMES}
    if "similarity" not in raw:
        raise StudyError(f"{where}: missing field(s) similarity (or legacy sim_mean, sim_token)")
    sims = raw["similarity"]
    if not isinstance(sims, dict) or not sims:
        raise StudyError(f"{where}: field 'similarity' must be a non-empty object {{name: cosine}}")
    return {_value(name, str, "similarity name", where):
            _cosine(_value(value, float, f"similarity[{name!r}]", where), f"similarity {name!r}",
                    where) for name, value in sims.items()}


def _load_results(path: Path, notes: list[str]) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    names: list[str] = []
    seen: dict[tuple[str, str, int], int] = {}
    for number, raw in _read_jsonl(path):
        where = f"{path.name} line {number}"
        values = _typed(raw, _RESULT_FIELDS, where)
        _check_run(values, where, notes)
        sims = _similarities(raw, where)
        if not names:
            names = list(sims)
        elif set(sims) != set(names):
            raise StudyError(f"{where}: similarity names {sorted(sims)} differ from the first "
                             f"row's {sorted(names)}")
        zero = raw.get("zero_step_score")
        if zero is not None:
            zero = _score(_value(zero, float, "zero_step_score", where), "zero_step_score", where)
        key = (values["source"], values["target"], values["seed"])
        if key in seen:
            raise StudyError(f"{where}: duplicate row for source {key[0]!r}, target {key[1]!r}, "
                             f"seed {key[2]} (first on line {seen[key]})")
        seen[key] = number
        rows.append(Row(**values, similarity=sims, zero_step_score=zero))
    return rows, names


def _load_weighted(path: Path, notes: list[str]) -> list[WeightedRun]:
    if not path.is_file():
        return []
    runs: list[WeightedRun] = []
    seen: dict[tuple[str, int], int] = {}
    for number, raw in _read_jsonl(path):
        where = f"{path.name} line {number}"
        values = _typed(raw, _WEIGHTED_FIELDS, where)
        _check_run(values, where, notes)
        sources, sims = raw.get("sources"), raw.get("similarities")
        if (not isinstance(sources, list) or not isinstance(sims, list)
                or len(sources) != len(sims) or not sources):
            raise StudyError(f"{where}: 'sources' and 'similarities' must be lists of equal length")
        key = (values["target"], values["seed"])
        if key in seen:
            raise StudyError(f"{where}: duplicate row for target {key[0]!r}, seed {key[1]} "
                             f"(first on line {seen[key]})")
        seen[key] = number
        runs.append(WeightedRun(
            **values, sources=tuple(_value(s, str, "sources", where) for s in sources),
            similarities=tuple(_value(s, float, "similarities", where) for s in sims)))
    return runs


def _load_similarity(path: Path, notes: list[str]) -> dict[str, dict[tuple[str, str], float]]:
    if not path.is_file():
        notes.append(f"{path.name} not found (`spot study` writes it when every transfer is done: "
                     "is the study unfinished?); no similarity heatmaps")
        return {}
    table: dict[str, dict[tuple[str, str], float]] = {}
    lines: dict[tuple[str, str, str], int] = {}
    for number, raw in _read_jsonl(path):
        where = f"{path.name} line {number}"
        values = _typed(raw, _SIMILARITY_FIELDS, where)
        name, a, b = values["metric"], values["a"], values["b"]
        _cosine(values["similarity"], "similarity", where)
        if (name, a, b) in lines:
            raise StudyError(f"{where}: duplicate pair ({a!r}, {b!r}) for metric {name!r} "
                             f"(first on line {lines[name, a, b]})")
        lines[name, a, b] = number
        table.setdefault(name, {})[a, b] = values["similarity"]
    tasks = {a for pairs in table.values() for a, _ in pairs}
    tasks |= {b for pairs in table.values() for _, b in pairs}
    for name, pairs in table.items():
        missing = [(a, b) for a in sorted(tasks) for b in sorted(tasks) if (a, b) not in pairs]
        if missing:
            notes.append(f"{path.name}: {len(missing)} of {len(tasks) ** 2} ordered pairs missing "
                         f"for metric {name!r}, e.g. {missing[0]}; the heatmap leaves them blank")
    return table


def _load_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise StudyError(f"{path.name}: invalid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(meta, dict):
        raise StudyError(f"{path.name}: expected an object {what}")
    return meta


def _load_tasks(path: Path) -> dict[str, dict[str, Any]]:
    meta = _load_json(path, "{task: {family, role}}")
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

    Non-fatal findings (incomplete (target, seed) groups, targets still missing, per-source
    differences of a target's baseline, stored RER that disagrees with the scores, a missing
    similarity.jsonl) go to `Study.notes`; all but the expected ones (groups at study.json's
    `pick_seeds`, which run only the top picks) are also issued as warnings.
    """
    path = Path(path)
    if not path.is_dir():
        raise StudyError(f"{path}: not a study folder")
    notes: list[str] = []
    tasks = _load_tasks(path / TASKS_FILE)
    config = _load_json(path / CONFIG_FILE, "(the study's settings)")
    rows, names = _load_results(path / RESULTS_FILE, notes)
    weighted = _load_weighted(path / WEIGHTED_FILE, notes)
    similarity = _load_similarity(path / SIMILARITY_FILE, notes)
    study = Study(path=path, rows=rows, similarity=similarity, similarity_names=names,
                  weighted=weighted, config=config, tasks=tasks, notes=notes)
    expected = _check_grid(study)
    for note in study.notes:
        if note not in expected:
            warnings.warn(f"{path}: {note}", stacklevel=2)
    return study


def _check_grid(study: Study) -> list[str]:
    """Add the grid notes to `study.notes`; returns those that are expected (no warning)."""
    expected = []
    complete = study.complete_groups()
    groups = _groups(study.rows, include_self=False)
    incomplete = [key for key in groups if key not in complete]
    pick_seeds = study.config.get("pick_seeds")
    pick_seeds = set(pick_seeds) if isinstance(pick_seeds, list) else set()
    if incomplete:
        note = (f"{len(incomplete)} (target, seed) group(s) lack some of the "
                f"{len(study.sources)} sources (seeds running only the top picks, or an unfinished "
                f"study), e.g. {incomplete[0]}; grid statistics use the {len(complete)} complete "
                "group(s)")
        study.notes.append(note)
        if {seed for _, seed in incomplete} <= pick_seeds:
            expected.append(note)
    have: dict[str, int] = {}
    for (target, _), group in groups.items():
        have[target] = max(have.get(target, 0), len({r.source for r in group}))
    left_out = [t for t in study.targets if t not in {t for t, _ in complete}]
    if left_out:
        study.notes.append("target(s) without a complete group, left out of grid statistics: "
                           + ", ".join(f"{t} ({have.get(t, 0)} of "
                                       f"{len(study.expected_sources(t))} sources)"
                                       for t in left_out))
    planned = study.config.get("targets")
    if isinstance(planned, list):
        waiting = [t for t in planned if t not in study.targets]
        if waiting:
            study.notes.append(f"target(s) in {CONFIG_FILE} with no results yet: "
                               + ", ".join(map(str, waiting)))
    for (target, seed), group in _groups(study.rows, include_self=True).items():
        baselines = {r.baseline_score for r in group}
        if max(baselines) - min(baselines) > 1e-9:
            study.notes.append(f"target {target!r} seed {seed}: baseline_score differs between "
                               f"sources ({min(baselines)} .. {max(baselines)}); using the mean")
    return expected
