"""Study grids and library builds on Ray: every training run is a Ray task, the driver writes.

A run task loads the backbone on its worker (once per worker process), trains one resumable,
deterministic run directory and returns its prompts (numpy arrays) and scores; only the driver
writes results.jsonl and publishes into the library. A run is deterministic for (config, seed), so
a task Ray retries after its worker died returns what the first attempt would have, and the
library's publish is idempotent by content hash: nothing is written twice.

Run directories: under `RayOptions.run_root` (storage every worker sees at that path; the study
folder when Ray is local) they keep `spot study`'s layout and resume across retries; without it,
in the worker's temp dir under a digest of the run (a retry on that node resumes), removed once
the run has returned.

Workers need the package (the same image, or a Ray `runtime_env`) and rebuild the backbone
once per node from its spec under `$SPOT_CACHE` (a model built in code: `module:function`).
Task data travels with the runs: the driver loads each task's rows and puts them in Ray's object
store once, so workers need neither SPOT_DATA nor the user's task files. Ray is imported only
when a session is opened (`ray_session`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich import get_console
from rich.markup import escape

from library import KeyProtocol, Library, Published, save_prompt
from library.prompt_file import load_prompt
from spot.backbones.base import Backbone
from spot.progress import progress_bar
from spot.publish import ensure_protocol
from spot.study import (
    StudyConfig,
    in_run_similarities,
    open_study,
    row,
    write_results,
    write_similarities,
)
from spot.task_embedding import embed_task, key_metadata
from spot.tasks import Example, Task
from spot.train import TrainConfig, TrainingError, train
from spot.transfer import held_out_score, train_from_prompt

MAX_RETRIES = 3  # a run whose worker died (kill -9, a lost node) is rerun up to this many times


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """`address` "auto": start a local Ray with one worker per `cpus_per_run` CPUs of this
    machine; anything else: join that cluster. `run_root`: see the module docstring."""

    address: str = "auto"
    cpus_per_run: int = 1
    run_root: Path | None = None
    max_retries: int = MAX_RETRIES


class RunsFailed(TrainingError):
    """Some runs failed after Ray's retries; what finished is written."""


def ray_options(address: str, cpus_per_run: int, folder: Path, shared: bool) -> RayOptions:
    """The command line's options: run directories go under `folder` when Ray is local or the
    folder is on storage every worker sees (`shared`), else to each worker's temp dir."""
    if cpus_per_run < 1:
        raise ValueError(f"--cpus-per-run must be at least 1, got {cpus_per_run}")
    return RayOptions(address, cpus_per_run, folder if address == "auto" or shared else None)


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """The `ray` module, connected: to an already running session, a new local Ray ("auto")
    or a cluster. A session opened here is shut down on exit."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'spot-prompts[ray]'") from None
    started = not ray.is_initialized()
    if started and options.address == "auto":
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    elif started:
        ray.init(address=options.address)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < options.cpus_per_run:
            raise ValueError(f"a run asks for {options.cpus_per_run} CPUs; Ray has {cpus:g}")
        yield ray
    finally:
        if started:
            ray.shutdown()


# ---- what a worker runs (arguments and results: plain data and numpy arrays)


def task_payload(task: Task) -> dict[str, Any]:
    """A task's definition and rows as plain data, with their digest: what a worker rebuilds it
    from."""
    splits = {split: [[e.text, list(e.choices), e.label] for e in rows]
              for split, rows in task.load_all().items()}
    payload = {"name": task.name, "family": task.family, "num_choices": task.num_choices,
               "metrics": list(task.metrics), "splits": splits}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return {**payload, "digest": digest}


def task_from_payload(payload: Mapping[str, Any]) -> Task:
    splits = {split: [Example(text, tuple(choices), label) for text, choices, label in rows]
              for split, rows in payload["splits"].items()}
    return Task(payload["name"], payload["family"], payload["num_choices"],
                tuple(payload["metrics"]), lambda: splits)


_BACKBONES: dict[str, Backbone] = {}  # per worker process: each backbone is loaded once


def _backbone(spec: str) -> Backbone:
    if spec not in _BACKBONES:
        from spot import backbones

        _BACKBONES[spec] = backbones.load(spec)
    return _BACKBONES[spec]


@contextlib.contextmanager
def _run_dir(run_root: str | None, relative: str, identity: dict[str, Any]) -> Iterator[Path]:
    """run_root/relative, or a temp dir named by the run's `identity`, removed after success."""
    if run_root is not None:
        yield Path(run_root) / relative
        return
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(tempfile.gettempdir()) / "spot-ray" / digest
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _finished(started: float, **result: Any) -> dict[str, Any]:
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return {**result, "seconds": time.perf_counter() - started, "worker": worker}


def source_run(
    backbone: str, task: Mapping[str, Any], config: dict[str, Any], run_root: str | None,
    relative: str, protocols: Sequence[tuple[str, np.ndarray]] = (),
) -> dict[str, Any]:
    """Train a source: its key and value files' (array, metadata), and its key under each of
    `protocols` ((protocol JSON, start prompt) pairs)."""
    started = time.perf_counter()
    model, source = _backbone(backbone), task_from_payload(task)
    identity = {"backbone": backbone, "task": task["digest"], "config": config, "run": relative}
    with _run_dir(run_root, relative, identity) as out:
        train(model, source, TrainConfig(**config), out, show_progress=False)
        key, value = load_prompt(out / "key.safetensors"), load_prompt(out / "value.safetensors")
    keys = [embed_task(model, source, KeyProtocol.from_json(protocol), start)
            for protocol, start in protocols]
    return _finished(started, key=key, value=value, keys=keys)


def target_run(
    backbone: str, task: Mapping[str, Any], config: dict[str, Any], run_root: str | None,
    relative: str, test_examples: int | None, init: np.ndarray | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """A target run from the config's own init (a baseline) or from `init`, a source's value:
    its key, held-out test score and best validation score."""
    started = time.perf_counter()
    model, target, cfg = _backbone(backbone), task_from_payload(task), TrainConfig(**config)
    init_digest = None if init is None else hashlib.sha256(init.tobytes()).hexdigest()
    identity = {"backbone": backbone, "task": task["digest"], "config": config, "run": relative,
                "init": init_digest}
    with _run_dir(run_root, relative, identity) as out:
        run = (train(model, target, cfg, out, show_progress=False) if init is None
               else train_from_prompt(model, target, cfg, out, init, source or "source"))
        score = held_out_score(model, target, run, test_examples)
    return _finished(started, key=run.key, score=score, validation=run.value_score)


# ---- the driver


def _cause(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


class _Runs:
    """Runs submitted to Ray, collected as they finish, with a live count of done / running /
    queued / failed and the mean time per run."""

    def __init__(self, ray: Any, options: RayOptions, total: int):
        self._ray, self._options, self.total = ray, options, total
        self._remote: dict[Callable, Any] = {}
        self._pending: dict[Any, tuple[tuple, str]] = {}  # ref -> (key, description)
        self._seconds: list[float] = []
        self.failed: list[str] = []
        self._console = get_console()

    def submit(self, key: tuple, description: str, function: Callable, *args: Any) -> None:
        if function not in self._remote:
            self._remote[function] = self._ray.remote(function).options(
                num_cpus=self._options.cpus_per_run, max_retries=self._options.max_retries)
        self._pending[self._remote[function].remote(*args)] = (key, description)

    def _note(self, slots: int) -> str:
        running = min(len(self._pending), slots)
        mean = f"{np.mean(self._seconds):.1f} s/run" if self._seconds else "–"
        return (f"{running} running, {len(self._pending) - running} queued, "
                f"{len(self.failed)} failed, {mean}")

    def finished(self) -> Iterator[tuple[tuple, dict[str, Any]]]:
        """(key, result) of each run as it finishes; runs submitted meanwhile join in. A failed
        run is reported and counted, not yielded."""
        cpus = self._ray.cluster_resources().get("CPU", 1)
        slots = max(1, int(cpus // self._options.cpus_per_run))
        with progress_bar("runs", self.total) as bar:
            while self._pending:
                bar.update(len(self._seconds) + len(self.failed), self.total,
                           note=self._note(slots))
                ready, _ = self._ray.wait(list(self._pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    key, description = self._pending.pop(ref)
                    try:
                        result = self._ray.get(ref)
                    except self._ray.exceptions.RayError as error:
                        self.failed.append(f"{description} ({_cause(error)})")
                        self._console.print(f"[red]failed[/red] {escape(self.failed[-1])}")
                        continue
                    self._seconds.append(result["seconds"])
                    self._console.print(f"done {escape(description)}: "
                                        f"{result['seconds']:.1f} s on {result['worker']}")
                    yield key, result
            bar.update(len(self._seconds) + len(self.failed), note=self._note(slots))

    def check(self) -> None:
        """Raise unless every planned run finished."""
        missing = self.total - len(self._seconds) - len(self.failed)
        if self.failed or missing:
            raise RunsFailed(f"{len(self.failed)} of {self.total} runs failed"
                             + (f" and {missing} did not run (their source failed)"
                                if missing else "") + ": " + "; ".join(self.failed))


def run_study_on_ray(
    backbone: str, config: StudyConfig, out: str | Path, tasks: Mapping[str, Task] | None = None,
    options: RayOptions = RayOptions(),
) -> Path:
    """`spot.study.run_study` with every run a Ray task: the same files, cell for cell.
    `backbone` is the spec each worker loads (`spot.backbones.load`). Studies that train their
    sources only (a library study: `spot.ray_library_study`)."""
    if config.library is not None:
        raise ValueError("a library study runs on Ray with "
                         "spot.ray_library_study.run_library_study_on_ray")
    task_of, out, library, config = open_study(config, out, tasks)
    cells = list(itertools.product(config.targets, config.seeds))
    root = None if options.run_root is None else str(options.run_root)
    keys: dict[str, np.ndarray] = {}
    baselines: dict[tuple[str, int], float] = {}
    scores: dict[tuple[str, str, int], float] = {}
    with ray_session(options) as ray:
        data = {name: ray.put(task_payload(task_of(name)))
                for name in dict.fromkeys([*config.sources, *config.targets])}
        runs = _Runs(ray, options, len(config.sources) + len(cells) * (1 + len(config.sources)))
        for name in config.sources:
            runs.submit(("source", name), f"source {name}", source_run, backbone, data[name],
                        dataclasses.asdict(_source_config(config, name)), root, f"sources/{name}")
        for target, seed in cells:
            runs.submit(("baseline", target, seed), f"baseline {target} seed {seed}", target_run,
                        backbone, data[target],
                        dataclasses.asdict(_target_config(config, target, seed)), root,
                        f"targets/{target}/seed{seed}/baseline", config.test_examples)
        for key, result in runs.finished():
            if key[0] == "source":
                name = key[1]
                library.publish(tuple(result["key"]), tuple(result["value"]), {"task": name})
                keys[name] = result["key"][0]
                value = ray.put(result["value"][0])
                for target, seed in cells:
                    runs.submit(("transfer", name, target, seed),
                                f"{name} -> {target} seed {seed}", target_run, backbone,
                                data[target],
                                dataclasses.asdict(_target_config(config, target, seed)), root,
                                f"targets/{target}/seed{seed}/best-of-k/from_{name}",
                                config.test_examples, value, name)
            elif key[0] == "baseline":
                keys[f"{key[1]}@{key[2]}"], baselines[key[1:]] = result["key"], result["score"]
            else:
                scores[key[1:]] = result["score"]
            write_results(out, config, _rows(config, task_of, keys, baselines, scores), {})
        runs.check()
    for target in config.targets:  # the first seed's baseline key is the target's query
        query_dir = out / "queries" / target
        query_dir.mkdir(parents=True, exist_ok=True)
        save_prompt(query_dir / "in-run.safetensors", keys[f"{target}@{config.seeds[0]}"],
                    {"task": target, "role": "key"})
    write_similarities(out, {name: {"in-run": (keys[name], None)} for name in config.sources},
                       config, task_of)
    return out


def _source_config(config: StudyConfig, name: str) -> TrainConfig:
    return dataclasses.replace(config.source, task=name)


def _target_config(config: StudyConfig, target: str, seed: int) -> TrainConfig:
    return dataclasses.replace(config.target, task=target, seed=seed)


def _rows(
    config: StudyConfig, task_of: Callable[[str], Task], keys: Mapping[str, np.ndarray],
    baselines: Mapping[tuple[str, int], float], scores: Mapping[tuple[str, str, int], float],
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """results.jsonl's rows of the finished cells."""
    return {(source, target, seed): row(
        source, target, seed, task_of(target).metrics[0],
        _target_config(config, target, seed).steps, baselines[target, seed],
        scores[source, target, seed], in_run_similarities(keys[source], keys[f"{target}@{seed}"]))
        for target, seed, source in itertools.product(config.targets, config.seeds, config.sources)
        if (source, target, seed) in scores and (target, seed) in baselines}


def build_library_on_ray(
    backbone: str, model: Backbone, tasks: Sequence[Task], config: TrainConfig, library: Library,
    recipes: Sequence[str], options: RayOptions = RayOptions(),
) -> Iterator[tuple[str, str, Published]]:
    """Train a source per task on Ray and publish its value with a key per recipe, each made on
    the worker by the library's protocol; yields (task, recipe, ids) as sources finish. `model`
    (the driver's copy of `backbone`) registers a recipe's default protocol the first time."""
    protocols = [ensure_protocol(library, model, recipe) for recipe in recipes]
    shipped = [(protocol.to_json(), start) for protocol, start in protocols]
    by_name = {task.name: task for task in tasks}
    root = None if options.run_root is None else str(options.run_root)
    with ray_session(options) as ray:
        runs = _Runs(ray, options, len(by_name))
        for name, task in by_name.items():
            runs.submit((name,), f"source {name}", source_run, backbone,
                        ray.put(task_payload(task)),
                        dataclasses.asdict(dataclasses.replace(config, task=name)), root, name,
                        shipped)
        for (name,), result in runs.finished():
            value = tuple(result["value"])
            for recipe, (protocol, _), key in zip(recipes, protocols, result["keys"], strict=True):
                metadata = key_metadata(protocol, by_name[name])
                yield name, recipe, library.publish((key, metadata), value, {"task": name})
        runs.check()
