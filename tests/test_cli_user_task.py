"""A new user's own task, end to end through `spot`: file tasks, task specs, PEFT interop."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from tiny_tasks import polarity_rows
from typer.testing import CliRunner

from library import Library
from library.prompt_file import PEFT_SIDECAR, export_peft, import_peft, load_prompt
from spot.cli import app
from spot.tasks import Example, Task, register_task
from spot.tasks.files import read_rows


def write_reviews(path, n: int = 300, seed: int = 9) -> None:
    rows = [{"review": e.text, "label": e.choices[e.label].strip()} for e in polarity_rows(n, seed)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def library(cli, tmp_path):
    """A library of two tiny sources (polarity first), published with the config file."""
    invoke, names, config = cli
    root = tmp_path / "lib"
    for source in (names[0], names[2]):
        invoke("train-source", "--task", source, "--out", tmp_path / source, "--library", root,
               "--config", config)
    return root


def test_own_file_through_query_tune_target_and_eval(cli, library, tmp_path):
    invoke, names, config = cli
    data = tmp_path / "reviews.jsonl"
    write_reviews(data)
    file_task = ("--task", data, "--labels", "n,p", "--template", "{review}")
    out = invoke("query", *file_task, "--library", library, "--k", 2, "--metric", "flat")
    assert out.index(names[0]) < out.index(names[2])
    target = tmp_path / "target"
    out = invoke("tune-target", *file_task, "--library", library, "--config", config,
                 "--out", target, "--k", 1, "--metric", "flat", "--no-baseline",
                 "--eval-examples", 8, "--eval-every", 2, "--test-examples", 16)
    run = target / "best-of-k" / f"from_{names[0]}" / "run"
    used = json.loads((run / "config.json").read_text())
    assert (used["task"], used["eval_examples"], used["eval_every"]) == ("reviews", 8, 2)
    assert json.loads((run / "test_16.json").read_text())["metric"] == "accuracy"
    scored = json.loads(invoke("eval", *file_task, "--prompt", run / "value.safetensors",
                               "--limit", 16).splitlines()[-1])
    assert scored["task"] == "reviews" and 0 <= scored["accuracy"] <= 100


def test_train_and_train_source_take_a_task_spec(cli, library, tmp_path):
    invoke, names, config = cli
    write_reviews(tmp_path / "data.csv.jsonl")
    spec = tmp_path / "movie_reviews.json"
    spec.write_text(json.dumps({"data": "data.csv.jsonl", "labels": ["n", "p"],
                                "template": "{review}", "label_field": "label"}))
    invoke("train", "--task", spec, "--config", config, "--out", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task"] == "movie_reviews"
    out = invoke("train-source", "--task", spec, "--out", tmp_path / "src", "--library", library,
                 "--config", config)
    assert "published movie_reviews" in out
    assert {e.task for e in Library(library).list(role="value")} == {
        names[0], names[2], "movie_reviews"}


def test_label_field_names_the_label_column(cli, tmp_path):
    invoke, _, config = cli
    data = tmp_path / "topics.csv"
    rows = polarity_rows(120, 4)
    data.write_text("text,polarity\n" + "".join(
        f"{e.text},{e.choices[e.label].strip()}\n" for e in rows))
    out = invoke("train", "--task", data, "--labels", "n,p", "--label-field", "polarity",
                 "--config", config, "--out", tmp_path / "run", "--steps", 4)
    assert "value: step 4" in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["key_step"] == 4


def test_peft_export_import_and_eval_as_commands(cli, tmp_path, tiny_llama):
    invoke, names, config = cli
    invoke("train", "--config", config, "--out", tmp_path / "run")
    value = tmp_path / "run" / "value.safetensors"
    prompt, meta = load_prompt(value)
    adapter = tmp_path / "adapter"
    invoke("export", value, adapter, "--format", "peft", "--base-model", "org/tiny")
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == "org/tiny"
    assert peft_config["prompt_tuning_init"] == "RANDOM"  # the run's class_labels init
    kept = json.loads((adapter / PEFT_SIDECAR).read_text())
    assert (kept["task"], kept["step"], kept["backbone"]) == (
        names[0], meta["step"], tiny_llama.identity)
    back, back_meta = import_peft(adapter)
    assert np.array_equal(back, prompt) and back_meta["step"] == meta["step"]

    def score(path) -> float:
        out = invoke("eval", "--task", names[0], "--prompt", path, "--limit", 16)
        return json.loads(out.splitlines()[-1])["accuracy"]

    assert score(adapter) == score(value)  # eval reads an adapter directory
    key_adapter = tmp_path / "key_adapter"
    invoke("export", tmp_path / "run" / "key.safetensors", key_adapter)
    published = json.loads(invoke("publish", "--key", key_adapter, "--value", adapter,
                                  "--library", tmp_path / "lib"))
    assert Library(tmp_path / "lib").get(published["key"]).backbone == tiny_llama.identity

    invoke("export", value, tmp_path / "p.npy", "--format", "npy")
    assert np.array_equal(np.load(tmp_path / "p.npy"), prompt)
    bare = export_peft(prompt, tmp_path / "bare")  # another tool's adapter: no backbone
    result = CliRunner().invoke(app, ["publish", "--key", str(bare), "--library",
                                      str(tmp_path / "lib")])
    assert result.exit_code == 2 and "records no backbone" in result.output
    for source in (bare, tmp_path / "p.npy"):
        out_file = tmp_path / f"{source.stem}.safetensors"
        invoke("import", source, "--out", out_file, "--task", "mine")
        imported, imported_meta = load_prompt(out_file)
        assert np.array_equal(imported, prompt)
        assert (imported_meta["backbone"], imported_meta["task"]) == (tiny_llama.identity, "mine")


@pytest.mark.torch
def test_peft_reads_the_exported_command_output(cli, tmp_path):
    peft = pytest.importorskip("peft")
    invoke, _, config = cli
    invoke("train", "--config", config, "--out", tmp_path / "run")
    invoke("export", tmp_path / "run" / "value.safetensors", tmp_path / "adapter")
    peft_config = peft.PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    weights = peft.utils.load_peft_weights(str(tmp_path / "adapter"), device="cpu")
    prompt, _ = load_prompt(tmp_path / "run" / "value.safetensors")
    assert peft_config.num_virtual_tokens == len(prompt)
    assert np.array_equal(weights["prompt_embeddings"].numpy(), prompt)


def test_cleaning_warnings_only_with_verbose(cli, tmp_path, caplog):
    invoke, _, _ = cli

    def dirty_task(name: str) -> Task:
        path = tmp_path / f"{name}.txt"
        path.write_text("good film\n\nbad film\n" * 20)

        def load():
            rows = read_rows(path, lambda line: Example(line, (" n", " p"), int("good" in line)))
            return {"train": rows, "validation": rows, "test": rows}

        return register_task(Task(name, "sentiment", 2, ("accuracy",), load), replace=True)

    quiet, loud = dirty_task("dirty_quiet"), dirty_task("dirty_loud")
    with caplog.at_level(logging.WARNING):
        invoke("eval", "--task", quiet.name, "--limit", 4)
        assert not [r for r in caplog.records if "malformed" in r.getMessage()]
        invoke("--verbose", "eval", "--task", loud.name, "--limit", 4)
    dropped = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(dropped) == 1 and "dirty_loud.txt: dropped 20 malformed row(s)" in (
        dropped[0].getMessage())


def test_key_step_is_derived_from_steps_in_the_api_and_the_cli(cli, tmp_path):
    from spot.train import TrainConfig

    assert TrainConfig(task="x", steps=20).key_step == 3
    assert TrainConfig(task="x").key_step == 50  # 300 steps
    invoke, names, _ = cli
    invoke("train", "--task", names[0], "--steps", 20, "--eval-every", 20, "--eval-examples", 8,
           "--prompt-length", 2, "--max-length", 32, "--out", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["key_step"] == 3


def test_datasets_adapter_takes_in_memory_data():
    datasets = pytest.importorskip("datasets")
    from spot.tasks.adapters import task_from_hf_datasets

    rows = [{"text": e.text, "label": e.label} for e in polarity_rows(40, 5)]
    whole = datasets.Dataset.from_list(rows)
    task = task_from_hf_datasets(whole, name="mem", labels=["0", "1"], template="{text}")
    assert sum(len(task.load(split)) for split in ("train", "validation", "test")) == 40
    split = datasets.DatasetDict({"train": whole, "test": datasets.Dataset.from_list(rows[:8])})
    task = task_from_hf_datasets(split, name="mem2", labels=["0", "1"], template="{text}")
    assert len(task.load("test")) == 8 and task.load("test")[0].text == rows[0]["text"]


def test_retrieval_skips_a_key_published_without_a_value(tmp_path, tiny_llama):
    from spot.transfer import KeyWithoutValueWarning, retrieve

    store = Library(tmp_path / "lib")
    rng = np.random.default_rng(0)
    lonely, valued = (rng.normal(size=(2, tiny_llama.d_model)).astype(np.float32)
                      for _ in range(2))
    meta = {"backbone": tiny_llama.identity}
    store.publish(lonely, None, {**meta, "task": "key_only"})
    store.publish(valued, valued, {**meta, "task": "with_value"})
    with pytest.warns(KeyWithoutValueWarning, match="key_only"):
        found = retrieve(store, tiny_llama, lonely, k=1, metric="flat")
    assert [r.task for r in found] == ["with_value"]
