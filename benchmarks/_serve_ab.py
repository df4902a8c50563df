"""Serving variants interleaved window by window (machine-speed swings hit all of them).

Same workload as `serve_bench.py` (8 tasks x 64 requests, windows of 16 arrivals, batch 16):
    mixed, states, packed      the defaults: each prompt ran once into cached keys/values per
                               layer; rows (sorted by length) are cut into batches where the
                               cost model says; a batch runs as one packed stream of its real
                               tokens where that costs at most 4/5 of its padded layout
    mixed, fixed cuts          batches of `batch_size` rows in length order (session 4's rule);
                               the variants below cut that way too
    mixed, states, padded      + `pack=False`
    mixed, prompt groups       + `prefix_cache=False, pack=False`: each distinct prompt of a
                               batch runs once per batch (session 4's default)
    per-task, states, packed   one call per task present in the window, the defaults
    per-task, fixed cuts       fixed cuts
    per-task, states, padded   + `pack=False`
    per-task, shared prompt    + `prefix_cache=False, pack=False`: each batch runs its prompt once
Each window is served by every variant, in rotated order; ratios are per-window time ratios.

    .venv/bin/python benchmarks/_serve_ab.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import TASKS, publish_stand_ins, request_stream, serve  # noqa: E402

from library import Library  # noqa: E402
from spot import backbones  # noqa: E402
from spot.serve import Predictor  # noqa: E402


class FixedCuts(Predictor):
    """Batches of `batch_size` rows in length order (session 4's rule), not cost-model cuts."""

    def _cuts(self, rows, k):
        return [*range(0, len(rows), self.batch_size), len(rows)]


def main() -> None:
    backbone = backbones.load()
    stream = list(enumerate(request_stream(TASKS, 64, seed=0)))
    windows = [stream[s : s + 16] for s in range(0, len(stream), 16)]
    with tempfile.TemporaryDirectory() as tmp:
        library = Library(Path(tmp) / "library")
        publish_stand_ins(library, backbone, TASKS, 20)
        options = dict(batch_size=16, bucket=32, max_length=64)
        states_off = dict(options, prefix_cache=False, pack=False)
        variants = {  # name: (strategy, predictor)
            "mixed, states, packed": ("mixed", Predictor(backbone, library, **options)),
            "mixed, fixed cuts": ("mixed", FixedCuts(backbone, library, **options)),
            "mixed, states, padded": ("mixed", FixedCuts(backbone, library, **options, pack=False)),
            "mixed, prompt groups": ("mixed", FixedCuts(backbone, library, **states_off)),
            "per-task, states, packed": ("per-task", Predictor(backbone, library, **options)),
            "per-task, fixed cuts": ("per-task", FixedCuts(backbone, library, **options)),
            "per-task, states, padded": ("per-task", FixedCuts(backbone, library, **options,
                                                               pack=False)),
            "per-task, shared prompt": ("per-task", FixedCuts(backbone, library, **states_off)),
        }
        for window in windows:  # warm-up: compile every shape, fill the state caches
            for strategy, predictor in variants.values():
                serve(strategy, predictor, window)
        seconds = {name: [] for name in variants}
        for i, window in enumerate(windows):
            names = list(variants)
            for name in names[i % len(names):] + names[: i % len(names)]:
                strategy, predictor = variants[name]
                started = time.perf_counter()
                serve(strategy, predictor, window)
                seconds[name].append(time.perf_counter() - started)
        library.close()
    times = {name: np.asarray(s) for name, s in seconds.items()}
    for name, s in times.items():
        print(f"{name:>24}: {len(stream) / s.sum():.2f} requests/s")
    for slow, fast in [("mixed, fixed cuts", "mixed, states, packed"),
                       ("mixed, states, padded", "mixed, fixed cuts"),
                       ("mixed, prompt groups", "mixed, states, padded"),
                       ("per-task, states, padded", "per-task, states, packed"),
                       ("per-task, fixed cuts", "per-task, states, packed"),
                       ("per-task, shared prompt", "per-task, states, padded"),
                       ("per-task, states, packed", "mixed, states, packed"),
                       ("per-task, shared prompt", "mixed, prompt groups")]:
        ratio = times[slow] / times[fast]
        print(f"{fast} over {slow}: median per window {np.median(ratio):.2f}x "
              f"(quartiles {np.percentile(ratio, 25):.2f}-{np.percentile(ratio, 75):.2f}), "
              f"total {times[slow].sum() / times[fast].sum():.2f}x")


if __name__ == "__main__":
    main()
