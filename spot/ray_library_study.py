"""`spot study --library ... --ray`: a library study with every run a Ray task (`spot.ray_runner`
explains the run directories, retries and how task data travels).

The driver holds the library and writes every file; workers embed targets (`query_run`), score
values untuned (`zero_step_run`) and train target runs (`spot.ray_runner.target_run`). Runs
start as soon as what they need is known: the grid's cells at once, the picks and the weighted
inits once the target's queries are in, the baselines once the init is chosen. The files equal
`spot.study.run_study`'s, cell for cell.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from library import KeyProtocol, load_prompt, save_prompt
from spot.backbones.base import Backbone
from spot.ray_runner import (
    RayOptions,
    _backbone,
    _finished,
    _Runs,
    ray_session,
    target_run,
    task_from_payload,
    task_payload,
)
from spot.study import (
    StudyConfig,
    _read_jsonl,
    _write_jsonl,
    baseline_dir,
    library_similarities,
    library_sources,
    open_study,
    row,
    weighted_dir,
    weighted_is_current,
    weighted_row,
    write_init_choice,
    write_results,
    write_similarities,
    zero_step_score,
)
from spot.task_embedding import embed_task, key_metadata
from spot.tasks import Task
from spot.transfer import weighted_average


def query_run(backbone: str, task: Mapping[str, Any], protocol: str, start: np.ndarray) -> dict:
    """The task's key under `protocol` (its JSON) from `start`."""
    started = time.perf_counter()
    key = embed_task(_backbone(backbone), task_from_payload(task), KeyProtocol.from_json(protocol),
                     start)
    return _finished(started, key=key)


def zero_step_run(
    backbone: str, task: Mapping[str, Any], values: dict[str, np.ndarray], limit: int,
) -> dict:
    """Each value scored untuned on the task's test rows."""
    started = time.perf_counter()
    model, target = _backbone(backbone), task_from_payload(task)
    return _finished(started, scores={name: zero_step_score(model, target, value, limit)
                                      for name, value in values.items()})


def run_library_study_on_ray(
    backbone: str, model: Backbone, config: StudyConfig, out: str | Path,
    tasks: Mapping[str, Task] | None, options: RayOptions,
) -> Path:
    """`spot.study.run_study` of a library study on Ray. `backbone` is the spec each worker
    loads; `model` the driver's copy (for the library's protocols)."""
    task_of, out, library, config = open_study(config, out, tasks, model)
    by = config.pick_by
    sources = library_sources(library, model, config.sources)
    protocols = {p.recipe: (p, library.protocol_start(p)) for p, _ in
                 library.protocols(model.identity)}
    inits = config.baseline_inits or (config.target.init,)
    seeds = (*config.seeds, *config.pick_seeds)
    root = None if options.run_root is None else str(options.run_root)
    done = {(r["source"], r["target"], r["seed"]): r for r in _read_jsonl(out / "results.jsonl")}
    weighted = {(r["target"], r["seed"]): r for r in _read_jsonl(out / "weighted.jsonl")}
    zero: dict[str, dict[str, float]] = {t: {} for t in config.targets}
    for r in _read_jsonl(out / "zero_step.jsonl"):
        zero.setdefault(r["target"], {})[r["source"]] = r["score"]
    base = {(r["target"], r["seed"]): r["baseline_score"] for r in [*done.values(),
                                                                     *weighted.values()]}
    queries: dict[str, dict[str, np.ndarray]] = {t: {} for t in config.targets}
    sims: dict[str, dict[str, dict[str, float]]] = {}
    ranked: dict[str, list[str]] = {}
    cells: dict[tuple[str, str, int], float] = {}
    mixed: dict[tuple[str, int], tuple[list[str], list[float], float]] = {}
    candidates: dict[str, dict[str, tuple[float, float]]] = {t: {} for t in config.targets}

    def target_config(target: str, seed: int, init: str | None = None) -> dict[str, Any]:
        chosen = {} if init is None else {"init": init}
        return dataclasses.asdict(dataclasses.replace(config.target, task=target, seed=seed,
                                                      **chosen))

    with ray_session(options) as ray:
        data = {t: ray.put(task_payload(task_of(t))) for t in config.targets}
        values = {name: ray.put(src.value) for name, src in sources.items()}
        runs = _Runs(ray, options, 0)

        def submit(key: tuple, description: str, function: Any, *args: Any) -> None:
            runs.total += 1
            runs.submit(key, description, function, *args)

        def cell(source: str, target: str, seed: int) -> None:
            if (source, target, seed) not in done:
                submit(("cell", source, target, seed), f"{source} -> {target} seed {seed}",
                       target_run, backbone, data[target], target_config(target, seed), root,
                       f"targets/{target}/seed{seed}/best-of-k/from_{source}",
                       config.test_examples, values[source], source)

        def baselines(target: str, init: str) -> None:
            for seed in seeds:
                if (target, seed) not in base:
                    submit(("baseline", target, seed), f"baseline {target} seed {seed}",
                           target_run, backbone, data[target], target_config(target, seed, init),
                           root, f"targets/{target}/{baseline_dir(config, init, seed)}",
                           config.test_examples)

        def queried(target: str) -> None:
            """The target's similarities known: its picks and weighted inits can run."""
            sims[target] = {s: library_similarities(src, queries[target])
                            for s, src in sources.items()}
            ranked[target] = sorted(sources, key=lambda s: -sims[target][s][by])
            picks = ranked[target][:config.k]
            for seed in config.pick_seeds:
                for source in picks:
                    cell(source, target, seed)
            for seed in seeds:
                if not weighted_is_current(weighted.get((target, seed)), by, picks):
                    found = [sims[target][s][by] for s in picks]
                    init = weighted_average([sources[s].value for s in picks], found)
                    submit(("weighted", target, seed), f"weighted -> {target} seed {seed}",
                           target_run, backbone, data[target], target_config(target, seed), root,
                           f"targets/{target}/seed{seed}/{weighted_dir(picks)}/weighted/weighted",
                           config.test_examples,
                           init, "weighted")
                    mixed[target, seed] = (picks, found, np.nan)

        for target in config.targets:
            query_dir = out / "queries" / target
            for recipe, (protocol, start) in protocols.items():
                path = query_dir / f"{recipe}.safetensors"
                if path.is_file():
                    queries[target][recipe] = load_prompt(path)[0]
                else:
                    submit(("query", target, recipe), f"query {target} {recipe}", query_run,
                           backbone, data[target], protocol.to_json(), start)
            if len(queries[target]) == len(protocols):
                queried(target)
            missing = {s: sources[s].value for s in sources if s not in zero[target]}
            if missing:
                submit(("zero", target), f"zero-step {target}", zero_step_run, backbone,
                       data[target], missing, config.test_examples)
            choice = out / "targets" / target / "init.json"
            if len(inits) == 1 or choice.is_file():
                baselines(target, inits[0] if len(inits) == 1 else
                          json.loads(choice.read_text())["init"])
            else:
                for init in inits:
                    submit(("init", target, init), f"init {init} {target}", target_run, backbone,
                           data[target], target_config(target, 0, init), root,
                           f"targets/{target}/{baseline_dir(config, init, 0)}",
                           config.test_examples)
            for seed in config.seeds:
                for source in sources:
                    cell(source, target, seed)

        for key, result in runs.finished():
            kind, target = key[0], key[1] if key[0] != "cell" else key[2]
            if kind == "query":
                protocol = protocols[key[2]][0]
                (out / "queries" / target).mkdir(parents=True, exist_ok=True)
                save_prompt(out / "queries" / target / f"{key[2]}.safetensors", result["key"],
                            key_metadata(protocol, task_of(target)))
                queries[target][key[2]] = result["key"]
                if len(queries[target]) == len(protocols):
                    queried(target)
            elif kind == "zero":
                zero[target].update(result["scores"])
                _write_jsonl(out / "zero_step.jsonl", [
                    {"target": t, "source": s, "score": zero[t][s]} for t in config.targets
                    for s in sources if s in zero.get(t, {})])
            elif kind == "init":
                candidates[target][key[2]] = (result["validation"], result["score"])
                if len(candidates[target]) == len(inits):
                    chosen = write_init_choice(out / "targets" / target, {
                        init: val for init, (val, _) in candidates[target].items()})
                    base.setdefault((target, 0), candidates[target][chosen][1])  # that run
                    baselines(target, chosen)
            elif kind == "baseline":
                base[target, key[2]] = result["score"]
            elif kind == "cell":
                cells[key[1], target, key[3]] = result["score"]
            else:
                picks, found, _ = mixed[target, key[2]]
                mixed[target, key[2]] = (picks, found, result["score"])
            _collect(config, task_of, sims, zero, base, cells, mixed, done, weighted, by)
            write_results(out, config, done, weighted)
        runs.check()
    write_similarities(out, {name: src.keys for name, src in sources.items()}, config, task_of)
    return out


def _collect(
    config: StudyConfig, task_of: Any, sims: Mapping, zero: Mapping, base: Mapping,
    cells: dict, mixed: dict, done: dict, weighted: dict, by: str,
) -> None:
    """Move every cell and weighted run whose parts are all known into the result rows."""
    for (source, target, seed), score in list(cells.items()):
        if (target, seed) in base and target in sims and source in zero.get(target, {}):
            done[source, target, seed] = row(
                source, target, seed, task_of(target).metrics[0], config.target.steps,
                base[target, seed], score, sims[target][source], zero[target][source])
            del cells[source, target, seed]
    for (target, seed), (picks, found, score) in list(mixed.items()):
        if (target, seed) in base and np.isfinite(score):
            weighted[target, seed] = weighted_row(
                target, seed, task_of(target).metrics[0], config.target.steps, picks, found, by,
                base[target, seed], score)
            del mixed[target, seed]
