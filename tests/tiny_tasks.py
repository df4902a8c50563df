"""A small synthetic task that a tiny model can learn quickly (helpers for tests)."""

from __future__ import annotations

import numpy as np

from spot.tasks import Example, Task

WORDS = {0: ["bad", "awful", "poor", "dull"], 1: ["good", "great", "fine", "nice"]}


def polarity_rows(n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        word = WORDS[label][int(rng.integers(4))]
        filler = " ".join(rng.choice(["the", "a", "film", "was", "it"], size=int(rng.integers(1, 6))))
        rows.append(Example(f"{filler} {word}:", (" n", " p"), label))
    return rows


def polarity_task(name: str = "tiny_polarity") -> Task:
    splits = {"train": polarity_rows(256, 1), "validation": polarity_rows(64, 2),
              "test": polarity_rows(64, 3)}
    return Task(name, "sentiment", 2, ("accuracy",), lambda: splits)


def register_tiny_tasks() -> list[str]:
    """Register three small tasks (two polarity variants and a length task) under fixed names."""
    from spot.tasks import register_task

    def length_rows(n: int, seed: int) -> list[Example]:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(n):
            label = int(rng.integers(2))
            size = int(rng.integers(1, 4)) + 4 * label
            rows.append(Example(" ".join(["la"] * size) + ":", (" s", " l"), label))
        return rows

    def length_task() -> Task:
        splits = {"train": length_rows(256, 1), "validation": length_rows(64, 2),
                  "test": length_rows(64, 3)}
        return Task("tiny_length", "subjectivity", 2, ("accuracy",), lambda: splits)

    names = []
    for task in (polarity_task("tiny_polarity"), polarity_task("tiny_polarity_b"), length_task()):
        register_task(task, replace=True)
        names.append(task.name)
    return names


def publish_tiny_sources(model, library, names, config, out, recipes=("gradient", "trained")):
    """Train each named task with `config` under out/<name> and publish its value with a key per
    recipe (the library's protocols, registered on first use); returns name -> value."""
    from spot.publish import ensure_protocol
    from spot.task_embedding import embed_task, key_metadata
    from spot.tasks import get_task
    from spot.train import TrainConfig, train

    values = {}
    for name in names:
        task = get_task(name)
        run = train(model, task, TrainConfig(**{**config.__dict__, "task": name}), out / name,
                    show_progress=False)
        values[name] = run.value
        for recipe in recipes:
            protocol, start = ensure_protocol(library, model, recipe)
            library.publish((embed_task(model, task, protocol, start),
                             key_metadata(protocol, task)), run.out / "value.safetensors",
                            {"task": name})
    return values
