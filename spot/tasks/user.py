"""User tasks from JSONL, CSV or TSV files: a template over the row's fields plus a label list.

Unlike the built-in tasks, user rows are never dropped: a row with a missing or empty field,
a wrong column count, bad JSON or a label outside `labels` is a TaskError naming file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from spot.tasks.core import SPLITS, Example, MissingDataError, Task, TaskError
from spot.tasks.splits import complete_splits, split_single

# (where, row) pairs; `where` ("file:line") names the row in errors.
Rows = Iterable[tuple[str, Mapping[str, Any]]]
PathLike = str | os.PathLike[str]
SUFFIXES = (".jsonl", ".csv", ".tsv")


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """How one row becomes an Example: `template` over its fields, `label_field` into `labels`.

    Non-string label values are compared as JSON (true -> "true", 1 -> "1"); choices default
    to the labels and get a leading space when they lack one.
    """

    template: str
    label_field: str
    labels: tuple[str, ...]
    choices: tuple[str, ...]
    fields: tuple[str, ...]

    @classmethod
    def build(
        cls,
        template: str,
        label_field: str,
        labels: Sequence[str],
        choices: Sequence[str] | None = None,
    ) -> RowFormat:
        labels = tuple(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise TaskError(f"labels must be >= 2 distinct values, got {labels}")
        if not all(isinstance(label, str) for label in labels):
            raise TaskError(
                f"labels must be strings as they appear in the data, got {labels}"
            )
        raw = labels if choices is None else tuple(choices)
        if len(raw) != len(labels):
            raise TaskError(f"{len(raw)} choices for {len(labels)} labels")
        try:
            fields = tuple(
                dict.fromkeys(
                    f
                    for _, f, _, _ in string.Formatter().parse(template)
                    if f is not None
                )
            )
        except ValueError as error:
            raise TaskError(f"bad template {template!r}: {error}") from None
        if not fields or any(not f or f.isdigit() for f in fields):
            raise TaskError(
                f"template {template!r} must name row fields, e.g. '{{text}}'"
            )
        choices_ = tuple(c if c[:1].isspace() else " " + c for c in raw)
        return cls(template, label_field, labels, choices_, fields)

    def example(self, row: Mapping[str, Any], where: str) -> Example:
        values = {}
        for field in (*self.fields, self.label_field):
            value = row.get(field)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise TaskError(
                    f"{where}: missing or empty field {field!r} (row has {sorted(row)})"
                )
            values[field] = value if isinstance(value, str) else json.dumps(value)
        label = values[self.label_field].strip()
        if label not in self.labels:
            raise TaskError(
                f"{where}: label {label!r} not in labels {list(self.labels)}"
            )
        text = self.template.format_map({f: values[f] for f in self.fields})
        return Example(text, self.choices, self.labels.index(label))


def rows_task(
    name: str,
    fmt: RowFormat,
    sources: Mapping[str, Callable[[], Rows]],
    family: str = "user",
    metrics: Sequence[str] = ("accuracy",),
) -> Task:
    """A Task over row sources keyed "all" (carved like mr), or train+test (+validation)."""
    if set(sources) not in ({"all"}, {"train", "test"}, set(SPLITS)):
        raise TaskError(
            f"{name}: give one source, or train+test (+validation); got {sorted(sources)}"
        )

    def load() -> dict[str, list[Example]]:
        parts = {
            split: [fmt.example(row, where) for where, row in rows()]
            for split, rows in sources.items()
        }
        return (
            split_single(name, parts["all"])
            if "all" in parts
            else complete_splits(name, parts)
        )

    return Task(name, family, len(fmt.choices), tuple(metrics), load)


def _read_table(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(file:line, row) for each row of a .jsonl, or a .csv/.tsv with a header row."""
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if suffix == ".jsonl":
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise TaskError(f"{path}:{number}: invalid JSON: {error}") from None
                if not isinstance(row, dict):
                    raise TaskError(
                        f"{path}:{number}: expected a JSON object, got {row!r:.80}"
                    )
                yield f"{path}:{number}", row
            return
        tsv = suffix == ".tsv"
        reader = csv.DictReader(
            handle,
            delimiter="\t" if tsv else ",",
            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
        )
        if not reader.fieldnames:
            raise TaskError(f"{path}: empty file (a header row is required)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():
                raise TaskError(
                    f"{where}: expected {len(reader.fieldnames)} columns {reader.fieldnames}"
                )
            yield where, row


def task_from_file(
    path: PathLike | Mapping[str, PathLike],
    *,
    name: str,
    labels: Sequence[str],
    template: str = "{text}",
    label_field: str = "label",
    choices: Sequence[str] | None = None,
    family: str = "user",
    metrics: Sequence[str] = ("accuracy",),
) -> Task:
    """A Task over one file (train/validation/test carved) or {"train", "test"[, "validation"]: file}.

    `template` is a str.format pattern over the row's fields, e.g. "Review: {review}\\nSentiment:";
    `labels` are the label values as written in the file, `choices` their answer strings.
    Not registered: pass the result to register_task to use it by name.
    """
    fmt = RowFormat.build(template, label_field, labels, choices)
    files = {"all": path} if isinstance(path, (str, os.PathLike)) else dict(path)
    sources = {}
    for split, file in files.items():
        file = Path(file).expanduser()
        if not file.is_file():
            raise MissingDataError(f"{name}: {split} file {file} not found")
        if file.suffix.lower() not in SUFFIXES:
            raise TaskError(f"{file}: unsupported file type, use one of {SUFFIXES}")
        sources[split] = lambda file=file: _read_table(file)
    return rows_task(name, fmt, sources, family, metrics)
