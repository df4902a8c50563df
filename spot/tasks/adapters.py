"""Optional sources: Hugging Face `datasets` and `seqio` (neither is a spot dependency).

Each is imported when the adapter is called, with a TaskError saying how to install it when
absent; rows become Examples through the same RowFormat as user files.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from spot.tasks.core import Task, TaskError
from spot.tasks.user import RowFormat, Rows, rows_task

DEFAULT_SPLITS = {"train": "train", "validation": "validation", "test": "test"}


def _require(package: str) -> ModuleType:
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise TaskError(
            f"this adapter needs the optional package {package!r} (pip install {package}): {error}"
        ) from None


def _plain(value: Any) -> Any:
    """bytes -> str and NumPy scalars -> Python, so rows read like JSON."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if isinstance(value, np.generic) else value


def task_from_hf_datasets(
    path: Any,
    *,
    name: str,
    labels: Sequence[str],
    template: str,
    label_field: str = "label",
    choices: Sequence[str] | None = None,
    config: str | None = None,
    split_names: Mapping[str, str] = DEFAULT_SPLITS,
    family: str = "user",
    metrics: Sequence[str] = ("accuracy",),
) -> Task:
    """A Task over a Hub dataset (`path`: its name or local path), or an in-memory
    `datasets.DatasetDict` or `datasets.Dataset` (one split: carved like a single file).

    split_names maps our splits to the dataset's (train+test at least; absent ones of a
    DatasetDict are skipped). Integer ClassLabel values compare as "0", "1", ... against `labels`.
    """
    datasets = _require("datasets")
    fmt = RowFormat.build(template, label_field, labels, choices)

    def rows(data: Any, where: str) -> Rows:
        return ((f"{where}[{i}]", row) for i, row in enumerate(data))

    def source(split: str) -> Rows:
        try:
            data = datasets.load_dataset(path, config, split=split)
        except Exception as error:
            # Network, auth, unknown dataset or split: all surface here.
            raise TaskError(
                f"{name}: could not load {path!r} split {split!r}: {error}"
            ) from error
        return rows(data, f"{path}[{split}]")

    if isinstance(path, datasets.Dataset):
        sources = {"all": lambda: rows(path, name)}
    elif isinstance(path, datasets.DatasetDict):
        sources = {
            ours: (lambda s=theirs: rows(path[s], f"{name}[{s}]"))
            for ours, theirs in split_names.items() if theirs in path
        }
    elif isinstance(path, str):
        sources = {
            ours: (lambda s=theirs: source(s)) for ours, theirs in split_names.items()
        }
    else:
        raise TaskError(f"{name}: expected a dataset name, Dataset or DatasetDict, "
                        f"got {type(path).__name__}")
    return rows_task(name, fmt, sources, family, metrics)


def task_from_seqio(
    seqio_task: str,
    *,
    name: str,
    labels: Sequence[str],
    template: str,
    label_field: str = "label",
    choices: Sequence[str] | None = None,
    split_names: Mapping[str, str] = DEFAULT_SPLITS,
    family: str = "user",
    metrics: Sequence[str] = ("accuracy",),
) -> Task:
    """A Task over a registered seqio task's raw source rows (before its preprocessors)."""
    seqio = _require("seqio")
    fmt = RowFormat.build(template, label_field, labels, choices)

    def source(split: str) -> Rows:
        try:
            data = seqio.get_mixture_or_task(seqio_task).source.get_dataset(
                split=split, shuffle=False
            )
        except Exception as error:
            # Unregistered task, missing TFDS data, unknown split.
            raise TaskError(
                f"{name}: could not load seqio task {seqio_task!r} split {split!r}: {error}"
            ) from error
        return (
            (f"{seqio_task}[{split}][{i}]", {k: _plain(v) for k, v in row.items()})
            for i, row in enumerate(data.as_numpy_iterator())
        )

    sources = {
        ours: (lambda s=theirs: source(s)) for ours, theirs in split_names.items()
    }
    return rows_task(name, fmt, sources, family, metrics)
