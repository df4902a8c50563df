"""spot.tasks: every registered task on the real data, metrics, splits, user files, errors."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from spot.tasks import (
    FAMILIES,
    METRICS,
    SPLITS,
    Example,
    MissingDataError,
    Task,
    TaskError,
    accuracy,
    adapters,
    bigbench,
    data_root,
    f1,
    files,
    get_task,
    list_tasks,
    macro_f1,
    mcc,
    register_task,
    task_from_file,
)
from spot.tasks.__main__ import UNAVAILABLE, table
from spot.tasks.__main__ import main as tasks_main
from spot.tasks.registry import _TASKS
from spot.tasks.sentence import letters_and_digits
from spot.tasks.splits import carve, complete_splits, split_single

FILE_TASKS = ["sst2", "sst5", "mr", "subj", "mpqa", "trec", "agnews", "cola"]
FILE_TASKS += ["rte", "cb", "boolq", "copa", "multirc", "wsc"]
BIGBENCH_TASKS = [name for name in list_tasks() if name.startswith("bigbench_")]


@functools.cache
def _loaded(name: str) -> dict[str, list[Example]]:
    return get_task(name).load_all()


def load_or_skip(name: str) -> dict[str, list[Example]]:
    """The task's splits, parsed once per test session; skip when its data is absent."""
    try:
        return _loaded(name)
    except MissingDataError as error:
        pytest.skip(str(error))


# --- registered tasks on the real data ---------------------------------------------


def test_registry_has_the_suite():
    assert set(FILE_TASKS) <= set(list_tasks())
    assert len(BIGBENCH_TASKS) >= 10
    assert list_tasks() == sorted(list_tasks())
    assert {get_task(name).family for name in list_tasks()} <= set(FAMILIES)


@pytest.mark.parametrize("name", list_tasks())
def test_task_loads_well_formed_and_deterministic(name):
    data = load_or_skip(name)
    task = get_task(name)
    assert task.splits() == SPLITS == tuple(data)
    for split, examples in data.items():
        assert examples, f"{name}/{split} is empty"
        for example in examples:
            assert example.text.strip()
            assert len(example.choices) == task.num_choices
            assert all(
                choice[0] == " " and choice.strip() for choice in example.choices
            )
            assert 0 <= example.label < task.num_choices
    if name != "copa":  # COPA's choices are its per-example alternatives
        assert len({e.choices for split in data.values() for e in split}) == 1
    assert (
        task.load_all() == data
    )  # a fresh parse gives the same rows in the same order
    assert task.load("validation") == data["validation"]


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("sst2", (60614 + 5459 - 691, 1276, 872)),  # less validation sentences' root phrases
        ("sst5", (8544, 1101, 2210)),
        ("mr", (8696, 966, 1000)),
        ("subj", (8100, 900, 1000)),
        ("mpqa", (8643, 960, 1000)),
        ("trec", (4907, 545, 500)),
        ("agnews", (9001, 1000, 7600)),
        ("cola", (7696, 855, 1043)),
        ("rte", (2241, 249, 277)),
        ("cb", (225, 25, 56)),
        ("boolq", (32, 327, 2943)),
        ("copa", (32, 10, 90)),
        ("multirc", (154, 459, 4389)),
        ("wsc", (42, 10, 52)),
    ],
)
def test_split_sizes_follow_the_documented_rule(name, sizes):
    data = load_or_skip(name)
    assert tuple(len(data[split]) for split in SPLITS) == sizes


@pytest.mark.parametrize("name", FILE_TASKS + BIGBENCH_TASKS)
def test_every_split_holds_more_than_one_label(name):
    """A split with one label trains (or tests) a constant answer (FewGLUE's wsc train did)."""
    data = load_or_skip(name)
    single = [split for split in SPLITS if len({e.label for e in data[split]}) < 2]
    assert not single, f"{name}: one label in {single}"


def test_templates_and_verbalisers():
    sst2 = load_or_skip("sst2")["test"][0]
    assert sst2.text == (
        "Sentence: it 's a charming and often affecting journey .\n"
        "The sentiment of the sentence is"
    )
    assert (sst2.choices, sst2.label) == ((" negative", " positive"), 1)
    copa = load_or_skip("copa")["test"][0]
    assert copa.text == "The man turned on the faucet so"
    assert copa.choices == (
        " the toilet filled with water.",
        " water flowed from the spout.",
    )
    assert copa.label == 1
    rte = load_or_skip("rte")["test"][0]
    assert rte.text.endswith(
        "\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:"
    )
    assert rte.label == 1  # not_entailment -> " False"


def test_malformed_rows_are_dropped_with_a_count(caplog):
    path = data_root() / "mpqa" / "mpqa.all"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    files._warned.clear()  # another test may have loaded mpqa already
    with caplog.at_level(logging.WARNING, logger="spot.tasks"):
        get_task("mpqa").load_all()
        get_task("mpqa").load_all()  # the same file again: no second warning
    assert caplog.text.count("dropped 3 malformed row(s) of 10606") == 1
    assert "line 6415" in caplog.text


def test_missing_data_root_names_the_path(monkeypatch, tmp_path):
    monkeypatch.setenv("SPOT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(
        MissingDataError, match=str(tmp_path / "nowhere" / "sst2" / "train.tsv")
    ):
        get_task("sst2").load("train")


def test_default_data_root_is_beside_the_repo(monkeypatch):
    monkeypatch.delenv("SPOT_DATA", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert data_root() == repo.parent / "shared" / "data"


# --- registry and Task ----------------------------------------------------------------


def _toy_task(name: str = "toy", **overrides) -> Task:
    example = Example("x", (" a", " b"), 0)
    fields = {
        "name": name,
        "family": "user",
        "num_choices": 2,
        "metrics": ("accuracy",),
    }
    fields |= overrides
    return Task(loader=lambda: {split: [example] for split in SPLITS}, **fields)


def test_unknown_task_lists_known_names():
    with pytest.raises(TaskError, match="unknown task 'nope'.*sst2"):
        get_task("nope")


def test_register_task_rejects_duplicates_unless_replace(monkeypatch):
    monkeypatch.setattr("spot.tasks.registry._TASKS", dict(_TASKS))
    task = register_task(_toy_task())
    assert get_task("toy") is task
    with pytest.raises(TaskError, match="already registered"):
        register_task(_toy_task())
    replacement = register_task(_toy_task(metrics=("f1",)), replace=True)
    assert get_task("toy") is replacement
    with pytest.raises(TaskError, match="expects a Task"):
        register_task("toy")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"family": "poetry"}, "family"),
        ({"metrics": ("bleu",)}, "metrics"),
        ({"metrics": ()}, "metrics"),
        ({"num_choices": 1}, "num_choices"),
        ({"name": "two words"}, "name"),
    ],
)
def test_task_validates_its_definition(overrides, message):
    with pytest.raises(TaskError, match=message):
        _toy_task(**overrides)


def test_task_load_checks_split_and_choice_count():
    with pytest.raises(TaskError, match="unknown split 'dev'"):
        _toy_task().load("dev")
    with pytest.raises(TaskError, match="2 choices, task has 3"):
        _toy_task(num_choices=3).load_all()


@pytest.mark.parametrize(
    ("text", "choices", "label"),
    [
        ("  ", (" a", " b"), 0),
        ("x", (" a",), 0),
        ("x", (" a", " a"), 0),
        ("x", [" a", " b"], 0),
        ("x", (" a", ""), 0),
        ("x", (" a", " b"), 2),
        ("x", (" a", " b"), True),
    ],
)
def test_example_rejects_bad_fields(text, choices, label):
    with pytest.raises(TaskError):
        Example(text, choices, label)


# --- metrics -------------------------------------------------------------------------


def test_binary_metrics_match_hand_computed_values():
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # TP 2, FP 1, FN 1, TN 1
    assert accuracy(predictions, labels) == pytest.approx(60.0)
    assert f1(predictions, labels) == pytest.approx(100 * 4 / 6)
    assert f1(predictions, labels, positive=0) == pytest.approx(
        100 * 2 / 4
    )  # TP 1, FP 1, FN 1
    assert mcc(predictions, labels) == pytest.approx(100 * (2 * 1 - 1 * 1) / 6)


def test_macro_f1_over_classes_in_labels_or_predictions():
    labels, predictions = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert macro_f1(predictions, labels) == pytest.approx(
        100 * (1 / 2 + 4 / 5 + 2 / 3) / 3
    )
    # class 1 appears only as a (wrong) prediction: it counts, with F1 0
    assert macro_f1([0, 1], [0, 0]) == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert macro_f1([2, 2], [2, 2]) == pytest.approx(100.0)


def test_mcc_edge_cases():
    assert mcc([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(100.0)
    assert mcc([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-100.0)
    assert mcc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions: 0, not NaN
    assert mcc([1, 1], [1, 1]) == 0.0
    # three classes: trace 4 of 6, gold counts (2, 2, 2), predicted counts (2, 3, 1)
    expected = (4 * 6 - (2 * 2 + 2 * 3 + 2 * 1)) / np.sqrt((36 - 14) * (36 - 12))
    assert mcc([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(100 * expected)


def test_f1_without_any_positive_is_zero():
    assert f1([0, 0], [0, 0]) == 0.0


@pytest.mark.parametrize(
    ("predictions", "labels"),
    [([0, 1], [0]), ([], []), ([0.0, 1.0], [0, 1]), ([[0, 1]], [[0, 1]])],
)
def test_metrics_reject_bad_input(predictions, labels):
    for metric in METRICS.values():
        with pytest.raises(ValueError):
            metric(predictions, labels)


def test_task_evaluate_reports_its_metrics():
    scores = get_task("cola").evaluate([1, 0, 1, 1], [1, 0, 0, 1])
    assert list(scores) == ["mcc", "accuracy"]
    assert scores["accuracy"] == pytest.approx(75.0)
    assert scores["mcc"] == pytest.approx(
        100 * (2 * 1 - 1 * 0) / np.sqrt(3 * 2 * 1 * 2)
    )
    assert list(get_task("cb").evaluate([0, 1, 2], [0, 1, 1])) == [
        "accuracy",
        "macro_f1",
    ]


# --- splits --------------------------------------------------------------------------


def test_carve_is_deterministic_ordered_and_capped():
    items = list(range(50))
    kept, held = carve(items, "demo/validation")
    assert (kept, held) == carve(items, "demo/validation")
    assert len(held) == 5 and sorted(kept + held) == items
    assert kept == sorted(kept) and held == sorted(held)
    assert carve(items, "other/validation")[1] != held
    assert len(carve(list(range(30000)), "big")[1]) == 1000
    assert len(carve([1, 2], "tiny")[1]) == 1
    with pytest.raises(TaskError, match="cannot carve"):
        carve([1], "one")


def test_complete_and_single_splits():
    parts = complete_splits("demo", {"train": list(range(20)), "test": ["t"]})
    assert [len(parts[s]) for s in SPLITS] == [18, 2, 1]
    assert [len(x) for x in split_single("demo", list(range(100))).values()] == [
        81,
        9,
        10,
    ]
    with pytest.raises(TaskError, match="need splits"):
        complete_splits("demo", {"train": [1, 2], "validation": [3]})


# --- user files ----------------------------------------------------------------------

LABELS = ["neg", "pos"]


def _rows(n: int = 30) -> list[dict[str, str]]:
    return [{"review": f"review number {i}", "label": LABELS[i % 2]} for i in range(n)]


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text(
            "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
        )
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(row.values()) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_task_from_file_single_file_is_carved(tmp_path, suffix):
    path = _write(tmp_path / f"data{suffix}", _rows())
    task = task_from_file(
        path,
        name="reviews",
        labels=LABELS,
        template="Review: {review}\nSentiment:",
        choices=["negative", "positive"],
        family="sentiment",
        metrics=("accuracy", "f1"),
    )
    data = task.load_all()
    assert [len(data[s]) for s in SPLITS] == [25, 2, 3]
    example = data["train"][0]
    assert example == Example(
        "Review: review number 0\nSentiment:", (" negative", " positive"), 0
    )
    assert task.num_choices == 2 and task.family == "sentiment"
    assert task.load_all() == data


def test_task_from_file_split_mapping_and_json_labels(tmp_path):
    rows = [{"text": f"t{i}", "label": bool(i % 2)} for i in range(12)]
    train = _write(tmp_path / "train.jsonl", rows)
    test = _write(tmp_path / "test.jsonl", rows[:4])
    task = task_from_file(
        {"train": train, "test": test}, name="flags", labels=["false", "true"]
    )
    data = task.load_all()
    assert [len(data[s]) for s in SPLITS] == [11, 1, 4]
    assert data["test"][1] == Example("t1", (" false", " true"), 1)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_task_from_file_bad_label_names_the_row(tmp_path, suffix):
    rows = _rows(5)
    rows[3]["label"] = "meh"
    path = _write(tmp_path / f"data{suffix}", rows)
    task = task_from_file(path, name="bad", labels=LABELS, template="{review}")
    line = 4 if suffix == ".jsonl" else 5  # csv/tsv have a header line
    with pytest.raises(
        TaskError, match=rf"data{suffix}:{line}: label 'meh' not in labels"
    ):
        task.load_all()


def test_task_from_file_rejects_malformed_rows(tmp_path):
    path = _write(tmp_path / "data.jsonl", _rows(5))
    with pytest.raises(TaskError, match=r"data.jsonl:1: missing or empty field 'text'"):
        task_from_file(path, name="x", labels=LABELS).load_all()
    broken = tmp_path / "broken.csv"
    broken.write_text("review,label\nfine,pos\nno label column\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"broken.csv:3: expected 2 columns"):
        task_from_file(broken, name="x", labels=LABELS, template="{review}").load_all()
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"review": "a", "label": "pos"}\n{oops\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"bad.jsonl:2: invalid JSON"):
        task_from_file(
            bad_json, name="x", labels=LABELS, template="{review}"
        ).load_all()


def test_task_from_file_checks_arguments(tmp_path):
    path = _write(tmp_path / "data.jsonl", _rows(5))
    with pytest.raises(MissingDataError, match="missing.jsonl"):
        task_from_file(tmp_path / "missing.jsonl", name="x", labels=LABELS)
    (tmp_path / "data.txt").write_text("x\n")
    with pytest.raises(TaskError, match="unsupported file type"):
        task_from_file(tmp_path / "data.txt", name="x", labels=LABELS)
    with pytest.raises(TaskError, match=">= 2 distinct"):
        task_from_file(path, name="x", labels=["pos"])
    with pytest.raises(TaskError, match="3 choices for 2 labels"):
        task_from_file(path, name="x", labels=LABELS, choices=["a", "b", "c"])
    with pytest.raises(TaskError, match="must name row fields"):
        task_from_file(path, name="x", labels=LABELS, template="{}")
    with pytest.raises(TaskError, match="train\\+test"):
        task_from_file({"train": path}, name="x", labels=LABELS)


# --- BIG-bench -----------------------------------------------------------------------


def test_bigbench_examples_follow_the_json_format(caplog):
    data = {
        "task_prefix": "Decide.",
        "examples": [
            {"input": "1 + 1 = 2", "target_scores": {"yes": 1, "no": 0}},
            {"input": "tie", "target_scores": {"yes": 1, "no": 1}},
            {"input": "other answers", "target_scores": {"yes": 1, "maybe": 0}},
            {"input": "no scores", "target": "yes"},
        ],
    }
    with caplog.at_level(logging.WARNING, logger="spot.tasks"):
        examples = bigbench.examples("toy", data, ("no", "yes"))
    text = "Decide.\nQ: 1 + 1 = 2\n  choice: no\n  choice: yes\nA:"
    assert examples == [Example(text, (" no", " yes"), 1)]
    assert "dropped 3 of 4 examples" in caplog.text
    data |= {"append_choices_to_input": False, "example_output_prefix": "\nAnswer: "}
    data["examples"] = data["examples"][:1]
    assert (
        bigbench.examples("toy", data, ("no", "yes"))[0].text
        == "Decide.\nQ: 1 + 1 = 2\nAnswer:"
    )


def test_bigbench_missing_archive_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SPOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPOT_BIGBENCH", str(tmp_path / "none.tar.gz"))
    with pytest.raises(MissingDataError, match="none.tar.gz not found"):
        get_task("bigbench_navigate").load_all()
    with pytest.raises(MissingDataError, match="SPOT_BIGBENCH="):
        bigbench.ensure_bigbench_archive()


def test_ensure_bigbench_archive_downloads_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("SPOT_BIGBENCH", raising=False)
    monkeypatch.setenv("SPOT_CACHE", str(tmp_path))
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        Path(command[command.index("-d") + 1], bigbench.ARCHIVE).write_bytes(b"archive")
        return __import__("subprocess").CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bigbench.subprocess, "run", fake_run)
    path = bigbench.ensure_bigbench_archive()
    assert path == tmp_path / bigbench.ARCHIVE and path.read_bytes() == b"archive"
    assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert f"bigbench=={bigbench.VERSION}" in calls[0]
    assert (
        bigbench.ensure_bigbench_archive() == path and len(calls) == 1
    )  # no second fetch
    assert [p.name for p in tmp_path.iterdir()] == [
        bigbench.ARCHIVE
    ]  # temp folder gone


def test_ensure_bigbench_archive_reports_pip_failure(monkeypatch, tmp_path):
    monkeypatch.delenv("SPOT_BIGBENCH", raising=False)
    monkeypatch.setenv("SPOT_CACHE", str(tmp_path))
    stderr = "ERROR: Distributions from PyPI cannot declare direct URL dependencies."

    def failing_run(command, **kwargs):
        return __import__("subprocess").CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(bigbench.subprocess, "run", failing_run)
    with pytest.raises(TaskError, match="older than 26"):
        bigbench.ensure_bigbench_archive("/opt/python")
    assert list(tmp_path.iterdir()) == []


def test_fetch_cli_exits_3_only_when_the_archive_is_unavailable(monkeypatch, tmp_path, capsys):
    """`make data` warns on status 3 and fails on anything else, so bugs are not swallowed."""
    monkeypatch.delenv("SPOT_BIGBENCH", raising=False)
    monkeypatch.setenv("SPOT_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["spot.tasks", "--fetch-bigbench", "tiny_binary"])
    stderr = "ERROR: No matching distribution found for bigbench==1.0.0"
    monkeypatch.setattr(
        bigbench.subprocess,
        "run",
        lambda command, **kwargs: __import__("subprocess").CompletedProcess(command, 1, "", stderr),
    )
    with pytest.raises(SystemExit) as exit_info:
        tasks_main()
    assert exit_info.value.code == UNAVAILABLE == 3
    assert "No matching distribution" in capsys.readouterr().err

    def broken_run(command, **kwargs):
        raise RuntimeError("a bug, not a missing archive")

    monkeypatch.setattr(bigbench.subprocess, "run", broken_run)
    with pytest.raises(RuntimeError, match="a bug"):
        tasks_main()


# --- optional adapters ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter", "module"),
    [(adapters.task_from_hf_datasets, "datasets"), (adapters.task_from_seqio, "seqio")],
)
def test_adapters_explain_a_missing_package(monkeypatch, adapter, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(TaskError, match=f"pip install {module}"):
        adapter("some/source", name="x", labels=LABELS, template="{text}")


# --- command line --------------------------------------------------------------------


def test_table_lists_counts_or_missing(monkeypatch, tmp_path):
    if (data_root() / "rte" / "train.jsonl").is_file():
        assert "| rte | nli | 2 | 2241 | 249 | 277 | accuracy |" in table(["rte"])
    monkeypatch.setenv("SPOT_DATA", str(tmp_path))
    assert "| rte | nli | 2 | missing (" in table(["rte"])


def test_sst2_validation_is_sentence_level_like_its_test():
    data = load_or_skip("sst2")
    sentence = re.compile(r"^Sentence: .*[.!?]\nThe sentiment")
    assert all(sentence.match(ex.text) for ex in data["validation"])
    assert sum(bool(sentence.match(ex.text)) for ex in data["test"]) > 0.9 * len(data["test"])


def test_sst2_validation_sentences_are_not_training_rows():
    data = load_or_skip("sst2")
    held_out = {letters_and_digits(ex.text) for ex in data["validation"]}
    assert not held_out & {letters_and_digits(ex.text) for ex in data["train"]}
    root = "it 's a charming and often affecting journey"
    assert letters_and_digits(root) == letters_and_digits(f"{root} . ")
