"""Transfer: retrieval from a library, the three strategies, the pipeline, the study."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_tasks import publish_tiny_sources, register_tiny_tasks

from library import Library, LibraryError
from spot.analysis import relative_error_reduction
from spot.tasks import get_task
from spot.train import TrainConfig, train
from spot.transfer import (
    mixture_task,
    query_prompt,
    retrieve,
    run_transfer,
    tune_target,
    weighted_average,
)

CFG = dict(prompt_length=4, batch_size=8, steps=16, key_step=8, eval_every=8, eval_examples=32,
           max_length=32)


def test_weighted_average():
    a, b = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    np.testing.assert_allclose(weighted_average([a, b], [3.0, 1.0]), np.full((2, 3), 0.75))
    with pytest.raises(ValueError, match="shapes"):
        weighted_average([a, np.ones((3, 3))], [1, 1])
    # a negative similarity weighs 0; none positive: the plain average
    np.testing.assert_allclose(weighted_average([a, b], [0.2, -0.1]), a)
    np.testing.assert_allclose(weighted_average([a, b], [0.0, -0.3]), np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="finite"):
        weighted_average([a, b], [float("nan"), 1.0])


def test_mixture_is_examples_proportional_and_keeps_target_eval():
    names = register_tiny_tasks()
    target, sources = get_task(names[1]), [get_task(names[0]), get_task(names[2])]
    mixed = mixture_task(target, sources)
    train_rows = mixed.load("train")
    assert len(train_rows) == sum(len(t.load("train")) for t in [*sources, target])
    assert all(len(e.choices) == 2 and e.label == 0 for e in train_rows)
    assert mixed.load("validation") == target.load("validation")


@pytest.fixture(scope="module")
def source_library(tiny_llama, tmp_path_factory):
    names = register_tiny_tasks()
    root = tmp_path_factory.mktemp("sources")
    library = Library(root / "library")
    for name in (names[0], names[2]):
        config = TrainConfig(task=name, **CFG)
        run = train(tiny_llama, get_task(name), config, root / name, show_progress=False)
        library.publish(run.out / "key.safetensors", run.out / "value.safetensors", {"task": name})
    return library, names


def test_query_retrieves_sources_and_every_strategy_runs(tiny_llama, source_library, tmp_path):
    library, names = source_library
    target = get_task(names[1])
    config = TrainConfig(task=names[1], **CFG)
    query = query_prompt(tiny_llama, target, config, tmp_path / "query")
    found = retrieve(library, tiny_llama, query, k=2, metric="token")
    assert {r.task for r in found} == {names[0], names[2]}
    assert found[0].similarity >= found[1].similarity
    for strategy in ("best-of-k", "weighted", "mixture"):
        sources = [get_task(r.task) for r in found] if strategy == "mixture" else []
        result = tune_target(tiny_llama, target, found, strategy, config, tmp_path / strategy,
                             sources)
        assert result.result.value is not None and result.runs
        summary = json.loads((tmp_path / strategy / "transfer.json").read_text())
        assert summary["strategy"] == strategy
    best = tune_target(tiny_llama, target, found, "best-of-k", config, tmp_path / "best-of-k")
    assert best.result.value_score == max(best.runs.values())  # resumed runs, same choice
    with pytest.raises(ValueError, match="strategy"):
        tune_target(tiny_llama, target, found, "magic", config, tmp_path / "x")


def test_run_transfer_reports_test_scores_and_relative_error_reduction(
    tiny_llama, source_library, tmp_path,
):
    library, names = source_library
    target = get_task(names[1])
    config = TrainConfig(task=names[1], **CFG)
    with pytest.warns(UserWarning, match="no key protocol"):  # keys published without one
        report = run_transfer(tiny_llama, target, config, tmp_path, library, k=2,
                              test_examples=32)
    assert (tmp_path / "query" / "key.safetensors").is_file()
    assert {r.task for r in report.retrieved} == {names[0], names[2]}
    assert list(report.test_scores) == [report.transfer.chosen]
    assert report.relative_error_reduction() == pytest.approx(
        relative_error_reduction(report.baseline_score, report.score))
    assert report.baseline.out == tmp_path / "baseline"
    given = run_transfer(tiny_llama, target, config, tmp_path, retrieved=report.retrieved,
                         baseline=False, test_examples=32, test_every_run=True)
    assert set(given.test_scores) == {names[0], names[2]} and given.baseline_score is None
    assert given.score == report.score  # the same (resumed) runs
    assert given.relative_error_reduction() is None


def test_retrieval_excludes_and_never_mixes_backbones(tiny_llama, source_library):
    from conftest import make_tiny_llama

    library, names = source_library
    other = make_tiny_llama(seed=9)
    query = np.ones((4, 32), np.float32)
    with pytest.raises(LibraryError, match="unknown backbone"):  # never mixes backbones
        retrieve(library, other, query, k=2)
    found = retrieve(library, tiny_llama, query, k=2, exclude=[names[0]])
    assert [r.task for r in found] == [names[2]]


def test_study_writes_results_and_resumes(tiny_llama, tmp_path):
    from spot.study import StudyConfig, run_study

    names = register_tiny_tasks()
    base = dict(prompt_length=4, key_step=4, eval_every=8, eval_examples=32, max_length=32)
    config = StudyConfig(sources=(names[0], names[2]), targets=(names[1],),
                         source=TrainConfig(task=names[0], steps=8, **base),
                         target=TrainConfig(task=names[1], steps=8, **base), seeds=(0,),
                         test_examples=32)
    run_study(tiny_llama, config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {(r["source"], r["target"]) for r in rows} == {(names[0], names[1]), (names[2], names[1])}
    for row in rows:
        assert row["relative_error_reduction"] == pytest.approx(
            relative_error_reduction(row["baseline_score"], row["transfer_score"]))
        assert -1.0 <= row["similarity"]["token"] <= 1.0
    sims = [json.loads(line) for line in (tmp_path / "similarity.jsonl").read_text().splitlines()]
    assert len(sims) == 2 * 3 * 3
    assert all(s["similarity"] == pytest.approx(1.0, abs=1e-5) for s in sims if s["a"] == s["b"]
               and s["metric"] == "mean")
    before = (tmp_path / "results.jsonl").read_text()
    run_study(tiny_llama, config, tmp_path)  # everything done: same rows
    assert (tmp_path / "results.jsonl").read_text() == before


def test_library_study_scores_zero_step_picks_weighted_and_resumes_from_results(
    tiny_llama, tmp_path,
):
    import shutil

    from spot.evaluation import evaluate
    from spot.study import StudyConfig, run_study

    names = register_tiny_tasks()
    base = TrainConfig(task=names[0], steps=8, prompt_length=4, eval_every=8, eval_examples=32,
                       max_length=32)
    library = Library(tmp_path / "library")
    values = publish_tiny_sources(tiny_llama, library, (names[0], names[2]), base,
                                  tmp_path / "sources")
    config = StudyConfig(sources=(names[0], names[2]), targets=(names[1],), source=None,
                         target=base, seeds=(0,), test_examples=32, library=str(library.root),
                         pick_seeds=(1,), k=1, baseline_inits=("class_labels", "sampled_vocab"))
    out = tmp_path / "study"
    run_study(tiny_llama, config, out)

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    expected_names = {f"gradient/{m}" for m in ("mean", "token", "flat")} | {
        f"trained/{p}{m}" for p in ("", "delta-") for m in ("mean", "token", "flat")}
    assert all(set(r["similarity"]) == expected_names for r in rows)
    seed0 = {r["source"]: r for r in rows if r["seed"] == 0}
    assert set(seed0) == {names[0], names[2]}
    top = max(seed0, key=lambda s: seed0[s]["similarity"]["gradient/token"])
    assert [r["source"] for r in rows if r["seed"] == 1] == [top]  # pick seeds: top-1 only
    target = get_task(names[1])
    for source, r in seed0.items():  # zero-step: the value scored untuned on the same rows
        assert r["zero_step_score"] == pytest.approx(
            evaluate(tiny_llama, values[source], target, "test", limit=32)["accuracy"])
        assert r["relative_error_reduction"] == pytest.approx(
            relative_error_reduction(r["baseline_score"], r["transfer_score"]))
    weighted = [json.loads(line) for line in (out / "weighted.jsonl").read_text().splitlines()]
    assert [(w["seed"], w["sources"], w["by"]) for w in weighted] == [
        (0, [top], "gradient/token"), (1, [top], "gradient/token")]
    choice = json.loads((out / "targets" / names[1] / "init.json").read_text())
    assert choice["init"] == max(choice["validation"], key=choice["validation"].get)
    assert rows[0]["baseline_score"] == weighted[0]["baseline_score"]
    sims = [json.loads(line) for line in (out / "similarity.jsonl").read_text().splitlines()]
    assert {s["metric"] for s in sims} == expected_names
    assert {s["a"] for s in sims} == {names[0], names[1], names[2]}

    # a fresh checkout keeps only the result files: nothing is trained again
    before = {f: (out / f).read_text() for f in ("results.jsonl", "weighted.jsonl")}
    shutil.rmtree(out / "targets")
    run_study(tiny_llama, config, out)
    assert not (out / "targets").exists()
    assert {f: (out / f).read_text() for f in before} == before


def tiny_gradient_library(tiny_llama, tmp_path):
    """(tiny task names, a 4-step config, a library of sources names[0] and names[2])."""
    names = register_tiny_tasks()
    base = TrainConfig(task=names[0], steps=4, prompt_length=4, eval_every=4, eval_examples=16,
                       max_length=32)
    library = Library(tmp_path / "library")
    publish_tiny_sources(tiny_llama, library, (names[0], names[2]), base, tmp_path / "sources",
                         recipes=("gradient",))
    return names, base, library


def test_library_study_takes_sources_whose_task_is_not_registered(tiny_llama, tmp_path,
                                                                   monkeypatch):
    """A library's sources need not be tasks of this install: tasks.json omits their family."""
    from spot.study import StudyConfig, run_study
    from spot.tasks.registry import _TASKS

    names, base, library = tiny_gradient_library(tiny_llama, tmp_path)
    monkeypatch.delitem(_TASKS, names[2])  # the source was published elsewhere
    config = StudyConfig(sources=(names[0], names[2]), targets=(names[1],), source=None,
                         target=base, test_examples=16, library=str(library.root), k=1)
    out = tmp_path / "study"
    run_study(tiny_llama, config, out)
    meta = json.loads((out / "tasks.json").read_text())
    assert meta[names[2]] == {"role": "source"}
    assert meta[names[0]] == {"role": "source", "family": get_task(names[0]).family}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["source"] for r in rows} == {names[0], names[2]}


def test_every_retrieval_entry_point_defaults_to_one_metric():
    import inspect

    from library import DEFAULT_METRIC, Library
    from retrieval_api.client import RetrievalClient
    from retrieval_api.schemas import QueryOptions
    from spot import cli
    from spot.transfer import retrieve, run_transfer

    functions = (Library.query, Library.query_many, RetrievalClient.query, retrieve, run_transfer,
                 cli.query, cli.tune_target)
    defaults = {f.__qualname__: inspect.signature(f).parameters["metric"].default
                for f in functions}
    defaults["QueryOptions"] = QueryOptions(backbone="b").metric
    assert defaults == dict.fromkeys(defaults, DEFAULT_METRIC)


def test_study_config_refuses_inconsistent_grids():
    from spot.study import StudyConfig

    target = TrainConfig(task="rte")
    with pytest.raises(ValueError, match="not both"):
        StudyConfig(("a",), ("b",), target, target, library="lib")
    with pytest.raises(ValueError, match="need a library"):
        StudyConfig(("a",), ("b",), target, target, pick_seeds=(1,))
    with pytest.raises(ValueError, match="overlap"):
        StudyConfig(("a",), ("b",), None, target, library="lib", pick_seeds=(0,))


def test_library_study_given_more_sources_keeps_cells_and_redoes_stale_picks(tiny_llama, tmp_path):
    from spot.study import StudyConfig, run_study

    names, base, library = tiny_gradient_library(tiny_llama, tmp_path)
    out = tmp_path / "study"

    def study(sources):
        config = StudyConfig(sources=sources, targets=(names[1],), source=None, target=base,
                             test_examples=16, library=str(library.root), k=2)
        run_study(tiny_llama, config, out)
        return ([json.loads(line) for line in (out / f).read_text().splitlines()]
                for f in ("results.jsonl", "weighted.jsonl"))

    (first,), (weighted,) = study((names[0],))
    assert weighted["sources"] == [names[0]]
    rows, (again,) = study((names[0], names[2]))
    assert rows[0] == first  # the finished cell is kept, not run again
    assert sorted(again["sources"]) == sorted([names[0], names[2]])  # new picks: a new run
    assert len(list((out / "targets" / names[1] / "seed0").glob("weighted-*"))) == 2


def test_library_study_runs_every_target_at_a_seed_before_the_next_seed(
    tiny_llama, tmp_path, monkeypatch,
):
    import spot.study
    from spot.study import StudyConfig, run_study

    names = register_tiny_tasks()
    base = TrainConfig(task=names[0], steps=4, prompt_length=4, eval_every=4, eval_examples=16,
                       max_length=32)
    library = Library(tmp_path / "library")
    publish_tiny_sources(tiny_llama, library, (names[0],), base, tmp_path / "sources",
                         recipes=("gradient",))
    calls = []

    def recorded(backbone, task, config, *args, **kwargs):
        calls.append((config.seed, task.name))
        return run_transfer(backbone, task, config, *args, **kwargs)

    monkeypatch.setattr(spot.study, "run_transfer", recorded)
    config = StudyConfig(sources=(names[0],), targets=(names[1], names[2]), source=None,
                         target=base, seeds=(0,), test_examples=16, library=str(library.root),
                         pick_seeds=(1,), k=1)
    run_study(tiny_llama, config, tmp_path / "study")
    # per (seed, target): the cell, then the weighted top-1 run
    assert calls == [(seed, t) for seed in (0, 1) for t in (names[1], names[2]) for _ in (0, 1)]
