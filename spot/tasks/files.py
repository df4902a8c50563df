"""Where the task data lives, and reading its files in place, one row per line."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from spot.paths import data_dir
from spot.tasks.core import MissingDataError

T = TypeVar("T")

log = logging.getLogger("spot.tasks")

# Errors a row converter raises on a malformed row (TaskError is a ValueError).
ROW_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError)
_warned: set[tuple[Path, int]] = set()  # (file, mtime): each file's drops are logged once


def data_root() -> Path:
    """$SPOT_DATA, else <repo root>/../shared/data."""
    return data_dir()


def data_file(*parts: str) -> Path:
    """A file under data_root(); MissingDataError naming the path if it is not there."""
    path = data_root().joinpath(*parts)
    if not path.is_file():
        raise MissingDataError(
            f"task data file {path} not found (data root {data_root()}; set SPOT_DATA to change it)"
        )
    return path


def clean(text: str) -> str:
    """Whitespace collapsed to single spaces; ValueError (a malformed row) when nothing is left."""
    if not isinstance(text, str):
        raise TypeError(f"expected text, got {type(text).__name__}")
    text = " ".join(text.split())
    if not text:
        raise ValueError("empty text")
    return text


def read_rows(
    path: Path,
    convert: Callable[[str], T],
    *,
    encoding: str = "utf-8",
    header: bool = False,
) -> list[T]:
    """convert(line) for each line (the header skipped); malformed rows dropped and counted.

    A row is malformed when convert raises one of ROW_ERRORS; the count and the first
    reasons are logged as a warning on the "spot.tasks" logger, once per file version.
    """
    lines = path.read_text(encoding=encoding).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows, dropped = [], []
    for number, line in enumerate(lines, start=1):
        if header and number == 1:
            continue
        try:
            rows.append(convert(line.rstrip("\r")))
        except ROW_ERRORS as error:
            dropped.append(f"line {number}: {type(error).__name__}: {error}")
    seen = (path.resolve(), path.stat().st_mtime_ns)
    if dropped and seen not in _warned:
        _warned.add(seen)
        log.warning(
            "%s: dropped %d malformed row(s) of %d: %s",
            path,
            len(dropped),
            len(lines) - header,
            "; ".join(dropped[:3]) + ("; ..." if len(dropped) > 3 else ""),
        )
    return rows
