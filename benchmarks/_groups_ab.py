"""Mixed-task serving with and without prompt groups, interleaved window by window.

Same workload as `serve_bench.py` (8 tasks x 64 requests, windows of 16 arrivals, batch 16);
each window is served by both predictors in alternating order, so machine-speed swings hit both.

    .venv/bin/python benchmarks/_groups_ab.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import TASKS, publish_stand_ins, request_stream  # noqa: E402

from library import Library  # noqa: E402
from spot import backbones  # noqa: E402
from spot.serve import Predictor  # noqa: E402


class Ungrouped(Predictor):
    """Per-row prompts without the groups: every row runs its own copy of its prompt."""

    def _make_batch(self, chunk, k):
        prompt, batch = super()._make_batch(chunk, k)
        batch.pop("prompt_rows", None)
        batch.pop("prompt_index", None)
        return prompt, batch


def main() -> None:
    backbone = backbones.load()
    stream = request_stream(TASKS, 64, seed=0)
    windows = [stream[s : s + 16] for s in range(0, len(stream), 16)]
    with tempfile.TemporaryDirectory() as tmp:
        library = Library(Path(tmp) / "library")
        publish_stand_ins(library, backbone, TASKS, 20)
        options = dict(batch_size=16, bucket=32, max_length=64)
        predictors = {"grouped": Predictor(backbone, library, **options),
                      "ungrouped": Ungrouped(backbone, library, **options)}
        for window in windows:  # warm-up: compile every shape
            for p in predictors.values():
                p.predict(window)
        seconds = {name: [] for name in predictors}
        for i, window in enumerate(windows):
            order = list(predictors) if i % 2 == 0 else list(predictors)[::-1]
            for name in order:
                started = time.perf_counter()
                predictors[name].predict(window)
                seconds[name].append(time.perf_counter() - started)
        library.close()
    ratio = np.asarray(seconds["ungrouped"]) / np.asarray(seconds["grouped"])
    for name, s in seconds.items():
        print(f"{name:>9}: {len(stream) / sum(s):.2f} requests/s")
    print(f"grouped speed-up per window: median {np.median(ratio):.2f}x "
          f"(quartiles {np.percentile(ratio, 25):.2f}-{np.percentile(ratio, 75):.2f}), "
          f"total {sum(seconds['ungrouped']) / sum(seconds['grouped']):.2f}x")


if __name__ == "__main__":
    main()
