"""Progress for long work: one live display per command, whatever the nesting.

The outermost `progress_bar` opens a rich display; bars opened while it runs (a transfer run
inside a command's phase, a validation inside a training run) become rows of that display and
disappear when they finish, so nested work shows phase, run, step and validation at once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

_live: list[Progress] = []  # the display of the outermost running bar, if any


class _Bar:
    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress, self._task_id = progress, task_id
        self._fields: dict[str, float | str] = {}

    def update(self, completed: int, total: int | None = None, **fields: float | str) -> None:
        """Move to `completed` (of a new `total`, if given); fields: loss, score (validation),
        rate (examples/s), note."""
        self._fields.update(fields)
        if self._progress is not None:
            self._progress.update(self._task_id, completed=completed, detail=self._detail(),
                                  **({} if total is None else {"total": total}))

    def _detail(self) -> str:
        formats = {"loss": "loss {:.4f}", "score": "val {:.2f}", "rate": "{:.1f} ex/s"}
        shown = [formats[name].format(value) for name, value in self._fields.items()
                 if name in formats and isinstance(value, float) and math.isfinite(value)]
        note = self._fields.get("note")
        return "  ".join([*([str(note)] if note else []), *shown])


def _display() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeRemainingColumn(),
    )


@contextlib.contextmanager
def progress_bar(
    description: str, total: int, completed: int = 0, enabled: bool = True
) -> Iterator[_Bar]:
    """A progress row (a new display, or a row of the running one); a no-op when disabled."""
    if not enabled:
        yield _Bar(None, None)
        return
    if _live:
        progress = _live[0]
        task_id = progress.add_task(description, total=total, completed=completed, detail="")
        try:
            yield _Bar(progress, task_id)
        finally:
            progress.remove_task(task_id)
        return
    with _display() as progress:
        _live.append(progress)
        try:
            task_id = progress.add_task(description, total=total, completed=completed, detail="")
            yield _Bar(progress, task_id)
        finally:
            _live.clear()
