"""Llama-family decoder (SmolLM2, Llama 2/3 layouts) as Flax modules with soft-prompt input.

The prompt sits before the context (after BOS when the model uses one):
    [BOS?] [prompt x L] [pad ... context] [answer tokens]
This module is the model and its plain path (`reference_hidden`), the reference the other Llama
modules are tested against:
    llama_fast.py  the same model as pure functions (shared prefix, packing, cached prefixes)
    llama_grad.py  the prompt gradient computed layer by layer (the trainer's default)
    llama_fns.py   the backbone's functions: gold-answer loss, rank-classification scores, logits
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spot.backbones.base import Params, broadcast_prompt, position_ids

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


def reference_hidden(
    config: LlamaConfig,
    params: Params,
    prompt: jax.Array,
    tokens: jax.Array,
    mask: jax.Array,
    bos_id: int | None,
    rng: jax.Array | None,
) -> jax.Array:
    """Plain path: [BOS?] + prompt + tokens through the Flax modules -> hidden states of the token
    columns (B, T, C). `prompt` is [L, C] or per row [B, L, C]. The reference for the fast path;
    also serves dropout > 0."""
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
