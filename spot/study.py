"""`spot study`: sources x targets transferability grid, resumable, written as tidy JSON lines.

Layout of the study folder:
    library/                          sources' keys and values (published as a side effect)
    sources/<task>/                   one training run per source (seed 0)
    targets/<task>/seed<s>/baseline   the target from a sampled-vocab init; its key is the query
    targets/<task>/seed<s>/from_<src> the target initialised from the source's value
    results.jsonl, similarity.jsonl, tasks.json
Every run directory resumes, and finished rows are not recomputed, so a killed study continues.
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
from spot.backbones.base import Backbone
from spot.tasks import Task, get_task
from spot.train import TrainConfig, train
from spot.transfer import held_out_score, relative_error_reduction, train_from_prompt

console = Console()


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    source_steps: int = 60
    target_steps: int = 30
    key_step: int = 10
    prompt_length: int = 20
    batch_size: int = 8
    eval_examples: int = 100
    test_examples: int = 200
    target_eval_examples: int = 16  # targets validate once, at their last step


def _train_config(config: StudyConfig, task: str, steps: int, seed: int) -> TrainConfig:
    return TrainConfig(task=task, steps=steps, key_step=min(config.key_step, steps),
                       eval_every=max(config.key_step, steps // 3), batch_size=config.batch_size,
                       prompt_length=config.prompt_length, eval_examples=config.eval_examples,
                       seed=seed)


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def run_study(
    backbone: Backbone, config: StudyConfig, out: str | Path,
    tasks: Mapping[str, Task] | None = None,
) -> Path:
    """Train sources, baselines and every source->target transfer; write the result files.
    `tasks` holds tasks by name that are not registered (e.g. over the user's files)."""
    unregistered = dict(tasks or {})

    def task_of(name: str) -> Task:
        return unregistered[name] if name in unregistered else get_task(name)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "study.json", json.dumps(dataclasses.asdict(config), indent=1).encode())
    library = Library(out / "library")
    keys: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    for name in config.sources:
        console.print(f"[bold]source[/bold] {name}")
        run = train(backbone, task_of(name), _train_config(config, name, config.source_steps, 0),
                    out / "sources" / name)
        library.publish(run.out / "key.safetensors", run.out / "value.safetensors",
                        {"task": name})
        keys[name], values[name] = run.key, run.value

    rows, done = [], _done_rows(out / "results.jsonl")
    for target in config.targets:
        task = task_of(target)
        for seed in config.seeds:
            base_dir = out / "targets" / target / f"seed{seed}"
            base_cfg = dataclasses.replace(
                _train_config(config, target, config.target_steps, seed),
                eval_every=config.target_steps, eval_examples=config.target_eval_examples,
            )
            console.print(f"[bold]target[/bold] {target} seed {seed}: baseline")
            baseline = train(backbone, task, base_cfg, base_dir / "baseline")
            base_score = held_out_score(backbone, task, baseline, config.test_examples)
            keys[f"{target}@{seed}"] = baseline.key
            for source in config.sources:
                if (source, target, seed) in done:
                    rows.append(done[(source, target, seed)])
                    continue
                console.print(f"  transfer {source} -> {target} (seed {seed})")
                run = train_from_prompt(backbone, task, base_cfg, base_dir / f"from_{source}",
                                values[source], source)
                score = held_out_score(backbone, task, run, config.test_examples)
                rows.append({
                    "source": source, "target": target, "seed": seed, "metric": task.metrics[0],
                    "steps": config.target_steps, "baseline_score": base_score,
                    "transfer_score": score,
                    "relative_error_reduction": relative_error_reduction(base_score, score),
                    "sim_mean": similarity(keys[source], baseline.key, "mean"),
                    "sim_token": similarity(keys[source], baseline.key, "token"),
                })
                _write_jsonl(out / "results.jsonl", rows)
    _write_jsonl(out / "results.jsonl", rows)
    _write_similarities(out, keys, config, task_of)
    return out


def _done_rows(path: Path) -> dict[tuple[str, str, int], dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["source"], r["target"], r["seed"]): r for r in rows}


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
