"""`spot` commands that train read one JSON TrainConfig: the file sets it, flags override it."""

from __future__ import annotations

import json

import pytest
from tiny_tasks import register_tiny_tasks
from typer.testing import CliRunner

from library import Library
from spot import backbones
from spot.cli import app

FILE = dict(prompt_length=4, batch_size=8, steps=8, key_step=4, eval_every=4, eval_examples=16,
            max_length=32, learning_rate=0.05, schedule="linear", init="class_labels", seed=3)


@pytest.fixture
def cli(tiny_llama, monkeypatch, tmp_path):
    """Run `spot ...` in-process on the tiny model; returns (invoke, task names, config file)."""
    names = register_tiny_tasks()
    loaded: list[str] = []

    def load(name: str = backbones.DEFAULT_BACKBONE):
        loaded.append(str(name))
        return tiny_llama

    monkeypatch.setattr(backbones, "load", load)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"task": names[0], **FILE}))

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    invoke.loaded = loaded
    return invoke, names, config


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
    assert used["learning_rate"] == 0.3 and used["schedule"] == "constant"


def test_train_keeps_the_file_backbone_unless_flagged(cli, tmp_path):
    invoke, names, config = cli
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "backbone": "from-file"}))
    invoke("train", "--config", config, "--out", tmp_path / "a", "--steps", 4)
    invoke("train", "--config", config, "--out", tmp_path / "b", "--steps", 4,
           "--backbone", "from-flag")
    assert invoke.loaded == ["from-file", "from-flag"]
    assert run_config(tmp_path / "a")["key_step"] == 4  # the file's, not steps // 6


def test_query_and_tune_target_train_with_the_config_file(cli, tmp_path):
    invoke, names, config = cli
    library = tmp_path / "lib"
    for source in (names[0], names[2]):
        invoke("train-source", "--task", source, "--out", tmp_path / source, "--library", library,
               "--config", config)
    target = tmp_path / "target"
    invoke("tune-target", "--task", names[1], "--library", library, "--config", config,
           "--out", target, "--k", 1, "--test-examples", 16, "--no-baseline")
    transfer = json.loads((target / "best-of-k" / "transfer.json").read_text())
    assert [r["task"] for r in transfer["retrieved"]] == [names[0]]
    for run_dir in (target / "query", target / "best-of-k" / f"from_{names[0]}" / "run"):
        used = run_config(run_dir)
        assert used["task"] == names[1]
        assert (used["learning_rate"], used["schedule"], used["seed"]) == (0.05, "linear", 3)
    assert run_config(target / "best-of-k" / f"from_{names[0]}" / "run")["eval_every"] == 4
    query_out = invoke("query", "--task", names[1], "--library", library, "--config", config,
                       "--out", tmp_path / "query", "--key-step", 2, "--k", 2)
    assert run_config(tmp_path / "query")["steps"] == 2
    assert names[2] in query_out  # k=2 of the two sources
