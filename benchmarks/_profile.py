"""Where the time of one SmolLM2 train step goes: sub-computations timed in one process, interleaved.

Times, for one SST-2-sized batch (batch 8, context bucket 48 + 1 answer token, prompt 20), the
whole jitted train step (plain and fast path) and its pieces, each jitted alone and run forward +
backward w.r.t. its input (no weight gradients, as in the step): the projections of one layer
(fused q|k|v, o, fused gate|up, down) over the rows each path feeds them, the attention core
(scores, softmax, weighted sum) and the answer logits. Per-layer pieces are multiplied by the
number of layers; the step minus the pieces is the elementwise rest (RMSNorm, rotary, SiLU,
residuals, slicing/copies, the optimizer update).

    .venv/bin/python benchmarks/_profile.py [--rounds 5] [--context 48]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import interleaved  # noqa: E402
from _ours import OursTrain, with_paths  # noqa: E402

from spot import backbones  # noqa: E402
from spot.backbones import llama  # noqa: E402


def fwd_bwd(fn):
    """(x, *weights) -> (sum fn, d sum / dx): forward + input-gradient backward, jitted; the
    weights are arguments (not constants XLA would fold)."""
    return jax.jit(jax.value_and_grad(lambda x, *w: jnp.sum(fn(x, *w))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--context", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=20)
    args = parser.parse_args()
    b = backbones.load()
    cfg = b.config
    w = jax.tree_util.tree_map(lambda a: a[0], b.params["layers"])
    t = args.context + 1
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.standard_normal((args.prompt, cfg.d_model), dtype=np.float32) * 0.05)
    batch = {
        "tokens": jnp.asarray(rng.integers(100, 1000, (args.batch, args.context)), jnp.int32),
        "mask": jnp.ones((args.batch, args.context), jnp.int32),
        "choices": jnp.asarray(rng.integers(100, 1000, (args.batch, 2, 1)), jnp.int32),
        "choice_mask": jnp.ones((args.batch, 2, 1), jnp.int32),
        "labels": jnp.zeros((args.batch,), jnp.int32),
    }
    variants = {"plain": None, "fast": llama.FAST}
    pieces: dict[str, tuple] = {}
    for name, opts in variants.items():
        pieces[f"train step ({name} path)"] = (OursTrain(with_paths(b, opts), prompt, [batch]), 1)
        # rows through each layer: plain = every row holds the prompt; fast = prompt once
        rows = args.batch * (t + args.prompt) if opts is None else args.prompt + args.batch * t
        x = jnp.asarray(rng.standard_normal((rows, cfg.d_model), dtype=np.float32))
        qkv = jnp.concatenate([w["attn"]["q"]["kernel"], w["attn"]["k"]["kernel"],
                               w["attn"]["v"]["kernel"]], 1)
        gate_up = jnp.concatenate([w["mlp"]["gate"]["kernel"], w["mlp"]["up"]["kernel"]], 1)
        down = w["mlp"]["down"]["kernel"]
        o = w["attn"]["o"]["kernel"]

        def matmuls(x, qkv, gate_up, down, o):
            a = x @ qkv
            g = x @ gate_up
            return jnp.sum(a) + jnp.sum(x @ o) + jnp.sum(g[:, : cfg.d_ff] @ down)

        f = fwd_bwd(matmuls)
        pieces[f"{cfg.num_layers} x layer projections ({name}, {rows} rows)"] = (
            lambda f=f, x=x, w=(qkv, gate_up, down, o): f(x, *w)[0].block_until_ready(),
            cfg.num_layers)
        # attention core over [batch, t(+prompt), kv, groups, hd]
        seq = t + args.prompt
        groups = cfg.num_heads // cfg.num_kv_heads
        q = jnp.asarray(rng.standard_normal((args.batch, seq if opts is None else t, cfg.num_kv_heads,
                                             groups, cfg.head_dim), dtype=np.float32))
        kv = jnp.asarray(rng.standard_normal((args.batch, seq, cfg.num_kv_heads, cfg.head_dim),
                                             dtype=np.float32))
        bias = jnp.zeros((args.batch, q.shape[1], seq), jnp.float32)

        def attention(q, k, bias, opts=opts):  # plain: the Flax module's einsum form; fast: ours
            if opts is not None:
                return llama._attention(q, k, k, bias, cfg.head_dim**-0.5)
            logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * cfg.head_dim**-0.5
            weights = jax.nn.softmax(logits + bias[:, None, None], axis=-1)
            return jnp.einsum("bhgqk,bkhd->bqhgd", weights, k)

        f = jax.jit(jax.value_and_grad(lambda q, k, bias: jnp.sum(attention(q, k, bias)),
                                       argnums=(0, 1)))
        pieces[f"{cfg.num_layers} x attention core ({name})"] = (
            lambda f=f, q=q, kv=kv, bias=bias: f(q, kv, bias)[0].block_until_ready(),
            cfg.num_layers)

    # logits at the answer positions (fast and plain do the same)
    h = jnp.asarray(rng.standard_normal((args.batch, 1, cfg.d_model), dtype=np.float32))
    embed = b.params["embed"]["embedding"]
    f = fwd_bwd(lambda h, e: jax.nn.log_softmax(h @ e.T, axis=-1)[..., 0])
    pieces["answer logits + log_softmax"] = (lambda: f(h, embed)[0].block_until_ready(), 1)

    for fn, _ in pieces.values():
        fn()  # compile
    times = interleaved({k: v[0] for k, v in pieces.items()}, args.rounds)
    print(f"| piece (batch {args.batch}, context {args.context}+1, prompt {args.prompt}) | ms (median) |")
    print("|---|---|")
    for name, (_, mult) in pieces.items():
        print(f"| {name} | {1000 * mult * float(np.median(times[name])):.0f} |")


if __name__ == "__main__":
    main()
