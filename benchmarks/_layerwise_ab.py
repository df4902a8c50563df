"""The layer-by-layer train step (the trainer's default on Llama: `llama.make_prompt_grad`) against
the one-program step (jit of the whole loss gradient, layers in a `lax.scan`), on SmolLM2 and the
benchmark's packed SST-2 training batches: steady-state time paired per batch, and each step's
first call per batch shape (trace + compile + one step, without the persistent compilation
cache).

Every (step, batch) pair runs once per round (`_common.interleaved`: order rotated per round);
the one-program time over the layer-by-layer time is the median over rounds of their ratio in the
same round (`_common.median_ratio`), per batch and over all batches.

    .venv/bin/python benchmarks/_layerwise_ab.py [--rounds 7] [--batches 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("SPOT_COMPILATION_CACHE", "0")  # first calls compile for real
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import interleaved, median_ratio  # noqa: E402
from _ours import OursTrain, with_paths  # noqa: E402

from spot import backbones  # noqa: E402
from spot.backbones import llama  # noqa: E402
from spot.batching import encode, make_batch  # noqa: E402
from spot.prompts import initial_prompt  # noqa: E402
from spot.tasks import get_task  # noqa: E402
from spot.train import train_rows  # noqa: E402

BATCH, MAX_LENGTH = 8, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    b = backbones.load()
    encoded = encode(b, get_task("sst2").load("train"), max_length=MAX_LENGTH)
    batches = [make_batch(encoded, train_rows(len(encoded), BATCH, step, 0), b.pad_id,
                          max_length=MAX_LENGTH, batch_size=BATCH, pack=True)
               for step in range(args.batches)]
    prompt = np.asarray(initial_prompt(b, "sampled_vocab", 20, 0), np.float32)
    runners = {"one program": OursTrain(with_paths(b, llama.FAST, layerwise=False), prompt, batches),
               "layer by layer": OursTrain(with_paths(b, llama.FAST), prompt, batches)}
    def shape(batch) -> tuple[int, int]:  # (context length, packed stream size)
        return int(batch["tokens"].shape[1]), int(batch["pack"].shape[0])

    shapes = sorted({shape(x) for x in batches})
    print(f"{len(batches)} batches, {len(shapes)} shapes (length, stream): {shapes}")
    for name, runner in runners.items():
        seconds = {}
        for batch in runner.batches:
            if shape(batch) not in seconds:
                start = time.perf_counter()
                runner.step(batch)
                seconds[shape(batch)] = time.perf_counter() - start
        print(f"first call per shape, {name}: "
              + ", ".join(f"{s:.2f} s" for s in seconds.values()))
    calls = {f"{name} | {j}": (lambda r=runner, x=batch: r.step(x))
             for name, runner in runners.items() for j, batch in enumerate(runner.batches)}
    for call in calls.values():  # every shape compiled
        call()
    times = interleaved(calls, args.rounds)
    for name in runners:
        times[f"{name} | all"] = list(np.sum([times[f"{name} | {j}"] for j in range(len(batches))], 0))
    per = [median_ratio(times, f"one program | {j}", f"layer by layer | {j}")
           for j in range(len(batches))]
    whole = median_ratio(times, "one program | all", "layer by layer | all")
    ms = {name: 1e3 * np.median(times[f"{name} | all"]) / len(batches) for name in runners}
    print("\nms per step (median): " + ", ".join(f"{k} {v:.0f}" for k, v in ms.items())
          + f"\none program / layer by layer time: per batch {' '.join(f'{x:.2f}' for x in per)}"
          f" | all {whole:.3f}")
    losses = [runner.losses or [] for runner in runners.values()]
    print("losses agree:", all(np.allclose(a, c, rtol=1e-4) for a, c in zip(*losses, strict=True)))


if __name__ == "__main__":
    main()
