"""Per-layer weights (a Python loop over one jitted layer trace) against stacked weights in a
`lax.scan` (the layout before), paired per batch, on SmolLM2 and the benchmark's SST-2 batches:
the loss + prompt gradient of packed training batches, scoring of validation batches from prefix
states, and each layout's first-call cost (trace, lower, compile; without the persistent
compilation cache).

Every (layout, batch) pair runs once per round (`_common.interleaved`: order rotated per round);
the stacked layout's time over the per-layer one is the median over rounds of their ratio in the
same round (`_common.median_ratio`), per batch and over all batches.

    .venv/bin/python benchmarks/_layers_ab.py [--rounds 7] [--train-batches 6] [--score-batches 6]
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import interleaved, median_ratio  # noqa: E402

from spot import backbones  # noqa: E402
from spot.backbones import llama  # noqa: E402
from spot.batching import encode, eval_batches, make_batch  # noqa: E402
from spot.evaluation import subset  # noqa: E402
from spot.prompts import initial_prompt  # noqa: E402
from spot.tasks import get_task  # noqa: E402
from spot.train import train_rows  # noqa: E402

BATCH, MAX_LENGTH = 8, 128


def first_call(fn, *args) -> str:
    """Seconds to trace, lower and compile `fn` (a fresh jit) for these arguments."""
    start = time.perf_counter()
    traced = fn.trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return (f"trace {traced_at - start:.2f} s, lower {lowered_at - traced_at:.2f} s, "
            f"compile {done - lowered_at:.2f} s")


def compare(title: str, fns: dict, params: dict, batches: list, rounds: int) -> None:
    """Time every layout on every batch (interleaved) and print stacked / per-layer time."""
    calls = {f"{layout} | {j}": (lambda fn=fns[layout], p=params[layout], batch=batch:
                                 np.asarray(fn(p, batch)))
             for layout in fns for j, batch in enumerate(batches)}
    for call in calls.values():  # compile
        call()
    times = interleaved(calls, rounds)
    for layout in fns:
        times[f"{layout} | all"] = list(np.sum([times[f"{layout} | {j}"] for j in range(len(batches))], 0))
    per = [median_ratio(times, f"stacked | {j}", f"per-layer | {j}") for j in range(len(batches))]
    whole = median_ratio(times, "stacked | all", "per-layer | all")
    ms = {layout: 1e3 * np.median(times[f"{layout} | all"]) for layout in fns}
    print(f"\n{title}\n  ms per round (median): " + ", ".join(f"{k} {v:.0f}" for k, v in ms.items())
          + f"\n  stacked / per-layer time: per batch {' '.join(f'{x:.2f}' for x in per)} | all {whole:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--train-batches", type=int, default=6)
    parser.add_argument("--score-batches", type=int, default=6)
    args = parser.parse_args()
    b = backbones.load()
    task = get_task("sst2")
    params = {"per-layer": b.params, "stacked": llama.stacked_weights(b.params)}
    prompt = jnp.asarray(initial_prompt(b, "sampled_vocab", 20, 0), jnp.float32)

    train = encode(b, task.load("train"), max_length=MAX_LENGTH)
    batches = [jax.device_put(make_batch(train, train_rows(len(train), BATCH, step, 0), b.pad_id,
                                         max_length=MAX_LENGTH, batch_size=BATCH, pack=True))
               for step in range(args.train_batches)]
    loss = llama.make_loss_fn(b.config, b.bos_id)
    for layout, p in params.items():
        print(f"first call, loss + prompt gradient, {layout}: "
              + first_call(jax.jit(jax.grad(loss, argnums=1)), p, prompt, batches[0], None))
    grads = {layout: jax.jit(jax.grad(loss, argnums=1)) for layout in params}
    fns = {layout: (lambda p, batch, g=g: g(p, prompt, batch, None)) for layout, g in grads.items()}
    compare("loss + prompt gradient, SST-2 training batches", fns, params, batches, args.rounds)

    valid = encode(b, subset(task.load("validation"), BATCH * args.score_batches),
                   max_length=MAX_LENGTH)
    batches = [jax.device_put(make_batch(valid, rows, b.pad_id, max_length=MAX_LENGTH,
                                         batch_size=BATCH, pack=True))
               for rows, _ in eval_batches(valid, BATCH, b.pad_id, max_length=MAX_LENGTH)]
    score, prefix = jax.jit(b.score_fn), jax.jit(b.prefix_fn)
    fns = {layout: (lambda p, batch: score(p, prefix(p, prompt), batch)) for layout in params}
    compare("scoring from prefix states (computed per batch), SST-2 validation batches", fns,
            params, batches, args.rounds)


if __name__ == "__main__":
    main()
