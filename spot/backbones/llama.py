"""Llama-family decoder (SmolLM2, Llama 2/3 layouts) as Flax modules with soft-prompt input.

The prompt sits before the context (after BOS when the model uses one):
    [BOS?] [prompt x L] [pad ... context] [answer tokens]
Rank classification scores each answer's tokens as a continuation of the context; logits are
computed only at the answer positions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from spot.backbones.base import PACK_CHUNK, Batch, Params, broadcast_prompt, position_ids

NEG_INF = -1e9


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout_rate: float = 0.0  # Llama is pretrained without dropout; the trainer may set it


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(variance + self.eps) * scale


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half rotary embedding. [batch, length, heads, head_dim] -> same."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) / half))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, length, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.config
        dense = functools.partial(nn.Dense, use_bias=False)
        batch, length, _ = x.shape
        q = dense(cfg.num_heads * cfg.head_dim, name="q")(x)
        k = dense(cfg.num_kv_heads * cfg.head_dim, name="k")(x)
        v = dense(cfg.num_kv_heads * cfg.head_dim, name="v")(x)
        q = rotary(q.reshape(batch, length, cfg.num_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = rotary(k.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = v.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        # [batch, q_len, kv_heads, groups, head_dim] x [batch, k_len, kv_heads, head_dim]
        logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * cfg.head_dim**-0.5
        weights = jax.nn.softmax(logits + bias[:, None, None], axis=-1)
        out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v).reshape(batch, length, -1)
        return dense(cfg.d_model, name="o")(out)


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, use_bias=False)
        gate = dense(self.config.d_ff, name="gate")(x)
        up = dense(self.config.d_ff, name="up")(x)
        return dense(self.config.d_model, name="down")(jax.nn.silu(gate) * up)


class Block(nn.Module):
    config: LlamaConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, positions: jax.Array):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        h = Attention(cfg, name="attn")(RMSNorm(cfg.rms_eps, name="attn_norm")(x), bias, positions)
        x = x + drop(h)
        x = x + drop(MLP(cfg, name="mlp")(RMSNorm(cfg.rms_eps, name="mlp_norm")(x)))
        return x, None


class LlamaModel(nn.Module):
    """Input embeddings -> final hidden states; layers are scanned (stacked params, fast compile)."""

    config: LlamaConfig
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed")
        self.layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.deterministic, name="layers")
        self.norm = RMSNorm(cfg.rms_eps, name="norm")
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head")

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embed(tokens)

    def __call__(self, embeddings: jax.Array, mask: jax.Array) -> jax.Array:
        # [batch, length, d_model], [batch, length] -> [batch, length, d_model]
        length = mask.shape[1]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        allowed = causal[None] & (mask[:, None, :] > 0)
        bias = jnp.where(allowed, 0.0, NEG_INF).astype(embeddings.dtype)
        x, _ = self.layers(embeddings, bias, position_ids(mask))
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        # [..., d_model] -> [..., vocab]
        if self.config.tie_embeddings:
            return self.embed.attend(hidden)
        return self.lm_head(hidden)


def init_params(config: LlamaConfig, seed: int = 0) -> Params:
    """Random parameters (tests and tiny models)."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    return LlamaModel(config).init(jax.random.PRNGKey(seed), tokens, method=_full_forward)["params"]


def _full_forward(model: LlamaModel, tokens: jax.Array) -> jax.Array:
    """Touches every submodule once so `init` creates all parameters."""
    return model.logits(model(model.embed_tokens(tokens), jnp.ones_like(tokens)))


def _prefixed_hidden(
    config: LlamaConfig,
    params: Params,
    prompt: jax.Array,
    tokens: jax.Array,
    mask: jax.Array,
    bos_id: int | None,
    rng: jax.Array | None,
) -> jax.Array:
    """Plain path: [BOS?] + prompt + tokens through the Flax modules -> hidden states of the token
    columns [batch, length, d_model]. The reference for the fast path; also serves dropout > 0."""
    model = LlamaModel(config, deterministic=rng is None)
    variables = {"params": params}
    batch = tokens.shape[0]
    parts = [broadcast_prompt(prompt, batch).astype(jnp.float32)]
    masks = [jnp.ones(parts[0].shape[:2], mask.dtype)]
    if bos_id is not None:
        bos = model.apply(variables, jnp.full((batch, 1), bos_id), method=LlamaModel.embed_tokens)
        parts.insert(0, bos)
        masks.insert(0, jnp.ones((batch, 1), mask.dtype))
    parts.append(model.apply(variables, tokens, method=LlamaModel.embed_tokens))
    masks.append(mask)
    rngs = None if rng is None else {"dropout": rng}
    hidden = model.apply(
        variables, jnp.concatenate(parts, axis=1), jnp.concatenate(masks, axis=1), rngs=rngs
    )
    return hidden[:, -tokens.shape[1] :]


# ---------------------------------------------------------------------------------------------
# Fast path: the same model as pure functions over the stored param tree (same layout).
#
# * Shared prefix: [BOS] + a shared [L, d] prompt come first in every row, so under causal
#   attention their hidden states (hence keys/values) are identical across rows. They run once,
#   as a one-row prefix stream whose keys/values every row attends to: batch x L fewer
#   token-columns of work, exact up to float reassociation. Per-row prompts [B, L, d] stay in
#   the rows.
# * The stacked weights are the layer scan's xs, so the backward pass reads them in place (indexing
#   them out of a closed-over constant made autodiff save a stacked copy of every layer's weights).
# * Packing: a batch with `pack` (spot.batching.make_batch(pack=True)) runs its real tokens
#   only, gathered out of the padded layout into one stream [1, slots, d] with a block-diagonal
#   causal mask (each token sees the shared prefix and the earlier tokens of its own row), then
#   scattered back. Exact like the shared prefix; it removes the padding columns (over half of
#   an SST-2 training batch). Attention is banded: the stream's queries go in blocks of
#   PACK_CHUNK slots, and each block attends to the prefix and to the `window` slots before it
#   plus its own (`window` >= the longest row - 1, batch["pack_window"]), not to the whole stream.
# * Optional, off by default (no measurable gain, see benchmarks/README.md): `prune_last` runs the
#   last layer's query/output/MLP only at the columns whose logits are read (costs a slice copy of
#   the weights); `fuse` does q|k|v and gate|up as one matmul each (kernels concatenated per layer
#   inside the step; the stored tree is unchanged).
# * Cached prefix states (serving): [BOS] + a prompt run once (`_prefix_states`) give each
#   layer's keys/values; `score_fn` takes them in place of the prompt, and rows (or the tokens of
#   a packed stream, each masked to its own row's prefix) attend to them without running it.
# Only the prompt is differentiated (the trainer takes grad w.r.t. argnums=1), so no weight
# gradients exist in the step (tests/test_fast_paths.py checks the HLO).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FastOptions:
    share_prefix: bool = True  # run [BOS] + a shared prompt once, not once per row
    prune_last: bool = False  # last layer only at the read columns (costs a weight copy)
    fuse: bool = False  # one matmul for q|k|v and one for gate|up (no measurable gain: off)
    unroll: int | bool = 1  # lax.scan unroll factor over layers (True: fully unrolled)
    pack: bool = True  # run packed batches (batch["pack"]) as one stream of their real tokens
    band: bool = True  # packed streams attend within their window (else over the whole stream)


FAST = _FastOptions()


def _rms(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + eps) * scale


def _rope_table(positions: jax.Array, head_dim: int, theta: float):
    """[batch, length] positions -> (cos, sin), each [batch, length, 1, head_dim // 2]."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) / half))
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def _rope(x: jax.Array, table) -> jax.Array:
    """Rotate-half rotary embedding of [batch, length, heads, head_dim]."""
    cos, sin = table
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attend(cfg: LlamaConfig, q, k, v, bias):
    """GQA without repeating k/v. q [b, tq, heads, hd], k/v [b, tk, kv, hd], bias [b, tq, tk]
    -> [b * tq, heads * hd]."""
    b, tq = q.shape[:2]
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, tq, cfg.num_kv_heads, groups, cfg.head_dim)
    return _attention(q, k, v, bias, cfg.head_dim**-0.5).reshape(b * tq, -1)


def _head_major(x: jax.Array) -> jax.Array:
    """[b, tq, kv, groups, hd] -> [b, kv, groups * tq, hd]: one plain matmul per kv head."""
    b, tq, h, g, d = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(b, h, g * tq, d)


def _token_major(x: jax.Array, tq: int) -> jax.Array:
    """Inverse of `_head_major`."""
    b, h, _, d = x.shape
    return x.reshape(b, h, -1, tq, d).transpose(0, 3, 1, 2, 4)


# Softmax attention with a hand-written backward pass. Everything heavy runs head-major
# ([b, kv, groups * tq, tk]: plain batched matmuls, no transposes of the [tq, tk] arrays), and the
# softmax backward uses rowsum(dO * O) over head_dim (as FlashAttention does) instead of
# rowsum(dP * P) over the keys. Measured on SmolLM2 shapes (packed stream 256, 276 keys): ~2x
# faster than autodiff of the einsum form (tests/test_fast_paths.py checks the gradients).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, bias, scale: float):
    """q [b, tq, kv, groups, hd], k/v [b, tk, kv, hd], bias [b, tq, tk] -> [b, tq, kv, groups, hd]."""
    return _attention_fwd(q, k, v, bias, scale)[0]


def _attention_fwd(q, k, v, bias, scale):
    b, tq, h, g, d = q.shape
    qh = _head_major(q) * scale  # scaled once here, not per logit
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh).reshape(b, h, g, tq, -1)
    weights = jax.nn.softmax(logits + bias[:, None, None], axis=-1).reshape(b, h, g * tq, -1)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, vh)  # [b, kv, groups * tq, hd]
    return _token_major(out, tq), (qh, kh, vh, weights, out)


def _attention_bwd(scale, residuals, d_out):
    qh, kh, vh, weights, out = residuals
    tq = d_out.shape[1]
    d_out = _head_major(d_out)
    d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out, vh)
    d_logits = weights * (d_weights - jnp.sum(d_out * out, axis=-1, keepdims=True))
    dq = jnp.einsum("bhqk,bhkd->bhqd", d_logits, kh) * scale
    dk = jnp.einsum("bhqk,bhqd->bhkd", d_logits, qh)  # qh is already scaled
    dv = jnp.einsum("bhqk,bhqd->bhkd", weights, d_out)
    return _token_major(dq, tq), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _project(h: jax.Array, kernels: list[jax.Array], fuse: bool) -> list[jax.Array]:
    """[h @ w for w in kernels]; with `fuse`, one matmul over the concatenated kernels."""
    if not fuse or len(kernels) == 1:
        return [h @ w for w in kernels]
    cuts = [sum(w.shape[1] for w in kernels[: i + 1]) for i in range(len(kernels) - 1)]
    return jnp.split(h @ jnp.concatenate(kernels, axis=1), cuts, axis=-1)


def _mlp_residual(cfg: LlamaConfig, w, x: jax.Array, fuse: bool) -> jax.Array:
    """x + MLP(RMSNorm(x)) over rows [n, d]."""
    mlp = w["mlp"]
    h = _rms(x, w["mlp_norm"]["scale"], cfg.rms_eps)
    gate, up = _project(h, [mlp["gate"]["kernel"], mlp["up"]["kernel"]], fuse)
    return x + (jax.nn.silu(gate) * up) @ mlp["down"]["kernel"]


def _windows(x: jax.Array, window: int, fill: int = 0) -> jax.Array:
    """[s, ...] stream -> [s / PACK_CHUNK, window + PACK_CHUNK, ...]: block j holds slots
    j * PACK_CHUNK - window .. (j + 1) * PACK_CHUNK - 1 (`fill` before the stream's start)."""
    c = PACK_CHUNK
    blocks = jnp.concatenate([jnp.full((window, *x.shape[1:]), fill, x.dtype), x])
    blocks = blocks.reshape(-1, c, *x.shape[1:])  # [(window + s) / c, c, ...]
    n = x.shape[0] // c
    return jnp.concatenate([blocks[i : i + n] for i in range(window // c + 1)], axis=1)


def _layer(cfg: LlamaConfig, fuse: bool, w, prefix, x, tables, biases, cols=None, groups=None,
           cached=None, window=0):
    """One block over the prefix streams [n, p, d] (or None) and the rows [b, t, d].

    Row i attends to prefix `groups[i]` ([b] int; None: the one prefix, n = 1). All streams share
    every matmul (their rows are concatenated). `cached` = this layer's (keys, values)
    [n, p, kv, hd] of prefixes run earlier (`_prefix_states`): rows attend to them the same way
    and no prefix stream runs. With `cols=(lo, hi)` (the last layer) only row columns lo:hi are
    computed to the end and the prefix output is dropped: returns (None, [b, hi - lo, d], kv);
    otherwise (new prefix, [b, t, d], kv), kv being the rows' own (keys, values) [b, t, kv, hd].
    `window` > 0: x is one packed stream [1, t, d] whose queries attend in blocks (`_windows`).
    """
    b, t, d = x.shape
    nh, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = w["attn"]
    n, p = (0, 0) if prefix is None else prefix.shape[:2]
    rows = x.reshape(b * t, d)
    if p:
        rows = jnp.concatenate([prefix.reshape(n * p, d), rows])
    h = _rms(rows, w["attn_norm"]["scale"], cfg.rms_eps)
    kernels = [attn["q"]["kernel"], attn["k"]["kernel"], attn["v"]["kernel"]]
    table_p, table_x = tables
    bias_p, bias_x = biases
    m = n * p  # prefix rows
    if cols is None:
        q, k, v = _project(h, kernels, fuse)
        qx, tq, x_out = q[m:], t, x
    else:
        lo, hi = cols
        k, v = _project(h, kernels[1:], fuse)
        tq = hi - lo
        qx = h[m:].reshape(b, t, d)[:, lo:hi].reshape(b * tq, d) @ attn["q"]["kernel"]
        table_x = tuple(c[:, lo:hi] for c in table_x)
        bias_x, x_out = bias_x[:, lo:hi], x[:, lo:hi]
    qx = _rope(qx.reshape(b, tq, nh, hd), table_x)
    keys = _rope(k[m:].reshape(b, t, kvh, hd), tables[1])
    values = v[m:].reshape(b, t, kvh, hd)
    row_kv = (keys, values)
    if p:
        kp = _rope(k[:m].reshape(n, p, kvh, hd), table_p)
        vp = v[:m].reshape(n, p, kvh, hd)
    elif cached is not None:
        kp, vp = cached
        p = kp.shape[1]
    if window:  # the stream's query blocks, each with its window of keys/values
        qx = qx.reshape(t // PACK_CHUNK, PACK_CHUNK, nh, hd)
        keys, values = _windows(keys[0], window), _windows(values[0], window)
    qb = qx.shape[0]
    if p:
        if groups is None:  # [n = 1, p, ...] -> every row (or query block)
            row_kp, row_vp = (jnp.broadcast_to(a, (qb, p, kvh, hd)) for a in (kp, vp))
        else:  # each row its own prefix
            row_kp, row_vp = kp[groups], vp[groups]
        keys = jnp.concatenate([row_kp, keys], axis=1)
        values = jnp.concatenate([row_vp, values], axis=1)
    out = _attend(cfg, qx, keys, values, bias_x)
    residual = x_out.reshape(b * tq, d)
    if m and cols is None:
        qp = _rope(q[:m].reshape(n, p, nh, hd), table_p)
        out = jnp.concatenate([_attend(cfg, qp, kp, vp, bias_p), out])
        residual = jnp.concatenate([prefix.reshape(m, d), residual])
    rows = _mlp_residual(cfg, w, residual + out @ attn["o"]["kernel"], fuse)
    if m and cols is None:
        return rows[:m].reshape(n, p, d), rows[m:].reshape(b, t, d), row_kv
    return None, rows.reshape(b, tq, d), row_kv


@flax.struct.dataclass
class _Stream:
    """What every layer and the output stage read besides the hidden states (`_fast_inputs`)."""

    tables: Any  # rotary (cos, sin) of the prefix and of the rows
    biases: Any  # attention bias of the prefix and of the rows
    groups: jax.Array | None  # each row's prefix [b]; None: the one prefix
    index: jax.Array | None  # packed stream: each slot's flattened row position; None: padded
    window: int = flax.struct.field(pytree_node=False)  # banded attention (packed streams)
    rows: tuple[int, int] = flax.struct.field(pytree_node=False)  # (b, tx) of the row layout
    cols: tuple[int, int] = flax.struct.field(pytree_node=False)  # row columns lo:hi read out


def _fast_hidden(config, params, prompt, tokens, mask, bos_id, cols=None, opts=FAST, slots=0,
                 groups=None, cached=None, window=0) -> jax.Array:
    """Same as `_prefixed_hidden(...)[:, lo:hi]` (all columns when `cols` is None), deterministic;
    the arguments as `_fast_inputs` takes them. Layers run in a `lax.scan` over the stacked
    weights."""
    carry, stream, kv = _fast_inputs(config, params, prompt, tokens, mask, bos_id, cols, opts,
                                     slots, groups, cached, window)
    # the stacked weights are the scan's xs (not indexed out of a closed-over constant): then the
    # backward pass reads them in place instead of saving a stacked copy of every layer's weights
    stacked = (params["layers"], kv)
    prune_last = opts.prune_last and stream.index is None  # packed columns are not row slices
    xs = jax.tree_util.tree_map(lambda a: a[:-1], stacked) if prune_last else stacked

    def body(carry, layer):
        return _layer_step(config, opts.fuse, layer[0], carry, stream, layer[1]), None

    (prefix, x), _ = jax.lax.scan(body, carry, xs, unroll=opts.unroll)
    if prune_last:  # the last layer computes only the columns read: x is [b, hi - lo, d]
        w, kv = jax.tree_util.tree_map(lambda a: a[-1], stacked)
        _, x, _ = _layer(config, opts.fuse, w, prefix, x, stream.tables, stream.biases,
                         stream.cols, stream.groups, kv)
        return _rms(x, params["norm"]["scale"], config.rms_eps)
    return _fast_outputs(config, params, x, stream)


def _layer_step(cfg: LlamaConfig, fuse: bool, w, carry, stream: _Stream, kv=None):
    """One block over (prefix, rows) -> (prefix, rows), every column."""
    return _layer(cfg, fuse, w, *carry, stream.tables, stream.biases, groups=stream.groups,
                  cached=kv, window=stream.window)[:2]


def _fast_outputs(cfg: LlamaConfig, params: Params, x: jax.Array, stream: _Stream) -> jax.Array:
    """The last layer's rows (or packed stream) -> normed hidden states of columns lo:hi."""
    b, tx = stream.rows
    lo, hi = stream.cols
    if stream.index is not None:  # [1, slots, d] -> [b, tx, d]; columns without a token stay 0
        x = jnp.zeros((b * tx, cfg.d_model), x.dtype).at[stream.index].set(x[0], mode="drop")
        x = x.reshape(b, tx, cfg.d_model)
    return _rms(x[:, lo:hi], params["norm"]["scale"], cfg.rms_eps)


def _fast_inputs(
    config: LlamaConfig,
    params: Params,
    prompt: jax.Array,
    tokens: jax.Array,
    mask: jax.Array,
    bos_id: int | None,
    cols: tuple[int, int] | None = None,
    opts: _FastOptions = FAST,
    slots: int = 0,
    groups: tuple[jax.Array, jax.Array] | None = None,
    cached: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    window: int = 0,
):
    """The first layer's input: ((prefix [n, p, d] or None, rows [b, tx, d] or a packed stream
    [1, slots, d]), `_Stream`, each layer's cached (keys, values) stacked or None).
    `slots` > 0: run the real tokens as one packed stream of that static size (must hold them),
    with banded attention when `window` > 0 (>= the longest row - 1; see "Packing" above).
    `groups` = (first rows [n], group of each row [b]) for per-row prompts [b, L, d] whose rows
    within a group are equal: each distinct prompt then runs once, as its group's prefix.
    `cached` = (keys, values [layers, n, p, kv, hd], prefix of each row [b]): the states of n
    prefixes ([BOS] + prompt) from `_prefix_states`; `prompt` is then unused."""
    cfg = config
    embed = params["embed"]["embedding"]
    b, t = tokens.shape
    prompt = prompt.astype(jnp.float32)
    shared = []
    if bos_id is not None and cached is None:
        shared.append(embed[jnp.asarray([bos_id])])
    x, x_mask = embed[tokens], mask
    group_index = None
    if cached is not None:
        group_index = cached[2]
    elif prompt.ndim == 2 and opts.share_prefix:
        shared.append(prompt)
    elif groups is not None and opts.share_prefix:
        first_rows, group_index = groups
    else:
        rows_prompt = broadcast_prompt(prompt, b)
        if not opts.share_prefix and shared:  # BOS per row too (ablation of the shared prefix)
            rows_prompt = jnp.concatenate([jnp.broadcast_to(shared[0], (b, 1, cfg.d_model)),
                                           rows_prompt], axis=1)
            shared = []
        x = jnp.concatenate([rows_prompt, x], axis=1)
        x_mask = jnp.concatenate([jnp.ones(rows_prompt.shape[:2], mask.dtype), mask], axis=1)
    prefix = jnp.concatenate(shared)[None] if shared else None
    if group_index is not None and cached is None:  # one prefix stream per distinct prompt
        distinct = prompt[first_rows]
        if prefix is not None:
            prefix = jnp.broadcast_to(prefix, (distinct.shape[0], *prefix.shape[1:]))
            distinct = jnp.concatenate([prefix, distinct], axis=1)
        prefix = distinct
    p, tx = (0 if prefix is None else prefix.shape[1]), x.shape[1]
    prefix = prefix if p else None  # an empty shared prompt
    if cached is not None:
        p = cached[0].shape[2]
    # positions: the prefix is all real tokens, so rows continue from p (as cumsum over the whole)
    pos_x = jnp.maximum(p + jnp.cumsum(x_mask, axis=-1) - 1, 0).astype(jnp.int32)
    # `slots` counts neither per-row prompts nor group prefixes: those batches run padded
    slots = slots if tx == t and (group_index is None or cached is not None) else 0
    window = window if slots else 0
    bias_prefix = None
    if slots:
        index, x, pos_x, bias_x = _pack(x, x_mask, pos_x, slots, window)
        if cached is not None:
            cached, bias_prefix = _one_prefix(cached, index, t)
            bias_prefix = bias_prefix.reshape(*bias_x.shape[:2], -1)  # per query block
            group_index = None
    else:
        causal = jnp.tril(jnp.ones((tx, tx), dtype=bool))
        allowed = causal[None] & (x_mask[:, None, :] > 0)
        bias_x = jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)
    bias_p = None
    if p:
        if bias_prefix is None:  # every row sees all of its prefix
            bias_prefix = jnp.zeros((*bias_x.shape[:2], p), jnp.float32)
        bias_x = jnp.concatenate([bias_prefix, bias_x], axis=-1)
        bias_p = jnp.where(jnp.tril(jnp.ones((p, p), dtype=bool)), 0.0, NEG_INF)[None]
    tables = (_rope_table(jnp.arange(p)[None], cfg.head_dim, cfg.rope_theta),
              _rope_table(pos_x, cfg.head_dim, cfg.rope_theta))
    biases = (bias_p, bias_x)
    lo, hi = (0, t) if cols is None else cols
    lo, hi = lo + tx - t, hi + tx - t  # token columns -> row columns (per-row prompts first)
    stream = _Stream(tables, biases, group_index, index if slots else None, window, (b, tx),
                     (lo, hi))
    return (prefix, x), stream, None if cached is None else cached[:2]


def _pack(x: jax.Array, mask: jax.Array, positions: jax.Array, slots: int, window: int = 0):
    """Real tokens of [b, t, d] rows -> one stream [1, slots, d] (see "Packing" above).

    Returns (index [slots] into the flattened rows, b * t on empty slots; stream; positions
    [1, slots]; attention bias: [1, slots, slots], or with `window` per query block
    [slots / PACK_CHUNK, PACK_CHUNK, window + PACK_CHUNK] over its keys (`_windows`)).
    `slots` must hold every real token.
    """
    b, t, d = x.shape
    (index,) = jnp.nonzero(mask.reshape(-1), size=slots, fill_value=b * t)
    filled = index < b * t
    source = jnp.minimum(index, b * t - 1)
    row = jnp.where(filled, index // t, -1)
    key_row = jnp.where(filled, row, -2)  # -2: nobody's (empty slots, before the stream)
    query_row, query_index = row[:, None], index[:, None]  # [slots, 1]
    key_row, key_index = key_row[None], index[None]  # [1, slots]
    if window:
        if slots % PACK_CHUNK:
            raise ValueError(f"a banded stream's size must be a multiple of {PACK_CHUNK}: {slots}")
        query_row, query_index = (a.reshape(-1, PACK_CHUNK, 1) for a in (query_row, query_index))
        key_row = _windows(key_row[0], window, -2)[:, None]  # [blocks, 1, window + chunk]
        key_index = _windows(index, window)[:, None]
    # a token sees the earlier tokens of its own row; empty slots see only the prefix
    allowed = (key_row == query_row) & (key_index <= query_index)
    bias = jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)
    bias = bias if window else bias[None]
    return index, x.reshape(b * t, d)[source][None], positions.reshape(-1)[source][None], bias


def _one_prefix(cached, index: jax.Array, t: int):
    """Cached states of n prefixes for a packed stream: one prefix of n * p keys, each token
    masked to its own row's ([1, slots, n * p] bias); `index` as `_pack` returns it."""
    keys, values, row_prefix = cached
    layers, n, p = keys.shape[:3]
    token_prefix = row_prefix[jnp.minimum(index // t, row_prefix.shape[0] - 1)]  # [slots]
    allowed = token_prefix[:, None] == jnp.repeat(jnp.arange(n), p)[None, :]
    bias = jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[None]
    flat = (a.reshape(layers, 1, n * p, *a.shape[3:]) for a in (keys, values))
    return (*flat, None), bias


def _hidden(config, params, prompt, tokens, mask, bos_id, rng, cols, opts, pack=(0, 0),
            groups=None, cached=None):
    """Hidden states of token columns lo:hi: fast path unless dropout is active."""
    if opts is None or (rng is not None and config.dropout_rate > 0):
        if cached is not None:
            raise ValueError("cached prefix states need the fast path (no dropout)")
        hidden = _prefixed_hidden(config, params, prompt, tokens, mask, bos_id, rng)
        return hidden if cols is None else hidden[:, cols[0] : cols[1]]
    slots, window = pack if opts.pack else (0, 0)
    return _fast_hidden(config, params, prompt, tokens, mask, bos_id, cols, opts, slots, groups,
                        cached, window if opts.band else 0)


def _prefix_states(config: LlamaConfig, params: Params, prompt: jax.Array, bos_id: int | None):
    """The prefix [BOS] + prompt [L, d] run alone: {"keys", "values"}, each layer's rotated keys
    and values [layers, p, kv, hd] (p = L + 1 with BOS). Under causal attention they do not depend
    on what follows, so rows can attend to them later instead of running the prefix again."""
    embed = params["embed"]["embedding"]
    parts = [] if bos_id is None else [embed[jnp.asarray([bos_id])]]
    x = jnp.concatenate([*parts, prompt.astype(jnp.float32)])[None]  # [1, p, d]
    p = x.shape[1]
    table = _rope_table(jnp.arange(p)[None], config.head_dim, config.rope_theta)
    bias = jnp.where(jnp.tril(jnp.ones((p, p), dtype=bool)), 0.0, NEG_INF)[None]

    def body(x, w):
        _, x, (keys, values) = _layer(config, False, w, None, x, (None, table), (None, bias))
        return x, (keys[0], values[0])

    _, (keys, values) = jax.lax.scan(body, x, params["layers"])
    return {"keys": keys, "values": values}


def _cached(states: dict[str, jax.Array], batch: Batch, repeats: int = 1):
    """Prefix states for `_fast_hidden`: one prefix's [layers, p, kv, hd] (every row) or n
    prefixes' [n, layers, p, kv, hd] with `batch["prompt_index"]` naming each row's."""
    keys, values = states["keys"], states["values"]
    if keys.ndim == 4:
        keys, values = keys[None], values[None]
    b = batch["tokens"].shape[0]
    index = batch.get("prompt_index", jnp.zeros(b, jnp.int32))
    return jnp.moveaxis(keys, 0, 1), jnp.moveaxis(values, 0, 1), jnp.repeat(index, repeats)


def _prefixes(states: dict[str, jax.Array] | None, batch: Batch, repeats: int = 1):
    """(groups, cached) for `_hidden`: prompt groups, or prefix states when given."""
    if states is None:
        return _groups(batch, repeats), None
    return None, _cached(states, batch, repeats)


def make_prefix_fn(config: LlamaConfig, bos_id: int | None):
    """prefix_fn(params, prompt [L, d]) -> prefix states that `score_fn` takes for `prompt`."""
    return functools.partial(_prefix_states, config, bos_id=bos_id)


def _packing(batch: Batch, repeats: int = 1) -> tuple[int, int]:
    """(stream size, attention window) of a packed batch whose rows run `repeats` times each;
    (0, 0): run the padded layout."""
    if "pack" not in batch:
        return 0, 0
    return repeats * batch["pack"].shape[0], batch["pack_window"].shape[0]


def _groups(batch: Batch, repeats: int = 1):
    """(first rows, group of each row) of a batch whose per-row prompts come in groups of equal
    rows (`prompt_rows` [n], `prompt_index` [b]; see `spot.serve`), for rows repeated `repeats`
    times each; None without them."""
    if "prompt_index" not in batch:
        return None
    return batch["prompt_rows"] * repeats, jnp.repeat(batch["prompt_index"], repeats)


def _answer_log_probs(config, params, hidden, answers):
    """Log-probs of `answers` [n, k] given hidden states [n, k, d] that predict them ([n, 1, d]:
    one state predicts all k)."""
    logits = LlamaModel(config).apply({"params": params}, hidden, method=LlamaModel.logits)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, answers[..., None], axis=-1)[..., 0]


def _with_answers(tokens, mask, answers, answer_mask):
    """Append the answer tokens [n, k] but the last after the left-padded context [n, t]: columns
    t - 1 .. t + k - 2 (the last k) then predict the k answer tokens; the last answer token
    predicts nothing that is read, so it is not run."""
    return (jnp.concatenate([tokens, answers[:, :-1]], 1),
            jnp.concatenate([mask, answer_mask[:, :-1]], 1))


def _gold_inputs(batch: Batch):
    """(context + gold answer tokens [n, t], their mask, gold answer [n, k], its mask [n, k]);
    hidden states of the last k columns predict the gold answer."""
    rows = jnp.arange(batch["tokens"].shape[0])
    gold = batch["choices"][rows, batch["labels"]]
    gold_mask = batch["choice_mask"][rows, batch["labels"]]
    return (*_with_answers(batch["tokens"], batch["mask"], gold, gold_mask), gold, gold_mask)


def _gold_loss(config, params, hidden, gold, gold_mask) -> jax.Array:
    """Mean cross-entropy over the gold answer's tokens, from the hidden states predicting them."""
    log_probs = _answer_log_probs(config, params, hidden, gold)
    weights = gold_mask.astype(jnp.float32)
    return -jnp.sum(log_probs * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_loss_fn(config: LlamaConfig, bos_id: int | None, _opts: _FastOptions | None = FAST):
    """`_opts=None` selects the plain Flax path (reference and benchmarks)."""

    def loss_fn(params: Params, prompt: jax.Array, batch: Batch, rng: jax.Array | None = None):
        """Mean cross-entropy over the gold answer's tokens."""
        tokens, mask, gold, gold_mask = _gold_inputs(batch)
        k, t = gold.shape[1], tokens.shape[1]
        hidden = _hidden(config, params, prompt, tokens, mask, bos_id, rng, (t - k, t), _opts,
                         _packing(batch))
        return _gold_loss(config, params, hidden, gold, gold_mask)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Layer-streamed prompt gradient (training, one device). `make_loss_fn`'s loss and its gradient
# w.r.t. the prompt as a Python loop of per-layer jitted calls: the forward pass layer by layer,
# each call returning what its backward pass needs, then the backward pass layer by layer.
# Against the one-program step (a `lax.scan` over the stacked weights) no weight is sliced out of
# a stacked array and no activation is stacked into a [layers, ...] buffer (16-17% of the step
# in benchmarks/_trace.py), and what compiles per batch shape is one layer, not the whole model.
# Weights are read in place: a layer's saved activations never include its inputs (weights,
# hidden states, masks); the backward call takes those from the caller.
# ---------------------------------------------------------------------------------------------


def split_layers(params: Params) -> list:
    """The stacked layer weights [layers, ...] as one tree per layer (a copy, made once)."""
    stacked = jax.tree_util.tree_map(np.asarray, params["layers"])
    count = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return [jax.tree_util.tree_map(lambda a, i=i: jnp.asarray(a[i]), stacked) for i in range(count)]


def _signature(*args) -> tuple:
    """Tree structure, shapes and dtypes of `args`: what a jitted call is traced for."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((a.shape, jnp.dtype(a.dtype)) for a in leaves)


class _LayerCalls:
    """The jitted calls of the layer-streamed gradient for one (config, BOS, options)."""

    def __init__(self, config: LlamaConfig, bos_id: int | None, opts: _FastOptions):
        self.config, self.bos_id, self.opts = config, bos_id, opts
        # per traced layer signature: (the backward closure's tree, where each of its leaves is
        # among the layer's inputs (index) or among the saved activations (-1))
        self.layouts: dict[tuple, tuple] = {}
        self.start = jax.jit(self._start)
        self.forward = jax.jit(self._forward)
        self.backward = jax.jit(self._backward, static_argnums=0)
        self.finish = jax.jit(self._finish)
        self.pull = jax.jit(lambda pullback, g: pullback(g)[0])

    def _start(self, params, prompt, batch):
        """-> (first layer's input, `_Stream`, the input stage's backward closure)."""
        tokens, mask, gold, _ = _gold_inputs(batch)
        k, t = gold.shape[1], tokens.shape[1]
        slots, window = _packing(batch) if self.opts.pack else (0, 0)

        def inputs(prompt):
            carry, stream, _ = _fast_inputs(self.config, params, prompt, tokens, mask,
                                            self.bos_id, (t - k, t), self.opts, slots,
                                            window=window if self.opts.band else 0)
            return carry, stream

        carry, pullback, stream = jax.vjp(inputs, prompt, has_aux=True)
        return carry, stream, pullback

    def _forward(self, w, carry, stream):
        """One layer -> (its output, the activations its backward pass needs but the inputs)."""
        out, pullback = jax.vjp(lambda c: _layer_step(self.config, self.opts.fuse, w, c, stream),
                                carry)
        leaves, tree = jax.tree_util.tree_flatten(pullback)
        inputs = jax.tree_util.tree_leaves((w, carry, stream))
        where = tuple(next((j for j, a in enumerate(inputs) if a is leaf), -1) for leaf in leaves)
        self.layouts[_signature(w, carry, stream)] = (tree, where)
        return out, [leaf for leaf, j in zip(leaves, where, strict=True) if j < 0]

    @staticmethod
    def _backward(layout, w, carry, stream, saved, grad):
        """Gradient w.r.t. a layer's input from the gradient w.r.t. its output."""
        tree, where = layout
        inputs, saved = jax.tree_util.tree_leaves((w, carry, stream)), iter(saved)
        leaves = [inputs[j] if j >= 0 else next(saved) for j in where]
        return jax.tree_util.tree_unflatten(tree, leaves)(grad)[0]

    def _finish(self, params, carry, stream, batch):
        """(loss, its gradient w.r.t. the last layer's output)."""
        _, _, gold, gold_mask = _gold_inputs(batch)

        def loss(carry):
            hidden = _fast_outputs(self.config, params, carry[1], stream)
            return _gold_loss(self.config, params, hidden, gold, gold_mask)

        return jax.value_and_grad(loss)(carry)


@functools.lru_cache(maxsize=8)
def _layer_calls(config: LlamaConfig, bos_id: int | None, opts: _FastOptions) -> _LayerCalls:
    return _LayerCalls(config, bos_id, opts)


def make_prompt_grad(config: LlamaConfig, bos_id: int | None, params: Params,
                     opts: _FastOptions = FAST):
    """prompt_grad(prompt [L, d], batch) -> (loss, d loss / d prompt): `make_loss_fn`'s loss
    (deterministic) and its prompt gradient, computed layer by layer (see above). Keeps a
    per-layer copy of the weights of `params`. `prompt_grad_factory` says when it applies."""
    layers, calls = split_layers(params), _layer_calls(config, bos_id, opts)

    def prompt_grad(prompt: jax.Array, batch: Batch):
        carry, stream, start_pullback = calls.start(params, prompt, batch)
        saved = []
        for w in layers:
            out, activations = calls.forward(w, carry, stream)
            saved.append((w, carry, activations))
            carry = out
        layout = calls.layouts[_signature(layers[0], saved[0][1], stream)]
        loss, grad = calls.finish(params, carry, stream, batch)
        for w, layer_input, activations in reversed(saved):
            grad = calls.backward(layout, w, layer_input, stream, activations, grad)
        return loss, calls.pull(start_pullback, grad)

    return prompt_grad


def prompt_grad_factory(config: LlamaConfig, bos_id: int | None,
                        opts: _FastOptions | None = FAST):
    """`Backbone.prompt_grad_fn` for these options: params -> `make_prompt_grad`'s function, or
    None where the layer-by-layer gradient does not apply: the plain path (`opts` None), dropout
    (the fast path is deterministic), and the scan-only options `unroll` and `prune_last`."""
    unrolled = opts is not None and (opts.unroll is True or opts.unroll != 1)  # True == 1
    if opts is None or config.dropout_rate > 0 or unrolled or opts.prune_last:
        return None
    return functools.partial(make_prompt_grad, config, bos_id, opts=opts)


def make_score_fn(config: LlamaConfig, bos_id: int | None, _opts: _FastOptions | None = FAST):
    """`_opts=None` selects the plain Flax path (reference and benchmarks)."""

    def score_fn(params: Params, prompt: jax.Array | dict, batch: Batch) -> jax.Array:
        """[batch, n_choices] summed log-likelihood of each choice. `prompt` may also be prefix
        states from `make_prefix_fn` (one prompt's, or n stacked with `batch["prompt_index"]`)."""
        choices, choice_mask = batch["choices"], batch["choice_mask"]
        n, c, k = choices.shape
        states = prompt if isinstance(prompt, dict) else None
        if states is not None:
            prompt = jnp.zeros((0, config.d_model), jnp.float32)  # the states hold it
        if k == 1:  # one token per answer: one pass over the context, read the last position
            t = batch["tokens"].shape[1]
            hidden = _hidden(config, params, prompt, batch["tokens"], batch["mask"], bos_id, None,
                             (t - 1, t), _opts, _packing(batch), *_prefixes(states, batch))
            # hidden [n, 1, d] predicts each choice's token: vocabulary logits once per row
            log_probs = _answer_log_probs(config, params, hidden, choices[..., 0])
            return log_probs * choice_mask[..., 0]
        # multi-token answers: each (row, choice) is its own sequence
        tokens = jnp.repeat(batch["tokens"], c, axis=0)
        mask = jnp.repeat(batch["mask"], c, axis=0)
        if prompt.ndim == 3:
            prompt = jnp.repeat(prompt, c, axis=0)
        answers, answer_mask = choices.reshape(n * c, k), choice_mask.reshape(n * c, k)
        tokens, mask = _with_answers(tokens, mask, answers, answer_mask)
        t = tokens.shape[1]
        hidden = _hidden(config, params, prompt, tokens, mask, bos_id, None, (t - k, t), _opts,
                         _packing(batch, c), *_prefixes(states, batch, c))  # each row c times
        log_probs = _answer_log_probs(config, params, hidden, answers)
        return jnp.sum(log_probs * answer_mask, axis=-1).reshape(n, c)

    return score_fn


def make_logits_fn(config: LlamaConfig, bos_id: int | None, _opts: _FastOptions | None = FAST):
    """Full next-token logits at every token column (generation and parity tests only)."""

    def logits_fn(params: Params, prompt: jax.Array, tokens: jax.Array, mask: jax.Array):
        hidden = _hidden(config, params, prompt, tokens, mask, bos_id, None, None, _opts)
        return LlamaModel(config).apply({"params": params}, hidden, method=LlamaModel.logits)

    return logits_fn


def to_config(raw: dict[str, Any]) -> LlamaConfig:
    """Hugging Face `config.json` (model_type llama) -> LlamaConfig."""
    heads = raw["num_attention_heads"]
    return LlamaConfig(
        vocab_size=raw["vocab_size"],
        d_model=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        d_ff=raw["intermediate_size"],
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_eps=float(raw.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def greedy_generate(backbone, text: str, max_new_tokens: int = 8, prompt: jax.Array | None = None) -> str:
    """Greedy continuation of `text` (no KV cache: a check of the model, not a serving path)."""
    logits_fn = jax.jit(make_logits_fn(backbone.config, backbone.bos_id))
    soft = prompt if prompt is not None else jnp.zeros((0, backbone.d_model))
    ids = list(backbone.tokenizer.encode(text, add_special_tokens=False).ids)
    start = len(ids)
    for _ in range(max_new_tokens):
        tokens = jnp.asarray([ids], jnp.int32)
        next_id = int(jnp.argmax(logits_fn(backbone.params, soft, tokens, jnp.ones_like(tokens))[0, -1]))
        if next_id == backbone.eos_id:
            break
        ids.append(next_id)
    return backbone.tokenizer.decode(ids[start:])
