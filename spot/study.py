"""`spot study`: sources x targets transferability grid, resumable, written as tidy JSON lines.

Layout of the study folder:
    library/                            sources' keys and values (published as a side effect)
    sources/<task>/                     one training run per source (the source config's seed)
    targets/<task>/seed<s>/baseline     the target from the target config's init; its key is the
                                        query the sources' keys are compared with
    targets/<task>/seed<s>/best-of-k/   the target initialised from each source's value
    study.json, results.jsonl, similarity.jsonl, tasks.json
Every target is one `spot.transfer.run_transfer` over all sources, and every run directory
resumes, so a killed study continues.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from library import Library, similarity
from library.atomic import atomic_write
from spot.analysis import relative_error_reduction
from spot.backbones.base import Backbone
from spot.tasks import Task, get_task
from spot.train import TrainConfig, train
from spot.transfer import Retrieved, held_out_score, run_transfer

console = Console()


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The grid and the base TrainConfig of its source and target runs (each run sets its task,
    and a target run its seed)."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    source: TrainConfig
    target: TrainConfig
    seeds: tuple[int, ...] = (0,)
    test_examples: int = 200


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def open_study(
    config: StudyConfig, out: str | Path, tasks: Mapping[str, Task] | None = None,
) -> tuple[Callable[[str], Task], Path, Library]:
    """(task by name, the study folder with its study.json written, the study's library)."""
    unregistered = dict(tasks or {})

    def task_of(name: str) -> Task:
        return unregistered[name] if name in unregistered else get_task(name)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "study.json", json.dumps(dataclasses.asdict(config), indent=1).encode())
    return task_of, out, Library(out / "library")


def run_study(
    backbone: Backbone, config: StudyConfig, out: str | Path,
    tasks: Mapping[str, Task] | None = None,
) -> Path:
    """Train sources, baselines and every source->target transfer; write the result files.
    `tasks` holds tasks by name that are not registered (e.g. over the user's files)."""
    task_of, out, library = open_study(config, out, tasks)
    keys: dict[str, np.ndarray] = {}
    sources: dict[str, Retrieved] = {}
    for name in config.sources:
        console.print(f"[bold]source[/bold] {name}")
        run = train(backbone, task_of(name), dataclasses.replace(config.source, task=name),
                    out / "sources" / name)
        ids = library.publish(run.out / "key.safetensors", run.out / "value.safetensors",
                              {"task": name})
        keys[name] = run.key
        sources[name] = Retrieved(name, ids.key, ids.value, 0.0, run.value)

    rows = []
    for target in config.targets:
        task = task_of(target)
        for seed in config.seeds:
            console.print(f"[bold]target[/bold] {target} seed {seed}")
            target_config = dataclasses.replace(config.target, task=target, seed=seed)
            base_dir = out / "targets" / target / f"seed{seed}"
            baseline = train(backbone, task, target_config, base_dir / "baseline")
            base_score = held_out_score(backbone, task, baseline, config.test_examples)
            query = baseline.key  # the baseline run is trained once: its key is the query
            keys[f"{target}@{seed}"] = query
            found = [dataclasses.replace(r, similarity=similarity(keys[r.task], query, "token"))
                     for r in sources.values()]
            report = run_transfer(backbone, task, target_config, base_dir, retrieved=found,
                                  baseline=False, test_examples=config.test_examples,
                                  test_every_run=True)
            for source in config.sources:
                score = report.test_scores[source]
                rows.append({
                    "source": source, "target": target, "seed": seed, "metric": report.metric,
                    "steps": target_config.steps, "baseline_score": base_score,
                    "transfer_score": score,
                    "relative_error_reduction": relative_error_reduction(base_score, score),
                    "sim_mean": similarity(keys[source], query, "mean"),
                    "sim_token": similarity(keys[source], query, "token"),
                })
            _write_jsonl(out / "results.jsonl", rows)
    _write_similarities(out, keys, config, task_of)
    return out


def _write_similarities(
    out: Path, keys: dict[str, np.ndarray], config: StudyConfig, task_of: Callable[[str], Task],
) -> None:
    """All ordered pairs of task keys (targets: their first seed's query) under both metrics."""
    tasks = {name: keys[name] for name in config.sources}
    for target in config.targets:
        tasks.setdefault(target, keys[f"{target}@{config.seeds[0]}"])
    rows = [{"a": a, "b": b, "metric": metric, "similarity": similarity(ka, kb, metric)}
            for metric in ("mean", "token") for a, ka in tasks.items() for b, kb in tasks.items()]
    _write_jsonl(out / "similarity.jsonl", rows)
    roles = {name: "source" for name in config.sources}
    for target in config.targets:
        roles[target] = "both" if target in roles else "target"
    meta = {name: {"family": task_of(name).family, "role": role} for name, role in roles.items()}
    atomic_write(out / "tasks.json", json.dumps(meta, indent=1).encode())


def ship_sources(
    study_dir: str | Path, dest: str | Path, rebuild_command: str, sources: Sequence[str]
) -> Library:
    """Publish finished source runs of a study into the library at `dest`, each entry recording
    where its training data comes from and the command that rebuilds it."""
    study_dir = Path(study_dir)
    library = Library(dest)
    for name in sources:
        run = study_dir / "sources" / name
        data = ("bigbench==1.0.0 sdist (PyPI)" if get_task(name).family == "bigbench"
                else "../shared/data (not on a fresh machine)")
        library.publish(run / "key.safetensors", run / "value.safetensors",
                        {"task": name, "data": data, "rebuild": rebuild_command})
    return library
