"""SPoT transfer: query the library with the target's key, then initialise the target.

`run_transfer` is the pipeline (query -> retrieve -> tune -> baseline -> test scores and relative
error reduction) behind `spot tune-target`, `make demo` and `spot study`. Strategies (Vu et al. 2022):
- best-of-k: one target run from each of the top-k source values, keep the best on validation;
- weighted: one run from sum_r w_r * value_r with w_r = sim_r / sum sim (negatives weigh 0);
- mixture: train one prompt on the examples-proportional mix of the top-k sources' training data
  and the target's, then tune it on the target.
Every run is a resumable `spot.train` run directory, so a killed transfer continues.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from library import DEFAULT_METRIC, KeyProtocol, NoProtocolWarning
from library.atomic import atomic_write
from library.prompt_file import decode_prompt
from spot.analysis import relative_error_reduction
from spot.backbones.base import Backbone, BackboneError
from spot.evaluation import evaluate
from spot.progress import progress_bar
from spot.prompts import save_for_backbone
from spot.task_embedding import embed_task
from spot.tasks import Example, Task, get_task
from spot.train import TrainConfig, TrainResult, train

STRATEGIES = ("best-of-k", "weighted", "mixture")
MIXTURE_CAP = 10_000  # examples per source task in a mixture (T5's examples-proportional limit)


class KeyWithoutValueWarning(UserWarning):
    """Retrieval skipped a library key that was published without a value prompt."""


class PromptSource(Protocol):
    """A local `library.Library` or a `retrieval_api.client` with the same query/read calls."""

    def query(
        self, prompt: Any, backbone: str, metric: str = DEFAULT_METRIC, k: int = 10,
        recipe: str | None = None,
    ) -> list: ...

    def read_bytes(self, entry_id: str) -> bytes: ...

    def protocol(
        self, backbone: str, recipe: str | None = None
    ) -> tuple[KeyProtocol, np.ndarray] | None: ...


@dataclasses.dataclass(frozen=True)
class Retrieved:
    task: str
    key_id: str
    value_id: str
    similarity: float
    value: np.ndarray  # [L, d]


@dataclasses.dataclass(frozen=True)
class TransferResult:
    """`tune_target`'s runs and the one chosen on validation."""

    strategy: str
    retrieved: list[Retrieved]
    chosen: str  # the run with the best validation score
    results: dict[str, TrainResult]  # run name -> target run

    @property
    def result(self) -> TrainResult:
        """The chosen target run."""
        return self.results[self.chosen]

    @property
    def runs(self) -> dict[str, float]:
        """Run name -> best validation score."""
        return {name: run.value_score for name, run in self.results.items()}


@dataclasses.dataclass(frozen=True)
class TransferReport:
    """What `run_transfer` did: the retrieved sources, the runs and their test scores."""

    task: str
    metric: str  # the task's primary metric, the one every score is in
    transfer: TransferResult
    test_scores: dict[str, float]  # run name -> test score: the chosen run (or every run)
    baseline: TrainResult | None  # the run from the config's own init at the same budget
    baseline_score: float | None

    @property
    def retrieved(self) -> list[Retrieved]:
        return self.transfer.retrieved

    @property
    def score(self) -> float:
        """The chosen transfer run's test score."""
        return self.test_scores[self.transfer.chosen]

    def relative_error_reduction(self, run: str | None = None) -> float | None:
        """RER of `run` (default: the chosen one) over the baseline; None without a baseline."""
        if self.baseline_score is None:
            return None
        return relative_error_reduction(self.baseline_score,
                                        self.test_scores[run or self.transfer.chosen])


def query_prompt(
    backbone: Backbone, task: Task, config: TrainConfig, out: Path, show_progress: bool = False
) -> np.ndarray:
    """Train the target for `config.key_step` steps from its own init: the query of a library
    whose keys record no protocol (made that way before protocols)."""
    query_config = dataclasses.replace(config, steps=config.key_step, eval_every=config.key_step)
    return train(backbone, task, query_config, out, show_progress=show_progress).key


def task_query(
    source: PromptSource, backbone: Backbone, task: Task, recipe: str | None = None,
    legacy: tuple[TrainConfig, Path] | None = None, show_progress: bool = True,
) -> np.ndarray:
    """The target's key made exactly as the library's keys were (its protocol for `recipe`, or
    its default). A library whose keys record no protocol needs `legacy`: (config, run dir) of
    a `query_prompt` run."""
    found = source.protocol(backbone.identity, recipe)
    if found is not None:
        return embed_task(backbone, task, *found, show_progress=show_progress)
    if legacy is None:
        raise ValueError(f"the library's keys for {backbone.identity} record no key protocol")
    warnings.warn(
        "the library's keys record no key protocol: the query is trained from the task's own "
        "init, and similarities compare however each key was made", NoProtocolWarning,
        stacklevel=2,
    )
    return query_prompt(backbone, task, *legacy, show_progress=show_progress)


def retrieve(
    source: PromptSource, backbone: Backbone, query: np.ndarray, k: int = 3, metric: str = DEFAULT_METRIC,
    exclude: Sequence[str] = (), recipe: str | None = None,
) -> list[Retrieved]:
    """Top-k source keys of this backbone by `metric`, with their value prompts loaded.

    A key published without a value cannot initialise a target: it is skipped with a warning
    (the k are filled from the next matches)."""
    wanted = k + len(exclude)
    while True:
        matches = source.query(query, backbone.identity, metric, wanted, recipe)
        usable = [m for m in matches if m.entry.task not in exclude and m.entry.pair]
        if len(usable) >= k or len(matches) < wanted:
            break
        wanted *= 2  # keys without a value took places: look further down the ranking
    found: list[Retrieved] = []
    for match in matches:
        entry = match.entry
        if len(found) == k:
            break
        if entry.task in exclude:
            continue
        if not entry.pair:
            warnings.warn(f"skipped library key {entry.id} ({entry.task}): it has no value "
                          "prompt", KeyWithoutValueWarning, stacklevel=2)
            continue
        value, meta = decode_prompt(source.read_bytes(entry.pair))
        if meta.get("backbone") != backbone.identity:
            raise BackboneError(f"value {entry.pair} belongs to backbone {meta.get('backbone')}")
        found.append(Retrieved(entry.task, entry.id, entry.pair, float(match.similarity), value))
    return found


def weighted_average(values: Sequence[np.ndarray], similarities: Sequence[float]) -> np.ndarray:
    """sum_r w_r * value_r, w_r = max(sim_r, 0) / sum max(sim, 0); values must share one shape.

    A negative similarity weighs 0 (a dissimilar source is not subtracted: gradient keys give
    cosines near 0 of either sign); when none is positive, the plain average."""
    shapes = {v.shape for v in values}
    if len(shapes) != 1:
        raise ValueError(f"cannot average prompts of different shapes {sorted(shapes)}")
    weights = np.asarray(similarities, np.float64)
    if not np.isfinite(weights).all():
        raise ValueError(f"similarities must be finite, got {weights.tolist()}")
    weights = np.clip(weights, 0.0, None)
    total = weights.sum()
    weights = weights / total if total > 0 else np.full(len(values), 1 / len(values))
    return np.tensordot(weights, np.stack(values).astype(np.float64), axes=1).astype(np.float32)


def _as_binary(example: Example) -> Example:
    """Gold answer plus one distractor: only the gold answer's loss matters while mixing."""
    gold = example.choices[example.label]
    other = next(c for c in example.choices if c != gold)
    return Example(example.text, (gold, other), 0)


def mixture_task(target: Task, sources: Sequence[Task], seed: int = 0) -> Task:
    """Examples-proportional mix of the sources' and the target's training data (capped per task);
    validation and test stay the target's."""

    def load() -> dict[str, list[Example]]:
        rng = np.random.default_rng(seed)
        train_rows: list[Example] = []
        for task in [*sources, target]:
            rows = task.load("train")
            if len(rows) > MIXTURE_CAP:
                rows = [rows[i] for i in rng.choice(len(rows), MIXTURE_CAP, replace=False)]
            train_rows += [_as_binary(e) for e in rows]
        order = rng.permutation(len(train_rows))
        return {"train": [train_rows[i] for i in order], "validation": target.load("validation"),
                "test": target.load("test")}

    name = "mix_" + "+".join(t.name for t in sources) + "+" + target.name
    return Task(name, target.family, target.num_choices, target.metrics, load)


def train_from_prompt(
    backbone: Backbone, task: Task, config: TrainConfig, out: Path, prompt: np.ndarray, source: str,
    show_progress: bool = False,
) -> TrainResult:
    """A target run initialised from `prompt` (saved beside the run, so it resumes)."""
    out.mkdir(parents=True, exist_ok=True)
    init_file = out / "init.safetensors"
    if not init_file.is_file():
        save_for_backbone(init_file, prompt, backbone, task=source, role="value")
    run_config = dataclasses.replace(config, init=f"file:{init_file}", prompt_length=len(prompt))
    return train(backbone, task, run_config, out / "run", show_progress=show_progress)


def tune_target(
    backbone: Backbone, task: Task, retrieved: Sequence[Retrieved], strategy: str,
    config: TrainConfig, out: str | Path, source_tasks: Sequence[Task] = (),
    show_progress: bool = False,
) -> TransferResult:
    """Tune `task` from the retrieved sources with `strategy`; `source_tasks` feed the mixture.
    `show_progress`: a row counting the runs above each run's own progress."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if not retrieved:
        raise ValueError("nothing retrieved to transfer from")
    out = Path(out)
    runs: dict[str, TrainResult] = {}
    planned = {"best-of-k": len(retrieved), "weighted": 1, "mixture": 2}[strategy]
    with progress_bar(f"{strategy} runs", planned, enabled=show_progress) as bar:

        def run(name: str, out_dir: Path, prompt: np.ndarray, source: str) -> TrainResult:
            bar.update(len(runs), note=name)
            result = train_from_prompt(backbone, task, config, out_dir, prompt, source,
                                       show_progress)
            bar.update(len(runs) + 1)
            return result

        if strategy == "best-of-k":
            for r in retrieved:
                runs[r.task] = run(f"from {r.task}", out / f"from_{r.task}", r.value, r.task)
        elif strategy == "weighted":
            init = weighted_average([r.value for r in retrieved],
                                    [r.similarity for r in retrieved])
            runs["weighted"] = run("weighted", out / "weighted", init, "weighted")
        else:
            if len(source_tasks) != len(retrieved):
                raise ValueError("mixture needs the retrieved sources' tasks (source_tasks)")
            mixed = mixture_task(task, source_tasks, config.seed)
            bar.update(0, note="mixture")
            first = train(backbone, mixed, dataclasses.replace(config, task=mixed.name),
                          out / "mixture", show_progress=show_progress)
            runs["mixture"] = run("mixture -> target", out / "mixture_target", first.value,
                                  mixed.name)
    result = TransferResult(strategy, list(retrieved),
                            max(runs, key=lambda name: runs[name].value_score), runs)
    (out / "transfer.json").write_text(json.dumps(
        {"strategy": strategy, "chosen": result.chosen, "runs": result.runs,
         "retrieved": [{"task": r.task, "key": r.key_id, "value": r.value_id,
                        "similarity": r.similarity} for r in retrieved]}, indent=1))
    return result


def held_out_score(
    backbone: Backbone, task: Task, run: TrainResult, limit: int | None,
    show_progress: bool = False,
) -> float:
    """Primary test metric of a run's value prompt, cached in the run directory."""
    cache = run.out / f"test_{limit or 'all'}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["score"]
    score = evaluate(backbone, run.value, task, "test", limit=limit,
                     show_progress=show_progress)[task.metrics[0]]
    atomic_write(cache, json.dumps({"score": score, "metric": task.metrics[0]}).encode())
    return score


def run_transfer(
    backbone: Backbone, task: Task, config: TrainConfig, out: str | Path,
    source: PromptSource | None = None, *, retrieved: Sequence[Retrieved] | None = None,
    strategy: str = "best-of-k", k: int = 3, metric: str = DEFAULT_METRIC, recipe: str | None = None,
    baseline: bool = True, test_examples: int | None = None, test_every_run: bool = False,
    show_progress: bool = False,
) -> TransferReport:
    """The SPoT pipeline on target `task`, every step resumable under `out`:

    1. query: the target's key as `source`'s keys were made (`task_query`; a library whose keys
       record no protocol: a query prompt trained with `config` in out/query);
    2. retrieve the top-`k` sources by `metric` (the target itself excluded) — or take the
       given `retrieved` and skip 1-2;
    3. tune the target from them with `strategy` (out/<strategy>; a mixture reads the sources'
       registered tasks);
    4. baseline: `config` from its own init, at the same budget (out/baseline);
    5. test scores (the chosen run's, or with `test_every_run` every run's) on `test_examples`
       rows (None or 0: the whole split), and relative error reduction over the baseline."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    out = Path(out)
    phases = [*(["query"] if retrieved is None else []), "transfer", "test",
              *(["baseline", "baseline test"] if baseline else [])]
    with progress_bar("transfer", len(phases), enabled=show_progress) as bar:

        def phase(name: str) -> None:
            bar.update(phases.index(name), note=name)

        if retrieved is None:
            if source is None:
                raise ValueError("run_transfer needs a prompt source or the retrieved sources")
            phase("query")
            query = task_query(source, backbone, task, recipe, (config, out / "query"),
                               show_progress)
            retrieved = retrieve(source, backbone, query, k, metric, exclude=[task.name],
                                 recipe=recipe)
        phase("transfer")
        sources = [get_task(r.task) for r in retrieved] if strategy == "mixture" else []
        transfer = tune_target(backbone, task, retrieved, strategy, config, out / strategy,
                               sources, show_progress)
        phase("test")
        scored = transfer.results if test_every_run else {transfer.chosen: transfer.result}
        scores = {name: held_out_score(backbone, task, run, test_examples, show_progress)
                  for name, run in scored.items()}
        base_run, base_score = None, None
        if baseline:
            phase("baseline")
            base_run = train(backbone, task, config, out / "baseline", show_progress=show_progress)
            phase("baseline test")
            base_score = held_out_score(backbone, task, base_run, test_examples, show_progress)
        bar.update(len(phases), note="done")
    return TransferReport(task.name, task.metrics[0], transfer, scores, base_run, base_score)
