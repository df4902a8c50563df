"""`spot study`: sources x targets transferability grid, resumable, written as tidy JSON lines.

The sources are either trained here (their in-run keys are compared by "mean" and "token"), or
taken from a prompt library (`StudyConfig.library`): its values, and its keys under each of its
key protocols, compared by every metric that suits the recipe ("gradient/token",
"trained/delta-flat", ...; the targets' keys are made by the same protocols).

Layout of the study folder:
    library/                            sources trained here, published (no library given)
    sources/<task>/                     one training run per source trained here
    queries/<target>/<recipe>.safetensors   the target's key under each library protocol
    targets/<task>/init.json            the baseline init chosen on validation (baseline_inits)
    targets/<task>/seed<s>/baseline     the target from its own init at the target budget
    targets/<task>/seed<s>/best-of-k/   the target initialised from each source's value
    targets/<task>/seed<s>/weighted-<picks digest>/   SPoT's weighted top-k init
    study.json, results.jsonl, weighted.jsonl, zero_step.jsonl, similarity.jsonl, tasks.json
A library study also scores every source value untuned on every target (zero-step), tunes
SPoT's weighted top-k init for every seed, and runs its `pick_seeds` on each target's top-k
picks only (ranked by `pick_by`); `seeds` run the full grid. Cells run seed by seed (every
target at the first seed before any at the next), one at a time. A cell already in results.jsonl
or weighted.jsonl is never run again, so a killed study resumes even on a fresh checkout of
its committed result files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from library import Library, load_prompt, save_prompt, similarity
from library.atomic import atomic_write
from library.similarity import BASE_METRICS, DEFAULT_METRIC, DELTA
from spot.analysis import relative_error_reduction
from spot.backbones.base import Backbone
from spot.evaluation import evaluate
from spot.task_embedding import embed_task, key_metadata
from spot.tasks import Task, TaskError, get_task
from spot.train import TrainConfig, TrainResult, train
from spot.transfer import Retrieved, held_out_score, run_transfer

console = Console()
IN_RUN_METRICS = ("mean", "token")  # similarity names of a study that trains its sources


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The grid and the base TrainConfig of its source and target runs (each run sets its task,
    and a target run its seed). `source` is None when the sources come from `library`."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    source: TrainConfig | None
    target: TrainConfig
    seeds: tuple[int, ...] = (0,)
    test_examples: int = 200
    library: str | None = None  # take the sources' values and keys from this prompt library
    pick_seeds: tuple[int, ...] = ()  # more seeds, for each target's top-k picks only
    k: int = 3  # picks per target, and sources in the weighted init
    pick_by: str | None = None  # similarity name ranking the picks (default: see `pick_name`)
    baseline_inits: tuple[str, ...] = ()  # >1: the baseline's init is the best on validation

    def __post_init__(self) -> None:
        if (self.source is None) == (self.library is None):
            raise ValueError("a study either trains its sources (source config) or reads them "
                             "from a library, not both")
        if self.pick_seeds and self.library is None:
            raise ValueError("pick_seeds need a library study (picks rank library keys)")
        if set(self.pick_seeds) & set(self.seeds):
            raise ValueError(f"pick_seeds {self.pick_seeds} overlap seeds {self.seeds}")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")


@dataclasses.dataclass(frozen=True)
class Source:
    """A source value and its keys: recipe -> (key, its protocol's start or None)."""

    task: str
    value: np.ndarray  # [L, d]
    keys: dict[str, tuple[np.ndarray, np.ndarray | None]]


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def open_study(
    config: StudyConfig, out: str | Path, tasks: Mapping[str, Task] | None = None,
    backbone: Backbone | None = None,
) -> tuple[Callable[[str], Task], Path, Library, StudyConfig]:
    """(task by name, the study folder, the study's library, the config with `pick_by`
    resolved (`pick_name`; a library study needs the `backbone`), as written to study.json)."""
    unregistered = dict(tasks or {})

    def task_of(name: str) -> Task:
        return unregistered[name] if name in unregistered else get_task(name)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    library = Library(config.library or out / "library")
    config = dataclasses.replace(config, pick_by=pick_name(config, library, backbone))
    atomic_write(out / "study.json", json.dumps(dataclasses.asdict(config), indent=1).encode())
    return task_of, out, library, config


def metric_names(recipe: str) -> tuple[str, ...]:
    """The similarity metrics a key recipe is compared by (delta-*: trained keys only)."""
    deltas = tuple(DELTA + m for m in BASE_METRICS) if recipe == "trained" else ()
    return BASE_METRICS + deltas


def pick_name(config: StudyConfig, library: Library, backbone: Backbone | None) -> str:
    """The similarity ranking each target's picks: `pick_by`, else the library's default
    protocol's recipe with DEFAULT_METRIC (a study training its sources: DEFAULT_METRIC)."""
    if config.pick_by is not None:
        return config.pick_by
    if config.library is None:
        return DEFAULT_METRIC
    if backbone is None:
        raise ValueError("a library study needs its backbone to resolve pick_by")
    default = library.resolve_protocol(backbone.identity)
    if default is None:
        raise ValueError(f"{config.library} holds no key protocol for {backbone.identity}")
    return f"{default.recipe}/{DEFAULT_METRIC}"


def row(
    source: str, target: str, seed: int, metric: str, steps: int, baseline: float, score: float,
    sims: dict[str, float], zero_step: float | None = None,
) -> dict[str, Any]:
    """One results.jsonl row."""
    return {"source": source, "target": target, "seed": seed, "metric": metric, "steps": steps,
            "baseline_score": baseline, "transfer_score": score,
            "relative_error_reduction": relative_error_reduction(baseline, score),
            "zero_step_score": zero_step, "similarity": sims}


def in_run_similarities(key: np.ndarray, query: np.ndarray) -> dict[str, float]:
    return {m: similarity(key, query, m) for m in IN_RUN_METRICS}


def library_sources(library: Library, backbone: Backbone, names: Sequence[str]) -> dict[str, Source]:
    """Each named task's latest value in `library` and its latest key under each protocol."""
    protocols = {p.id: p for p, _ in library.protocols(backbone.identity)}
    if not protocols:
        raise ValueError(f"{library.root} holds no key protocol for {backbone.identity}")
    starts = {pid: library.protocol_start(p) for pid, p in protocols.items()}
    found: dict[str, Source] = {}
    for name in names:
        entries = library.list(task=name, backbone=backbone.identity, limit=1000)
        values = [e for e in entries if e.role == "value"]
        if not values:
            raise ValueError(f"{library.root} holds no value prompt of {name!r}")
        keys = {protocols[e.protocol].recipe: (library.load(e.id)[0], starts[e.protocol])
                for e in entries if e.role == "key" and e.protocol in protocols}
        missing = {p.recipe for p in protocols.values()} - set(keys)
        if missing:
            raise ValueError(f"{name!r} has no key under the {sorted(missing)} protocol(s); "
                             f"run `spot library rekey {library.root}`")
        found[name] = Source(name, library.load(values[-1].id)[0], keys)
    return found


def target_queries(
    backbone: Backbone, task: Task, library: Library, out: Path,
) -> dict[str, np.ndarray]:
    """The target's key under each of the library's protocols, kept in out/ (deterministic)."""
    queries = {}
    for protocol, _ in library.protocols(backbone.identity):
        path = out / f"{protocol.recipe}.safetensors"
        if path.is_file():
            queries[protocol.recipe] = load_prompt(path)[0]
            continue
        queries[protocol.recipe] = embed_task(backbone, task, protocol,
                                              library.protocol_start(protocol))
        out.mkdir(parents=True, exist_ok=True)
        save_prompt(path, queries[protocol.recipe], key_metadata(protocol, task))
    return queries


def library_similarities(source: Source, queries: dict[str, np.ndarray]) -> dict[str, float]:
    """Every "<recipe>/<metric>" similarity of a library source's keys to the target's."""
    return {f"{recipe}/{metric}": similarity(key, queries[recipe], metric, start)
            for recipe, (key, start) in source.keys.items() for metric in metric_names(recipe)}


def train_sources(
    backbone: Backbone, config: StudyConfig, out: Path, library: Library,
    task_of: Callable[[str], Task],
) -> dict[str, Source]:
    """Train every source (resumable) and publish its in-run key and value."""
    assert config.source is not None
    sources = {}
    for name in config.sources:
        console.print(f"[bold]source[/bold] {name}")
        run = train(backbone, task_of(name), dataclasses.replace(config.source, task=name),
                    out / "sources" / name)
        library.publish(run.out / "key.safetensors", run.out / "value.safetensors",
                        {"task": name})
        sources[name] = Source(name, run.value, {"in-run": (run.key, None)})
    return sources


def baseline_dir(config: StudyConfig, init: str, seed: int) -> str:
    """The baseline run's folder under its target's, for this init and seed."""
    inits = config.baseline_inits or (config.target.init,)
    name = "baseline" if len(inits) == 1 else "baseline-" + re.sub(r"\W+", "_", init)[:32]
    return f"seed{seed}/{name}"


def write_init_choice(target_dir: Path, validation: Mapping[str, float]) -> str:
    """Keep the best init on validation in target_dir/init.json; returns it."""
    init = max(validation, key=validation.__getitem__)
    target_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(target_dir / "init.json",
                 json.dumps({"init": init, "validation": dict(validation)}, indent=1).encode())
    return init


def baseline_run(
    backbone: Backbone, task: Task, config: StudyConfig, target_dir: Path, seed: int,
) -> TrainResult:
    """The target from its own init at the target budget. With several `baseline_inits`, the
    init is the best on validation at seed 0 (chosen once, kept in target_dir/init.json)."""
    inits = config.baseline_inits or (config.target.init,)

    def run(init: str, s: int) -> TrainResult:
        return train(backbone, task, dataclasses.replace(
            config.target, task=task.name, init=init, seed=s),
            target_dir / baseline_dir(config, init, s))

    init = inits[0]
    if len(inits) > 1:
        choice = target_dir / "init.json"
        if not choice.is_file():
            write_init_choice(target_dir, {init: run(init, 0).value_score for init in inits})
        init = json.loads(choice.read_text())["init"]
    return run(init, seed)


def zero_step_score(backbone: Backbone, task: Task, value: np.ndarray, limit: int) -> float:
    """A source value scored untuned on the task's first metric, over its test rows."""
    return evaluate(backbone, value, task, "test", limit=limit)[task.metrics[0]]


def zero_step_scores(
    backbone: Backbone, task: Task, sources: Mapping[str, Source], limit: int, path: Path,
) -> dict[str, float]:
    """Each source value scored untuned on the target's test rows, kept in `path` (rows of
    every target) as each lands."""
    rows = _read_jsonl(path)
    cached = {r["source"]: r["score"] for r in rows if r["target"] == task.name}
    for name, source in sources.items():
        if name not in cached:
            cached[name] = zero_step_score(backbone, task, source.value, limit)
            rows.append({"target": task.name, "source": name, "score": cached[name]})
            _write_jsonl(path, rows)
    return cached


def weighted_dir(picks: Sequence[str]) -> str:
    """The folder of the weighted runs from these picks, under the target seed's folder (named by
    the picks, so a study given more sources, and new picks, does not resume the old run)."""
    return "weighted-" + hashlib.sha256("+".join(picks).encode()).hexdigest()[:8]


def weighted_row(
    target: str, seed: int, metric: str, steps: int, picks: Sequence[str],
    similarities: Sequence[float], by: str, baseline: float, score: float,
) -> dict[str, Any]:
    """One weighted.jsonl row: SPoT's weighted init from `picks`, tuned."""
    return {"target": target, "seed": seed, "k": len(picks), "by": by, "sources": list(picks),
            "similarities": list(similarities), "metric": metric, "steps": steps,
            "baseline_score": baseline, "transfer_score": score,
            "relative_error_reduction": relative_error_reduction(baseline, score)}


def weighted_is_current(kept: Mapping[str, Any] | None, by: str, picks: Sequence[str]) -> bool:
    """Whether a kept weighted.jsonl row was made from these picks (a study given more sources
    may pick others)."""
    return kept is not None and kept["by"] == by and kept["sources"] == list(picks)


def weighted_run(
    backbone: Backbone, task: Task, config: TrainConfig, seed_dir: Path, picks: list[Retrieved],
    baseline: float, by: str, test_examples: int,
) -> dict[str, Any]:
    """SPoT's weighted init from `picks` tuned on `task`: a weighted.jsonl row."""
    names = [p.task for p in picks]
    report = run_transfer(backbone, task, config, seed_dir / weighted_dir(names),
                          retrieved=picks, strategy="weighted", baseline=False,
                          test_examples=test_examples)
    return weighted_row(task.name, config.seed, task.metrics[0], config.steps, names,
                        [p.similarity for p in picks], by, baseline, report.score)


def score_target(
    backbone: Backbone, task: Task, library: Library, sources: Mapping[str, Source],
    config: StudyConfig, out: Path,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """A library study's untuned work on one target: each source's zero-step score, and its
    similarities to the target's queries (both kept in `out`)."""
    zero = zero_step_scores(backbone, task, sources, config.test_examples, out / "zero_step.jsonl")
    queries = target_queries(backbone, task, library, out / "queries" / task.name)
    return zero, {s: library_similarities(src, queries) for s, src in sources.items()}


def run_study(
    backbone: Backbone, config: StudyConfig, out: str | Path,
    tasks: Mapping[str, Task] | None = None,
) -> Path:
    """Run every cell not yet in results.jsonl or weighted.jsonl; write each as it lands.
    `tasks` holds tasks by name that are not registered (e.g. over the user's files)."""
    task_of, out, library, config = open_study(config, out, tasks, backbone)
    by = config.pick_by
    from_library = config.library is not None
    if from_library:
        sources = library_sources(library, backbone, config.sources)
    else:
        sources = train_sources(backbone, config, out, library, task_of)
    done = {(r["source"], r["target"], r["seed"]): r for r in _read_jsonl(out / "results.jsonl")}
    weighted = {(r["target"], r["seed"]): r for r in _read_jsonl(out / "weighted.jsonl")}
    scored: dict[str, tuple[dict[str, float], dict[str, dict[str, float]]]] = {}  # zero, sims
    # Seed-major: every target's full grid at the first seed lands before any extra seed, so an
    # interrupted study already measures retrieval on all the targets it reached.
    for seed, target in itertools.product((*config.seeds, *config.pick_seeds), config.targets):
        task, target_dir, query_dir = task_of(target), out / "targets" / target, out / "queries" / target
        metric = task.metrics[0]
        zero: dict[str, float] = {}
        if from_library:
            if target not in scored:
                scored[target] = score_target(backbone, task, library, sources, config, out)
                write_similarities(out, {name: src.keys for name, src in sources.items()},
                                   config, task_of)
            zero, sims = scored[target]
            ranked = sorted(sources, key=lambda s: -sims[s][by])
        chosen = list(sources)
        if from_library and seed not in config.seeds:
            chosen = ranked[:config.k]
        todo = [s for s in chosen if (s, target, seed) not in done]
        needs_weighted = from_library and not weighted_is_current(
            weighted.get((target, seed)), by, ranked[:config.k])
        if not (todo or needs_weighted):
            continue
        console.print(f"[bold]target[/bold] {target} seed {seed}: {len(todo)} cells")
        baseline = baseline_run(backbone, task, config, target_dir, seed)
        base_score = held_out_score(backbone, task, baseline, config.test_examples)
        if not from_library:  # the baseline's in-run key is the query
            if seed == config.seeds[0]:
                query_dir.mkdir(parents=True, exist_ok=True)
                save_prompt(query_dir / "in-run.safetensors", baseline.key,
                            {"task": target, "role": "key"})
            sims = {s: in_run_similarities(src.keys["in-run"][0], baseline.key)
                    for s, src in sources.items()}
            ranked = sorted(sources, key=lambda s: -sims[s][by])
        found = {s: Retrieved(s, "", "", sims[s][by], sources[s].value) for s in sources}
        transfer_config = dataclasses.replace(config.target, task=target, seed=seed)
        seed_dir = target_dir / f"seed{seed}"
        for s in todo:  # one cell at a time, each written as it lands
            report = run_transfer(backbone, task, transfer_config, seed_dir,
                                  retrieved=[found[s]], baseline=False,
                                  test_examples=config.test_examples)
            done[s, target, seed] = row(s, target, seed, metric, transfer_config.steps,
                                        base_score, report.score, sims[s], zero.get(s))
            write_results(out, config, done, weighted)
        if needs_weighted:
            weighted[target, seed] = weighted_run(
                backbone, task, transfer_config, seed_dir, [found[s] for s in ranked[:config.k]],
                base_score, by, config.test_examples)
        write_results(out, config, done, weighted)
    write_results(out, config, done, weighted)
    write_similarities(out, {name: src.keys for name, src in sources.items()}, config, task_of)
    return out


def write_results(
    out: Path, config: StudyConfig, done: Mapping[tuple, dict], weighted: Mapping[tuple, dict],
) -> None:
    """results.jsonl (target, seed, source order) and weighted.jsonl."""
    order = {name: i for i, name in enumerate(config.sources)}
    targets = {name: i for i, name in enumerate(config.targets)}
    _write_jsonl(out / "results.jsonl", sorted(done.values(), key=lambda r: (
        targets.get(r["target"], len(targets)), r["seed"], order.get(r["source"], len(order)))))
    _write_jsonl(out / "weighted.jsonl", sorted(weighted.values(), key=lambda r: (
        targets.get(r["target"], len(targets)), r["seed"])))


def _family(task_of: Callable[[str], Task], name: str) -> dict[str, str]:
    """{"family": ...}, or {} for a library source whose task is not registered here."""
    try:
        return {"family": task_of(name).family}
    except TaskError:
        return {}


def write_similarities(
    out: Path, source_keys: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray | None]]],
    config: StudyConfig, task_of: Callable[[str], Task],
) -> None:
    """similarity.jsonl: all ordered pairs of task keys (sources: recipe -> (key, start);
    targets: their queries in out/queries/, those made so far) under every similarity name;
    and tasks.json."""
    tasks = {name: {r: key for r, (key, _) in keys.items()} for name, keys in source_keys.items()}
    starts = {r: start for keys in source_keys.values() for r, (_, start) in keys.items()}
    for target in config.targets:
        files = sorted((out / "queries" / target).glob("*.safetensors"))
        if files and target not in tasks:
            tasks[target] = {f.name.split(".")[0]: load_prompt(f)[0] for f in files}
    names = [(recipe, metric) for recipe in starts for metric in (
        IN_RUN_METRICS if recipe == "in-run" else metric_names(recipe))]
    rows = [{"a": a, "b": b, "metric": metric if recipe == "in-run" else f"{recipe}/{metric}",
             "similarity": similarity(ka[recipe], kb[recipe], metric, starts[recipe])}
            for recipe, metric in names for a, ka in tasks.items() for b, kb in tasks.items()
            if recipe in ka and recipe in kb]
    _write_jsonl(out / "similarity.jsonl", rows)
    roles = {name: "source" for name in config.sources}
    for target in config.targets:
        roles[target] = "both" if target in roles else "target"
    meta = {name: {"role": role} | _family(task_of, name) for name, role in roles.items()}
    atomic_write(out / "tasks.json", json.dumps(meta, indent=1).encode())

