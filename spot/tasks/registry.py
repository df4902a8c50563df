"""The task registry: names to Task definitions (loading stays lazy until Task.load)."""

from __future__ import annotations

from spot.tasks.core import Task, TaskError

_TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add `task` under task.name; an existing name is an error unless replace=True."""
    if not isinstance(task, Task):
        raise TaskError(f"register_task expects a Task, got {type(task).__name__}")
    if task.name in _TASKS and not replace:
        raise TaskError(f"task {task.name!r} is already registered (pass replace=True)")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise TaskError(
            f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}"
        ) from None


def list_tasks() -> list[str]:
    return sorted(_TASKS)
