"""Packed-stream layouts side by side, paired per batch: the padded layout, a packed stream with
attention over the whole stream ("dense") and with banded attention (the default), plus scoring
from prefix states. Every batch is forced packed (PACK_GAIN off), so the cost model's threshold
can be read off: the cost ratio (packed / padded, `spot.batching`) is printed per batch.

Every (variant, batch) pair runs once per round (`_common.interleaved`: order rotated per round);
a variant's relative time is the median over rounds of its time ratio to the baseline in the same
round (`_common.median_ratio`), per batch and over all batches, because the VM's speed drifts
between rounds.

    .venv/bin/python benchmarks/_packing_ab.py [--rounds 9] [--train-batches 8] [--score-batches 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import interleaved, median_ratio  # noqa: E402

from spot import backbones, batching  # noqa: E402
from spot.backbones import llama  # noqa: E402
from spot.batching import encode, eval_batches, layout_cost, make_batch, packed_cost  # noqa: E402
from spot.evaluation import subset  # noqa: E402
from spot.prompts import initial_prompt  # noqa: E402
from spot.tasks import get_task  # noqa: E402
from spot.train import train_rows  # noqa: E402

BATCH, MAX_LENGTH = 8, 128


def paired(variants: dict, pairs: list, rounds: int) -> dict[str, list[float]]:
    """Seconds per round, keyed "<variant> | <batch index>", of every variant on every (padded,
    packed) batch pair, plus "<variant> | all": the sum over the batches in each round."""
    calls = {f"{name} | {j}": (lambda fn=fn, pa=pa, pk=pk: np.asarray(fn(pa, pk)))
             for name, fn in variants.items() for j, (pa, pk) in enumerate(pairs)}
    for call in calls.values():  # compile
        call()
    times = interleaved(calls, rounds)
    for name in variants:
        times[f"{name} | all"] = list(np.sum([times[f"{name} | {j}"] for j in range(len(pairs))], 0))
    return times


def report(title: str, variants: list[str], pairs: list, times: dict, baseline: str) -> None:
    print(f"\n{title}")
    costs = [packed_cost(pk["pack"].shape[0], pk["pack_window"].shape[0])
             / layout_cost(pa["tokens"].shape[0], pa["tokens"].shape[1] + pa["choices"].shape[-1])
             for pa, pk in pairs]
    print("batch (padded length; stream, window; cost ratio): " + ", ".join(
        f"{pa['tokens'].shape[1]}; {pk['pack'].shape[0]}, {pk['pack_window'].shape[0]}; {c:.2f}"
        for (pa, pk), c in zip(pairs, costs, strict=True)))
    for name in variants:
        ms = [1e3 * np.median(times[f"{name} | {j}"]) for j in range(len(pairs))]
        per = [median_ratio(times, f"{name} | {j}", f"{baseline} | {j}") for j in range(len(pairs))]
        whole = median_ratio(times, f"{name} | all", f"{baseline} | all")
        print(f"  {name:28s} ms {' '.join(f'{x:5.0f}' for x in ms)}  "
              f"time / {baseline}: {' '.join(f'{x:.2f}' for x in per)} | all {whole:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--train-batches", type=int, default=8)
    parser.add_argument("--score-batches", type=int, default=6)
    args = parser.parse_args()
    b = backbones.load()
    task = get_task("sst2")
    batching.PACK_GAIN = float("inf")  # every batch packed: compare the layouts themselves
    prompt = jnp.asarray(initial_prompt(b, "sampled_vocab", 20, 0), jnp.float32)
    band, dense = llama.FAST, dataclasses.replace(llama.FAST, band=False)

    train = encode(b, task.load("train"), max_length=MAX_LENGTH)
    pairs = []
    for step in range(args.train_batches):
        rows = train_rows(len(train), BATCH, step, 0)
        pairs.append(tuple(jax.device_put(make_batch(train, rows, b.pad_id, max_length=MAX_LENGTH,
                                                     batch_size=BATCH, pack=pack))
                           for pack in (False, True)))
    grads = {name: jax.jit(jax.grad(llama.make_loss_fn(b.config, b.bos_id, opts), argnums=1))
             for name, opts in (("band", band), ("dense", dense))}
    variants = {
        "padded": lambda pa, pk: grads["band"](b.params, prompt, pa, None),
        "packed, dense attention": lambda pa, pk: grads["dense"](b.params, prompt, pk, None),
        "packed, banded attention": lambda pa, pk: grads["band"](b.params, prompt, pk, None),
    }
    report("loss + prompt gradient, SST-2 training batches", list(variants), pairs,
           paired(variants, pairs, args.rounds), "packed, banded attention")

    valid = encode(b, subset(task.load("validation"), BATCH * args.score_batches),
                   max_length=MAX_LENGTH)
    pairs = [(jax.device_put(padded),
              jax.device_put(make_batch(valid, rows, b.pad_id, max_length=MAX_LENGTH,
                                        batch_size=BATCH, pack=True)))
             for rows, padded in eval_batches(valid, BATCH, b.pad_id, max_length=MAX_LENGTH)]
    scores = {name: jax.jit(llama.make_score_fn(b.config, b.bos_id, opts))
              for name, opts in (("band", band), ("dense", dense))}
    states = b.prefix_states(prompt)
    variants = {
        "padded": lambda pa, pk: scores["band"](b.params, prompt, pa),
        "padded, prefix states": lambda pa, pk: scores["band"](b.params, states, pa),
        "packed, dense attention": lambda pa, pk: scores["dense"](b.params, prompt, pk),
        "packed, banded attention": lambda pa, pk: scores["band"](b.params, prompt, pk),
        "packed, banded, prefix states": lambda pa, pk: scores["band"](b.params, states, pk),
    }
    report("scoring, SST-2 validation batches (rows sorted by length)", list(variants), pairs,
           paired(variants, pairs, args.rounds), "packed, banded attention")


if __name__ == "__main__":
    main()
