"""Each fast-path option of spot/backbones/llama.py switched off alone: train step and scoring speed.

One SST-2-sized batch shape (batch 8, context bucket 48, prompt 20, single-token answers), the real
SmolLM2 weights, our jitted train step (spot.train.make_train_step); variants interleaved in one
process, medians over rounds, speed relative to the plain Flax path. Also the compile time of
each variant's train step (first call).

    .venv/bin/python benchmarks/_ablate.py [--rounds 3] [--context 48]
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

import jax.numpy as jnp  # noqa: E402
from _common import interleaved, median_ratio, timed  # noqa: E402
from _ours import OursScore, OursTrain, with_paths  # noqa: E402

from spot import backbones  # noqa: E402
from spot.backbones import llama  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=48)
    args = parser.parse_args()
    b = backbones.load()
    cfg = b.config
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.standard_normal((20, cfg.d_model), dtype=np.float32) * 0.05)
    lengths = rng.integers(8, args.context + 1, 8)
    mask = (np.arange(args.context)[None] >= args.context - lengths[:, None]).astype(np.int32)
    batch = {
        "tokens": jnp.asarray(rng.integers(100, 1000, (8, args.context)) * mask, jnp.int32),
        "mask": jnp.asarray(mask),
        "choices": jnp.asarray(rng.integers(100, 1000, (8, 2, 1)), jnp.int32),
        "choice_mask": jnp.ones((8, 2, 1), jnp.int32),
        "labels": jnp.asarray(rng.integers(0, 2, 8), jnp.int32),
    }
    variants = {"plain (before)": None, "fast (all on)": llama.FAST}
    for field, off in (("share_prefix", False), ("prune_last", False), ("fuse", False),
                       ("unroll", True)):
        variants[f"fast, {field}={off}"] = dataclasses.replace(llama.FAST, **{field: off})
    trains, scores, compile_s = {}, {}, {}
    for name, opts in variants.items():
        bb = with_paths(b, opts)
        trains[name] = OursTrain(bb, prompt, [batch])
        compile_s[name] = timed(trains[name])
        scores[name] = OursScore(bb, prompt, [batch])
        scores[name]()
        print(f"{name}: first train call {compile_s[name]:.1f} s", flush=True)
    train_times = interleaved(trains, args.rounds)
    score_times = interleaved(scores, args.rounds)
    ref = "plain (before)"
    print(f"| variant (batch 8, context {args.context}, prompt 20) | train speed vs plain | "
          "score speed vs plain | first train call (compile + step), s |")
    print("|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {median_ratio(train_times, ref, name):.2f}x | "
              f"{median_ratio(score_times, ref, name):.2f}x | {compile_s[name]:.0f} |")


if __name__ == "__main__":
    main()
