"""Deterministic train/validation/test carving (the rule is spelled out in spot.tasks' docstring).

An item's place in the hold-out order is sha256 of "<salt>/<row index>", so the carve depends
only on the salt and the row count: no RNG, identical across Python and NumPy versions. Both
parts keep the source order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np

from spot.tasks.core import SPLITS, TaskError

T = TypeVar("T")

HOLDOUT_FRACTION = 0.1
HOLDOUT_CAP = 1000


def carve(
    items: Sequence[T],
    salt: str,
    fraction: float = HOLDOUT_FRACTION,
    cap: int = HOLDOUT_CAP,
) -> tuple[list[T], list[T]]:
    """(kept, held): held has min(cap, max(1, floor(fraction * n))) items, picked by hash order."""
    n = len(items)
    if n < 2:
        raise TaskError(f"{salt}: cannot carve a hold-out from {n} rows")
    size = min(cap, max(1, int(fraction * n)))

    def rank(i: int) -> bytes:
        return hashlib.sha256(f"{salt}/{i}".encode()).digest()

    held = set(sorted(range(n), key=rank)[:size])
    kept = [item for i, item in enumerate(items) if i not in held]
    return kept, [items[i] for i in sorted(held)]


def complete_splits(
    name: str, parts: Mapping[str, Sequence[T]], validation_fraction: float = HOLDOUT_FRACTION
) -> dict[str, list[T]]:
    """{"train", "validation", "test"} as given, or validation carved from train when absent."""
    if set(parts) == set(SPLITS):
        return {split: list(parts[split]) for split in SPLITS}
    if set(parts) != {"train", "test"}:
        raise TaskError(
            f"{name}: need splits train+test (+validation), got {sorted(parts)}"
        )
    train, validation = carve(parts["train"], f"{name}/validation", validation_fraction)
    return {"train": train, "validation": validation, "test": list(parts["test"])}


def split_single(
    name: str, items: Sequence[T], test_fraction: float = HOLDOUT_FRACTION,
    validation_fraction: float = HOLDOUT_FRACTION,
) -> dict[str, list[T]]:
    """One pool -> test carved first (test_fraction, capped), then validation from the rest."""
    rest, test = carve(items, f"{name}/test", test_fraction)
    return complete_splits(name, {"train": rest, "test": test}, validation_fraction)


def subset(examples: Sequence, limit: int | None, seed: int = 0) -> list:
    """A deterministic sample of at most `limit` examples (all when limit is falsy)."""
    if not limit or limit >= len(examples):
        return list(examples)
    rows = np.sort(np.random.default_rng(seed).choice(len(examples), limit, replace=False))
    return [examples[i] for i in rows]
