"""The task and example types shared by every loader."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

from spot.tasks.metrics import METRICS, evaluate

SPLITS: tuple[str, ...] = ("train", "validation", "test")
FAMILIES: tuple[str, ...] = (
    "sentiment",
    "topic",
    "question_type",
    "acceptability",
    "nli",
    "qa",
    "coreference",
    "causal",
    "subjectivity",
    "bigbench",
    "user",
)


class TaskError(ValueError):
    """A task is unknown, misdefined, or was given data or input it cannot use."""


class MissingDataError(TaskError):
    """A task's data files (or the BIG-bench archive) are not on disk."""


@functools.lru_cache(maxsize=4096)
def _check_choices(choices: tuple[str, ...]) -> None:
    """Raise unless >= 2 distinct non-empty strings (cached: most tasks share one tuple)."""
    if len(choices) < 2 or len(set(choices)) != len(choices):
        raise TaskError(f"example needs >= 2 distinct choices, got {choices!r}")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise TaskError(f"choices must be non-empty strings, got {choices!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class Example:
    """One rank-classification example: score each choice as a continuation of `text`."""

    text: str
    choices: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise TaskError(
                f"example text must be a non-empty string, got {self.text!r}"
            )
        if not isinstance(self.choices, tuple):
            raise TaskError(f"choices must be a tuple, got {self.choices!r}")
        _check_choices(self.choices)
        if type(self.label) is not int or not 0 <= self.label < len(self.choices):
            raise TaskError(
                f"label must be an int in [0, {len(self.choices)}), got {self.label!r}"
            )


Loader = Callable[[], Mapping[str, Sequence[Example]]]


@dataclasses.dataclass(frozen=True)
class Task:
    """A named task: `loader()` returns every split at once; metrics[0] is the primary one."""

    name: str
    family: str
    num_choices: int
    metrics: tuple[str, ...]
    loader: Loader = dataclasses.field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise TaskError(
                f"task name must be non-empty without whitespace, got {self.name!r}"
            )
        if self.family not in FAMILIES:
            raise TaskError(f"{self.name}: family {self.family!r} not in {FAMILIES}")
        if self.num_choices < 2:
            raise TaskError(
                f"{self.name}: num_choices must be >= 2, got {self.num_choices}"
            )
        unknown = [m for m in self.metrics if m not in METRICS]
        if not self.metrics or unknown:
            raise TaskError(
                f"{self.name}: metrics {self.metrics} must be non-empty, from {sorted(METRICS)}"
            )

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def load_all(self) -> dict[str, list[Example]]:
        """Every split, checked: all of SPLITS present, non-empty, each example with num_choices."""
        data = self.loader()
        if set(data) != set(SPLITS):
            raise TaskError(
                f"{self.name}: loader returned splits {sorted(data)}, expected {SPLITS}"
            )
        for split, examples in data.items():
            if not examples:
                raise TaskError(f"{self.name}: split {split!r} is empty")
            for i, example in enumerate(examples):
                if len(example.choices) != self.num_choices:
                    raise TaskError(
                        f"{self.name}/{split}[{i}]: {len(example.choices)} choices, "
                        f"task has {self.num_choices}"
                    )
        return {split: list(data[split]) for split in SPLITS}

    def load(self, split: str) -> list[Example]:
        """One split (its loader parses the task's files anew: see load_all for several)."""
        if split not in SPLITS:
            raise TaskError(
                f"{self.name}: unknown split {split!r}; splits are {SPLITS}"
            )
        return self.load_all()[split]

    def evaluate(
        self, predictions: Sequence[int], labels: Sequence[int]
    ) -> dict[str, float]:
        """Every metric of the task, on a 0-100 scale (MCC: -100..100)."""
        return evaluate(self.metrics, predictions, labels)
