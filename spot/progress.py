"""A rich progress bar for long work (training, studies) with loss, score and examples/s."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress, self._task_id = progress, task_id
        self._fields = {"loss": float("nan"), "score": float("nan"), "rate": 0.0}

    def update(self, completed: int, **fields: float) -> None:
        self._fields.update(fields)
        if self._progress is not None:
            self._progress.update(self._task_id, completed=completed, **self._fields)


@contextlib.contextmanager
def progress_bar(description: str, total: int, completed: int = 0, enabled: bool = True) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[score]:.2f}  {task.fields[rate]:.1f} ex/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task_id = progress.add_task(description, total=total, completed=completed,
                                    loss=float("nan"), score=float("nan"), rate=0.0)
        yield _Bar(progress, task_id)
