"""Fast path: the Llama model of `llama.py` as pure functions over the same param tree.

* Shared prefix: [BOS] + a shared [L, d] prompt come first in every row, so under causal
  attention their hidden states (hence keys/values) are identical across rows. They run once,
  as a one-row prefix stream whose keys/values every row attends to: batch x L fewer
  token-columns of work, exact up to float reassociation. Per-row prompts [B, L, d] stay in
  the rows.
* The stacked weights are the layer scan's xs, so the backward pass reads them in place (indexing
  them out of a closed-over constant made autodiff save a stacked copy of every layer's weights).
* Packing: a batch with `pack` (spot.batching.make_batch(pack=True)) runs its real tokens
  only, gathered out of the padded layout into one stream [1, slots, d] with a block-diagonal
  causal mask (each token sees the shared prefix and the earlier tokens of its own row), then
  scattered back. Exact like the shared prefix; it removes the padding columns (over half of
  an SST-2 training batch). Attention is banded: the stream's queries go in blocks of
  PACK_CHUNK slots, and each block attends to the prefix and to the `window` slots before it
  plus its own (`window` >= the longest row - 1, batch["pack_window"]), not to the whole stream.
* Cached prefix states (serving): [BOS] + a prompt run once (`prefix_states`) give each
  layer's keys/values; rows (or the tokens of a packed stream, each masked to its own row's
  prefix) attend to them without running it.
Only the prompt is differentiated (the trainer takes grad w.r.t. argnums=1), so no weight
gradients exist in the step (tests/test_fast_paths.py checks the HLO).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from spot.backbones.base import PACK_CHUNK, Params, broadcast_prompt
from spot.backbones.llama import NEG_INF, LlamaConfig


@dataclasses.dataclass(frozen=True)
class FastOptions:
    share_prefix: bool = True  # run [BOS] + a shared prompt once, not once per row
    unroll: int | bool = 1  # lax.scan unroll factor over layers (True: fully unrolled)
    pack: bool = True  # run packed batches (Layout.slots) as one stream of their real tokens
    band: bool = True  # packed streams attend within their window (else over the whole stream)


FAST = FastOptions()


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a batch's rows run (`llama_fns.layout_of` reads it off a batch)."""

    cols: tuple[int, int] | None = None  # token columns lo:hi whose hidden states are read
    slots: int = 0  # > 0: the real tokens run as one packed stream of this static size
    window: int = 0  # > 0: the stream attends in bands (>= the longest row - 1; see "Packing")
    # (first row of each group [n], group of each row [B]) for per-row prompts [B, L, d] whose
    # rows within a group are equal: each distinct prompt then runs once, as its group's prefix
    groups: tuple[jax.Array, jax.Array] | None = None
    # (keys, values [layers, n, p, kv, hd], prefix of each row [B]): the states of n prefixes
    # ([BOS] + prompt) from `prefix_states`; the prompt is then unused
    cached: tuple[jax.Array, jax.Array, jax.Array] | None = None


@flax.struct.dataclass
class Stream:
    """What every layer and the output stage read besides the hidden states (`fast_inputs`)."""

    tables: Any  # rotary (cos, sin) of the prefix and of the rows
    biases: Any  # attention bias of the prefix and of the rows
    groups: jax.Array | None  # each row's prefix [B]; None: the one prefix
    index: jax.Array | None  # packed stream: each slot's flattened row position; None: padded
    window: int = flax.struct.field(pytree_node=False)  # banded attention (packed streams)
    rows: tuple[int, int] = flax.struct.field(pytree_node=False)  # (B, T) of the row layout
    cols: tuple[int, int] = flax.struct.field(pytree_node=False)  # row columns lo:hi read out


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


def _causal_bias(p: int) -> jax.Array:
    """[1, p, p] attention bias of a prefix stream."""
    return jnp.where(jnp.tril(jnp.ones((p, p), dtype=bool)), 0.0, NEG_INF)[None]


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
    """q [b, tq, kv, groups, hd], k/v [b, tk, kv, hd], bias [b, tq, tk] -> like q."""
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


def _mlp_residual(cfg: LlamaConfig, w, x: jax.Array) -> jax.Array:
    """x + MLP(RMSNorm(x)) over rows [n, d]."""
    mlp = w["mlp"]
    h = _rms(x, w["mlp_norm"]["scale"], cfg.rms_eps)
    gate, up = h @ mlp["gate"]["kernel"], h @ mlp["up"]["kernel"]
    return x + (jax.nn.silu(gate) * up) @ mlp["down"]["kernel"]


def _windows(x: jax.Array, window: int, fill: int = 0) -> jax.Array:
    """[s, ...] stream -> [s / PACK_CHUNK, window + PACK_CHUNK, ...]: block j holds slots
    j * PACK_CHUNK - window .. (j + 1) * PACK_CHUNK - 1 (`fill` before the stream's start)."""
    c = PACK_CHUNK
    blocks = jnp.concatenate([jnp.full((window, *x.shape[1:]), fill, x.dtype), x])
    blocks = blocks.reshape(-1, c, *x.shape[1:])  # [(window + s) / c, c, ...]
    n = x.shape[0] // c
    return jnp.concatenate([blocks[i : i + n] for i in range(window // c + 1)], axis=1)


def _layer(cfg: LlamaConfig, w, prefix, x, stream: Stream, cached=None):
    """One block over the prefix streams [n, p, d] (or None) and the rows [b, t, d] -> (new
    prefix or None, new rows, the rows' own (keys, values) [b, t, kv, hd]).

    Row i attends to prefix `stream.groups[i]` (None: the one prefix, n = 1). All streams share
    every matmul (their rows are concatenated). `cached` = this layer's (keys, values)
    [n, p, kv, hd] of prefixes run earlier (`prefix_states`): rows attend to them the same way
    and no prefix stream runs. `stream.window` > 0: x is one packed stream [1, t, d] whose
    queries attend in blocks (`_windows`).
    """
    b, t, d = x.shape
    nh, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = w["attn"]
    n, p = (0, 0) if prefix is None else prefix.shape[:2]
    m = n * p  # prefix rows
    rows = x.reshape(b * t, d)
    if m:
        rows = jnp.concatenate([prefix.reshape(m, d), rows])
    h = _rms(rows, w["attn_norm"]["scale"], cfg.rms_eps)
    q, k, v = (h @ attn[name]["kernel"] for name in ("q", "k", "v"))
    table_p, table_x = stream.tables
    bias_p, bias_x = stream.biases
    qx = _rope(q[m:].reshape(b, t, nh, hd), table_x)
    keys = _rope(k[m:].reshape(b, t, kvh, hd), table_x)
    values = v[m:].reshape(b, t, kvh, hd)
    row_kv = (keys, values)
    if m:
        kp = _rope(k[:m].reshape(n, p, kvh, hd), table_p)
        vp = v[:m].reshape(n, p, kvh, hd)
    elif cached is not None:
        kp, vp = cached
        p = kp.shape[1]
    if stream.window:  # the stream's query blocks, each with its window of keys/values
        qx = qx.reshape(t // PACK_CHUNK, PACK_CHUNK, nh, hd)
        keys, values = _windows(keys[0], stream.window), _windows(values[0], stream.window)
    if p:
        if stream.groups is None:  # [n = 1, p, ...] -> every row (or query block)
            row_kp, row_vp = (jnp.broadcast_to(a, (qx.shape[0], p, kvh, hd)) for a in (kp, vp))
        else:  # each row its own prefix
            row_kp, row_vp = kp[stream.groups], vp[stream.groups]
        keys = jnp.concatenate([row_kp, keys], axis=1)
        values = jnp.concatenate([row_vp, values], axis=1)
    out = _attend(cfg, qx, keys, values, bias_x)
    if m:
        qp = _rope(q[:m].reshape(n, p, nh, hd), table_p)
        out = jnp.concatenate([_attend(cfg, qp, kp, vp, bias_p), out])
    rows = _mlp_residual(cfg, w, rows + out @ attn["o"]["kernel"])
    new_prefix = rows[:m].reshape(n, p, d) if m else None
    return new_prefix, rows[m:].reshape(b, t, d), row_kv


def layer_step(cfg: LlamaConfig, w, carry, stream: Stream, kv=None):
    """One block over (prefix, rows) -> (prefix, rows)."""
    return _layer(cfg, w, *carry, stream, kv)[:2]


def fast_hidden(config: LlamaConfig, params: Params, prompt: jax.Array, tokens: jax.Array,
                mask: jax.Array, bos_id: int | None, layout: Layout,
                opts: FastOptions = FAST) -> jax.Array:
    """Same as `reference_hidden(...)[:, lo:hi]` (`layout.cols`; all columns when None),
    deterministic. Layers run in a `lax.scan` over the stacked weights."""
    carry, stream, kv = fast_inputs(config, params, prompt, tokens, mask, bos_id, layout, opts)

    def body(carry, layer):
        w, kv = layer
        return layer_step(config, w, carry, stream, kv), None

    # the stacked weights are the scan's xs (not indexed out of a closed-over constant): then the
    # backward pass reads them in place instead of saving a stacked copy of every layer's weights
    (_, x), _ = jax.lax.scan(body, carry, (params["layers"], kv), unroll=opts.unroll)
    return fast_outputs(config, params, x, stream)


def fast_outputs(cfg: LlamaConfig, params: Params, x: jax.Array, stream: Stream) -> jax.Array:
    """The last layer's rows (or packed stream) -> normed hidden states of columns lo:hi."""
    b, tx = stream.rows
    lo, hi = stream.cols
    if stream.index is not None:  # (1, slots, C) -> (B, T, C); columns without a token stay 0
        x = jnp.zeros((b * tx, cfg.d_model), x.dtype).at[stream.index].set(x[0], mode="drop")
        x = x.reshape(b, tx, cfg.d_model)
    return _rms(x[:, lo:hi], params["norm"]["scale"], cfg.rms_eps)


def fast_inputs(config: LlamaConfig, params: Params, prompt: jax.Array, tokens: jax.Array,
                mask: jax.Array, bos_id: int | None, layout: Layout,
                opts: FastOptions = FAST):
    """The first layer's input: ((prefix [n, p, d] or None, rows [b, tx, d] or a packed stream
    [1, slots, d]), `Stream`, each layer's cached (keys, values) stacked or None). Packing needs
    `opts.pack` and rows of tokens only: per-row prompts and group prefixes run padded."""
    cfg = config
    embed = params["embed"]["embedding"]
    b, t = tokens.shape
    prompt = prompt.astype(jnp.float32)
    cached = layout.cached
    shared = []
    if bos_id is not None and cached is None:
        shared.append(embed[jnp.asarray([bos_id])])
    x, x_mask = embed[tokens], mask
    group_index = None
    if cached is not None:
        group_index = cached[2]
    elif prompt.ndim == 2 and opts.share_prefix:
        shared.append(prompt)
    elif layout.groups is not None and opts.share_prefix:
        first_rows, group_index = layout.groups
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
    packable = opts.pack and tx == t and (group_index is None or cached is not None)
    slots = layout.slots if packable else 0
    window = layout.window if slots and opts.band else 0
    bias_prefix, index = None, None
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
        bias_p = _causal_bias(p)
    tables = (_rope_table(jnp.arange(p)[None], cfg.head_dim, cfg.rope_theta),
              _rope_table(pos_x, cfg.head_dim, cfg.rope_theta))
    lo, hi = (0, t) if layout.cols is None else layout.cols
    lo, hi = lo + tx - t, hi + tx - t  # token columns -> row columns (per-row prompts first)
    stream = Stream(tables, (bias_p, bias_x), group_index, index, window, (b, tx), (lo, hi))
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


def prefix_states(config: LlamaConfig, params: Params, prompt: jax.Array, bos_id: int | None):
    """The prefix [BOS] + prompt [L, d] run alone: {"keys", "values"}, each layer's rotated keys
    and values [layers, p, kv, hd] (p = L + 1 with BOS). Under causal attention they do not depend
    on what follows, so rows can attend to them later instead of running the prefix again."""
    embed = params["embed"]["embedding"]
    parts = [] if bos_id is None else [embed[jnp.asarray([bos_id])]]
    x = jnp.concatenate([*parts, prompt.astype(jnp.float32)])[None]  # (1, p, C)
    p = x.shape[1]
    table = _rope_table(jnp.arange(p)[None], config.head_dim, config.rope_theta)
    stream = Stream(tables=(None, table), biases=(None, _causal_bias(p)), groups=None, index=None,
                    window=0, rows=(1, p), cols=(0, p))

    def body(x, w):
        _, x, (keys, values) = _layer(config, w, None, x, stream)
        return x, (keys[0], values[0])

    _, (keys, values) = jax.lax.scan(body, x, params["layers"])
    return {"keys": keys, "values": values}
