"""Rank-classification evaluation of a prompt on a task split."""

from __future__ import annotations

import numpy as np

from spot.backbones.base import Backbone
from spot.batching import Encoded, encode, eval_batches
from spot.progress import progress_bar
from spot.tasks.splits import subset


def score_encoded(
    backbone: Backbone, prompt, encoded: Encoded, batch_size: int = 16, max_length: int = 128,
    show_progress: bool = False, description: str = "evaluate",
) -> np.ndarray:
    """[n_examples, n_choices] log-likelihoods, in the order of `encoded`."""
    prompt = reusable_prompt(backbone, prompt)
    scores = np.zeros(encoded.choices.shape[:2], np.float32)
    batches = eval_batches(encoded, batch_size, backbone.pad_id, max_length=max_length,
                           pack=backbone.packing)
    done = 0
    with progress_bar(description, total=len(scores), enabled=show_progress) as bar:
        for rows, batch in batches:
            scores[rows] = np.asarray(backbone.score(prompt, batch))[: len(rows)]
            done += len(rows)
            bar.update(done)
    return scores


def reusable_prompt(backbone: Backbone, prompt):
    """What `backbone.score` should take for many batches of one shared [L, d] prompt: its
    prefix states where the backbone can reuse them (the prompt then runs once, not once per
    batch), else the prompt itself."""
    if backbone.prefix_fn is None or np.ndim(prompt) != 2 or not np.shape(prompt)[0]:
        return prompt
    return backbone.prefix_states(prompt)


def evaluate(
    backbone: Backbone, prompt, task, split: str = "validation", limit: int | None = None,
    batch_size: int = 16, max_length: int = 128, show_progress: bool = False,
) -> dict[str, float]:
    """Task metrics (x 100: 0-100, MCC -100-100) of `prompt` on `split` (optionally a fixed subset)."""
    examples = subset(task.load(split), limit)
    encoded = encode(backbone, examples, max_length=max_length)
    scores = score_encoded(backbone, prompt, encoded, batch_size, max_length, show_progress,
                           f"{split} {task.name}")
    predictions = scores.argmax(axis=1)
    return task.evaluate(predictions, encoded.labels)
