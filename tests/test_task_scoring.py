"""Every registered task's examples encode into batches that a backbone scores."""

from __future__ import annotations

import numpy as np
import pytest

from spot.batching import encode, eval_batches
from spot.tasks import MissingDataError, get_task, list_tasks


@pytest.mark.parametrize("name", list_tasks())
def test_task_formats_and_scores(name, tiny_llama):
    try:
        rows = get_task(name).load("test")[:4]
    except MissingDataError as error:
        pytest.skip(str(error))
    encoded = encode(tiny_llama, rows, max_length=32)
    assert encoded.choices.shape[:2] == (len(rows), get_task(name).num_choices)
    prompt = np.zeros((2, tiny_llama.d_model), np.float32)
    for ids, batch in eval_batches(encoded, 4, tiny_llama.pad_id, max_length=32):
        scores = np.asarray(tiny_llama.score(prompt, batch))[: len(ids)]
        assert np.isfinite(scores).all() and (scores <= 0).all()
