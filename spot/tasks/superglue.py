"""SuperGLUE-style pair tasks from JSONL: rte, cb (full sets), boolq, copa, multirc (FewGLUE), wsc."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from spot.tasks.core import Example, Task
from spot.tasks.files import clean, data_file, read_rows
from spot.tasks.registry import register_task
from spot.tasks.sentence import YES_NO
from spot.tasks.splits import carve, complete_splits, split_single

T = TypeVar("T")
Row = dict[str, Any]

TRUE_FALSE = (" True", " False")
TRUE_FALSE_NEITHER = (" True", " False", " Neither")
FALSE_TRUE = (" False", " True")


def flag(value: Any) -> int:
    """A JSON boolean label as 0/1; anything else is a malformed row."""
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean label, got {value!r}")
    return int(value)


def lower_first(sentence: str) -> str:
    """Lower-case the first letter so a sentence reads as a continuation ("I", acronyms kept)."""
    first = sentence.split()[0]
    if first == "I" or first.startswith("I'") or (len(first) > 1 and first.isupper()):
        return sentence
    return sentence[0].lower() + sentence[1:]


def statement(text: str) -> str:
    """Cleaned text ending in punctuation, so a question can follow it."""
    text = clean(text)
    return text if text[-1] in ".!?\"'" else text + "."


def rte_row(row: Row) -> Example:
    hypothesis = statement(row["hypothesis"])
    text = f"{clean(row['premise'])}\nQuestion: {hypothesis} True or False?\nAnswer:"
    return Example(
        text, TRUE_FALSE, ("entailment", "not_entailment").index(row["label"])
    )


def cb_row(row: Row) -> Example:
    text = (
        f"{clean(row['premise'])}\nQuestion: {statement(row['hypothesis'])} "
        "True, False, or Neither?\nAnswer:"
    )
    labels = ("entailment", "contradiction", "neutral")
    return Example(text, TRUE_FALSE_NEITHER, labels.index(row["label"]))


def boolq_row(row: Row) -> Example:
    question = clean(row["question"]).rstrip("?")
    text = f"{clean(row['passage'])}\nQuestion: {question}?\nAnswer:"
    return Example(text, YES_NO, flag(row["label"]))


def copa_row(row: Row) -> Example:
    connective = {"cause": "because", "effect": "so"}[row["question"]]
    text = f"{clean(row['premise']).rstrip('.')} {connective}"
    choices = tuple(
        " " + lower_first(clean(row[key])) for key in ("choice1", "choice2")
    )
    if row["label"] not in (0, 1) or isinstance(row["label"], bool):
        raise ValueError(f"label must be 0 or 1, got {row['label']!r}")
    return Example(text, choices, row["label"])


def multirc_row(row: Row) -> list[Example]:
    """One passage -> one True/False example per (question, answer option)."""
    passage = row["passage"]
    context = clean(passage["text"])
    examples = []
    for question in passage["questions"]:
        asked = clean(question["question"])
        for answer in question["answers"]:
            text = (
                f"{context}\nQuestion: {asked}\nProposed answer: {clean(answer['text'])}\n"
                "Is the proposed answer correct? True or False?\nAnswer:"
            )
            if answer["label"] not in (0, 1) or isinstance(answer["label"], bool):
                raise ValueError(
                    f"answer label must be 0 or 1, got {answer['label']!r}"
                )
            examples.append(Example(text, FALSE_TRUE, answer["label"]))
    if not examples:
        raise ValueError("passage has no answer options")
    return examples


def wsc_row(row: Row) -> Example:
    target = row["target"]
    text = (
        f"{clean(row['text'])}\nQuestion: In the passage above, does "
        f'"{clean(target["span2_text"])}" refer to "{clean(target["span1_text"])}"?\nAnswer:'
    )
    return Example(text, YES_NO, flag(row["label"]))


def read_jsonl(name: str, filename: str, convert: Callable[[Row], T]) -> list[T]:
    return read_rows(data_file(name, filename), lambda line: convert(json.loads(line)))


FEW_SHOT = ("boolq", "copa", "multirc")  # FewGLUE's files: 32 training rows (passages)


def jsonl_splits(name: str, convert: Callable[[Row], T]) -> dict[str, list[T]]:
    """<name>/train.jsonl and <name>/val.jsonl (SuperGLUE's dev): val is the test split, and
    validation is carved from train; for FewGLUE's tasks it is carved from val instead, so they
    train on all 32 rows and choose on more than 3."""
    train, dev = read_jsonl(name, "train.jsonl", convert), read_jsonl(name, "val.jsonl", convert)
    if name in FEW_SHOT:
        test, validation = carve(dev, f"{name}/validation")
        return {"train": train, "validation": validation, "test": test}
    return complete_splits(name, {"train": train, "test": dev})


def _register(
    name: str,
    family: str,
    convert: Callable[[Row], Example],
    num_choices: int,
    metrics: tuple[str, ...] = ("accuracy",),
) -> None:
    register_task(
        Task(name, family, num_choices, metrics, lambda: jsonl_splits(name, convert))
    )


def wsc() -> dict[str, list[Example]]:
    """wsc/val.jsonl (SuperGLUE's dev, 104 rows) alone: FewGLUE's 32 wsc training rows all
    have label 1, so as a yes/no task they teach one answer. Half of dev is test, a fifth of
    the rest validation, and the rest trains."""
    return split_single("wsc", read_jsonl("wsc", "val.jsonl", wsc_row), 0.5, 0.2)


def multirc() -> dict[str, list[Example]]:
    # Split by passage (JSONL row), so no question straddles two splits; then one row per option.
    splits = jsonl_splits("multirc", multirc_row)
    return {split: [e for group in groups for e in group] for split, groups in splits.items()}


_register("rte", "nli", rte_row, 2)
_register("cb", "nli", cb_row, 3, ("accuracy", "macro_f1"))
_register("boolq", "qa", boolq_row, 2)
_register("copa", "causal", copa_row, 2)
register_task(Task("wsc", "coreference", 2, ("accuracy",), wsc))
register_task(Task("multirc", "qa", 2, ("f1", "accuracy"), multirc))
