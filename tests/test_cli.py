"""`spot` commands that train read one JSON TrainConfig: the file sets it, flags override it."""

from __future__ import annotations

import json

import pytest
from test_api import TOKEN, serve
from tiny_tasks import polarity_rows
from typer.testing import CliRunner

from library import Library
from spot.cli import app
from spot.task_embedding import default_protocol, key_metadata
from spot.tasks import get_task


def run_config(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def test_train_source_reads_the_config_file_and_flags_win(cli, tmp_path):
    invoke, names, config = cli
    out = tmp_path / "source"
    invoke("train-source", "--task", names[2], "--out", out, "--library", tmp_path / "lib",
           "--config", config, "--steps", 12)
    used = run_config(out)
    assert used["task"] == names[2] and used["steps"] == 12  # flags
    assert {k: used[k] for k in ("learning_rate", "schedule", "init", "seed", "key_step")} == {
        "learning_rate": 0.05, "schedule": "linear", "init": "class_labels", "seed": 3,
        "key_step": 4}  # the file
    assert invoke.loaded == ["smollm2-135m"]  # the file named no backbone: TrainConfig's default
    entries = Library(tmp_path / "lib").list(task=names[2])
    assert sorted(e.role for e in entries) == ["key", "value"]


def test_train_source_defaults_without_a_file(cli, tmp_path):
    invoke, names, _ = cli
    out = tmp_path / "source"
    invoke("train-source", "--task", names[0], "--out", out, "--library", tmp_path / "lib",
           "--steps", 4, "--key-step", 2, "--eval-every", 2, "--prompt-length", 4)
    used = run_config(out)
    assert (used["steps"], used["key_step"], used["eval_every"]) == (4, 2, 2)
    # TrainConfig's defaults with smollm2-135m's recommended overrides (TrainConfig.build)
    assert used["learning_rate"] == 0.01 and used["schedule"] == "linear"
    assert used["init"] == "sampled_vocab" and used["batch_size"] == 8


def test_train_keeps_the_file_backbone_unless_flagged(cli, tmp_path):
    invoke, names, config = cli
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "backbone": "from-file"}))
    invoke("train", "--config", config, "--out", tmp_path / "a", "--steps", 4)
    invoke("train", "--config", config, "--out", tmp_path / "b", "--steps", 4,
           "--backbone", "from-flag")
    assert invoke.loaded == ["from-file", "from-flag"]
    assert run_config(tmp_path / "a")["key_step"] == 4  # the file's, not steps // 6


def publish_sources(invoke, sources, config, tmp_path):
    """`spot train-source` each source into tmp_path/lib; returns the library's path."""
    for source in sources:
        invoke("train-source", "--task", source, "--out", tmp_path / source, "--library",
               tmp_path / "lib", "--config", config)
    return tmp_path / "lib"


def test_query_and_tune_target_follow_the_library_protocol(cli, tmp_path):
    invoke, names, config = cli
    library = publish_sources(invoke, (names[0], names[2]), config, tmp_path)
    (protocol, default), = Library(library).protocols()
    assert protocol.recipe == "gradient" and default
    target = tmp_path / "target"
    invoke("tune-target", "--task", names[1], "--library", library, "--config", config,
           "--out", target, "--k", 1, "--test-examples", 16, "--no-baseline", "--metric", "flat")
    transfer = json.loads((target / "best-of-k" / "transfer.json").read_text())
    # names[1] holds the same rows as names[0]: the same protocol gives the same key
    assert [r["task"] for r in transfer["retrieved"]] == [names[0]]
    assert transfer["retrieved"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert not (target / "query").exists()  # no query training under a protocol
    used = run_config(target / "best-of-k" / f"from_{names[0]}" / "run")
    assert used["task"] == names[1] and used["eval_every"] == 4
    assert (used["learning_rate"], used["schedule"], used["seed"]) == (0.05, "linear", 3)
    query_out = invoke("query", "--task", names[1], "--library", library, "--k", 2)
    assert query_out.index(names[0]) < query_out.index(names[2])


def test_rekey_adds_keys_of_another_recipe_and_resumes(cli, tmp_path):
    invoke, names, config = cli
    library = tmp_path / "lib"
    invoke("train-source", "--task", names[0], "--out", tmp_path / "s", "--library", library,
           "--config", config)
    store = Library(library)
    (value,) = store.list(role="value")
    out = invoke("library", "rekey", library, "--recipe", "trained")
    assert f"{names[0]}: keyed" in out
    keys = store.list(role="key")
    assert sorted(store.get(k.id).protocol for k in keys) == sorted(
        p.id for p, _ in store.protocols())
    assert all(k.pair == value.id for k in keys)
    assert f"{names[0]}: already keyed" in invoke("library", "rekey", library, "--recipe", "trained")
    (trained, _), = [(p, d) for p, d in store.protocols() if p.recipe == "trained"]
    assert not _ and trained.steps > 0  # the first protocol (gradient) stays the default


def test_rekey_reports_sources_whose_task_cannot_be_loaded(cli, tmp_path, tiny_llama):
    invoke, names, config = cli
    library = Library(tmp_path / "lib")
    protocol, start = default_protocol(tiny_llama, "gradient")
    library.register_protocol(protocol, start)
    meta = {**key_metadata(protocol, get_task(names[0])), "task": "ghost"}
    ghost = library.publish((start, meta), (start, {"backbone": tiny_llama.identity}),
                            {"task": "ghost"})
    result = CliRunner().invoke(app, ["library", "rekey", str(library.root), "--recipe", "trained"])
    assert result.exit_code == 1
    assert f"not rebuilt ghost (value {ghost.value})" in result.output
    assert "1 source(s) could not be re-keyed" in result.output
    assert library.count(role="key") == 1  # nothing written for it


def test_library_commands_refuse_a_missing_library(cli, tmp_path):
    result = CliRunner().invoke(app, ["library", "list", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "is not a prompt library" in " ".join(result.output.split())
    assert not (tmp_path / "nope").exists()


def test_query_takes_the_users_task_file(cli, tmp_path):
    invoke, names, config = cli
    library = publish_sources(invoke, (names[0], names[2]), config, tmp_path)
    rows = [{"review": e.text, "label": e.choices[e.label].strip()} for e in polarity_rows(300, 9)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = invoke("query", "--task", data, "--labels", "n,p", "--template", "{review}",
                 "--library", library, "--k", 2, "--metric", "flat")
    assert out.index(names[0]) < out.index(names[2])  # the polarity source ranks first
    with serve(library) as server:  # the same query through the service and its client
        remote = invoke("query", "--task", data, "--labels", "n,p", "--template", "{review}",
                        "--remote", server.url, "--token", TOKEN, "--k", 2, "--metric", "flat")
    assert remote == out
    result = CliRunner().invoke(app, ["query", "--task", str(data), "--library", str(library)])
    assert result.exit_code == 2 and "--labels" in result.output


def test_study_over_a_library_runs_the_grid_its_picks_and_weighted_init(cli, tmp_path,
                                                                       monkeypatch):
    """The sources come from the library: a source task whose data is gone still takes part."""
    from spot.tasks import MissingDataError, Task, registry

    invoke, names, config = cli
    library = publish_sources(invoke, (names[0], names[2]), config, tmp_path)
    gone = get_task(names[2])

    def missing() -> dict:
        raise MissingDataError(f"{names[2]}: no data here")

    monkeypatch.setitem(registry._TASKS, gone.name,  # restored after the test
                        Task(gone.name, gone.family, gone.num_choices, gone.metrics, missing))
    out = tmp_path / "study"
    invoke("study", "--library", library, "--sources", f"{names[0]},{names[2]}", "--targets",
           names[1], "--out", out, "--target-config", config, "--pick-seeds", "1", "--k", "1",
           "--test-examples", 16)
    study = json.loads((out / "study.json").read_text())
    assert study["source"] is None and study["library"] == str(library)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["source"], r["seed"]) for r in rows if r["seed"] == 0] == [
        (names[0], 0), (names[2], 0)]
    # names[1] holds names[0]'s rows: the same protocol gives the same key, the top pick
    assert [r["source"] for r in rows if r["seed"] == 1] == [names[0]]
    assert rows[0]["similarity"]["gradient/flat"] == pytest.approx(1.0, abs=1e-5)
    weighted = [json.loads(line) for line in (out / "weighted.jsonl").read_text().splitlines()]
    assert [(w["seed"], w["sources"]) for w in weighted] == [(0, [names[0]]), (1, [names[0]])]
