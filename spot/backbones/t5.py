"""The T5 family (T5 1.0, T5 1.1, LM-adapted T5) as Flax linen modules behind `Backbone`.

Structure follows T5X `examples/t5/network.py`: RMS layer norm, relative position buckets
(bidirectional in the encoder, causal in the decoder) computed once per stack and shared by its
layers, no biases. T5 1.0 uses a relu FFN and ties the LM head to the token embedding (with the
`d_model**-0.5` rescale); T5 1.1 / LM-adapted use a gated-gelu ("gelu_new") FFN and an untied
`lm_head`.

The soft prompt is prepended to the ENCODER input only. Relative distances come from position ids
`cumsum(mask) - 1`, so left padding between the prompt and the context changes nothing.
Each candidate answer is teacher-forced through the decoder:
decoder input = [decoder_start_id] + choice[:-1], targets = choice (the batch builder appends EOS).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spot.backbones.base import BackboneError, position_ids

EMBED_PATH = ("shared", "embedding")
_NEG_INF = -1e9  # additive attention mask; exp() underflows to exactly 0 like HF's finfo.min
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 model; field names mirror Hugging Face `T5Config`."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None -> num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5 1.0) | "gated-gelu" (T5 1.1, LM-adapted)
    tie_word_embeddings: bool = True  # LM head = shared embedding (T5 1.0)
    # Multiply the decoder output by d_model**-0.5 before the head (T5 1.0); None -> as tied.
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        parts = self.feed_forward_proj.split("-")
        if (
            len(parts) > 2
            or (len(parts) == 2 and parts[0] != "gated")
            or self.activation not in _ACTIVATIONS
        ):
            raise BackboneError(f"unsupported feed_forward_proj {self.feed_forward_proj!r}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if int(getattr(self, name)) <= 0:
                raise BackboneError(
                    f"T5 config field {name} must be positive, got {getattr(self, name)}"
                )

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """HF `dense_act_fn`: "gated-gelu" means the tanh approximation ("gelu_new")."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]


def t5_config_from_hf(hf: dict[str, Any]) -> T5Config:
    """A parsed HF `config.json` -> T5Config (HF defaults for missing fields)."""
    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        raise BackboneError(
            f"config.json model_type {model_type!r} is not a T5 model ('t5' or 'mt5')"
        )
    tie = bool(hf.get("tie_word_embeddings", True))
    # transformers 5.x always writes tie_word_embeddings=True and records the rescale separately.
    scale = bool(hf.get("scale_decoder_outputs", tie))
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    pad = hf.get("pad_token_id", 0)
    pad = 0 if pad is None else int(pad)
    start = hf.get("decoder_start_token_id", pad)
    decoder_layers = hf.get("num_decoder_layers")
    try:
        return T5Config(
            vocab_size=int(hf.get("vocab_size", 32128)),
            d_model=int(hf.get("d_model", 512)),
            d_kv=int(hf.get("d_kv", 64)),
            d_ff=int(hf.get("d_ff", 2048)),
            num_layers=int(hf.get("num_layers", 6)),
            num_decoder_layers=None if decoder_layers is None else int(decoder_layers),
            num_heads=int(hf.get("num_heads", 8)),
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            dropout_rate=float(hf.get("dropout_rate", 0.1)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
            feed_forward_proj=str(hf.get("feed_forward_proj", "relu")),
            tie_word_embeddings=tie,
            scale_decoder_outputs=scale,
            pad_token_id=pad,
            eos_token_id=1 if eos is None else int(eos),
            decoder_start_token_id=pad if start is None else int(start),
        )
    except (TypeError, ValueError) as error:
        if isinstance(error, BackboneError):
            raise
        raise BackboneError(f"invalid T5 config.json: {error}") from error


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """Mesh TensorFlow / HF bucketing of `memory_position - query_position` -> [0, num_buckets)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Same float32 op order as HF; max(.,1) only avoids log(0) in the branch `is_small` discards.
    scaled = (
        jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    )
    if_large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return (buckets + jnp.where(is_small, distance, if_large)).astype(jnp.int32)


class LayerNorm(nn.Module):
    """T5 RMS norm: no mean subtraction, no bias."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # [..., d_model] -> [..., d_model]
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return scale * (x * jax.lax.rsqrt(variance + self.epsilon))


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3 finaliser: a bijective avalanche mix of uint32 values."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


class Dropout(nn.Module):
    """Inverted dropout whose mask is a counter-based hash of (seed, site, element index).

    One `jax.random` draw per forward pass makes the `dropout_seed` (uint32[2]); each site mixes
    in a constant from its module path. Compared with a threefry key per site (flax `nn.Dropout`),
    this compiles an order of magnitude faster on CPU and needs no rng collection.
    `dropout_seed=None` means deterministic.
    """

    rate: float

    def __call__(self, x: jax.Array, dropout_seed: jax.Array | None) -> jax.Array:
        # [...] -> [...]
        if dropout_seed is None or self.rate == 0.0:
            return x
        site = jnp.uint32(zlib.crc32("/".join(self.path).encode()))
        index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
        bits = _fmix32(
            _fmix32(index * jnp.uint32(0x9E3779B9) + (site ^ dropout_seed[0])) ^ dropout_seed[1]
        )
        keep = bits >= jnp.uint32(min(int(self.rate * 2**32), 2**32 - 1))
        return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class RelativePositionBiases(nn.Module):
    """Per-head scalar bias for each (query, key) pair from bucketed relative positions."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    init_std: float = 1.0

    @nn.compact
    def __call__(self, query_pos: jax.Array, key_pos: jax.Array) -> jax.Array:
        # [batch, q_len], [batch, k_len] -> [batch, num_heads, q_len, k_len]
        table = self.param(
            "embedding",
            nn.initializers.normal(self.init_std),
            (self.num_buckets, self.num_heads),
            jnp.float32,
        )
        relative = key_pos[:, None, :] - query_pos[:, :, None]  # [batch, q_len, k_len]
        bucket = relative_position_bucket(
            relative, self.bidirectional, self.num_buckets, self.max_distance
        )
        values = table[bucket]  # [batch, q_len, k_len, num_heads]
        return jnp.transpose(values, (0, 3, 1, 2))


def _dense(features: int, name: str, std: float) -> nn.Dense:
    """Bias-free projection; `std` follows HF `T5PreTrainedModel._init_weights`."""
    return nn.Dense(features, use_bias=False, kernel_init=nn.initializers.normal(std), name=name)


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention without the 1/sqrt(d_kv) scale (folded into the weights)."""

    num_heads: int
    d_kv: int
    dropout_rate: float

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        bias: jax.Array,
        dropout_seed: jax.Array | None,
    ) -> jax.Array:
        # [batch, q_len, d_model], [batch, k_len, d_model], bias [batch|1, heads, q_len, k_len]
        # -> [batch, q_len, d_model]
        d_model = inputs_q.shape[-1]
        inner = self.num_heads * self.d_kv

        def heads(x: jax.Array) -> jax.Array:  # [batch, len, inner] -> [batch, len, heads, d_kv]
            return x.reshape(*x.shape[:-1], self.num_heads, self.d_kv)

        query = heads(_dense(inner, "query", (d_model * self.d_kv) ** -0.5)(inputs_q))
        key = heads(_dense(inner, "key", d_model**-0.5)(inputs_kv))
        value = heads(_dense(inner, "value", d_model**-0.5)(inputs_kv))
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) + bias
        weights = jax.nn.softmax(logits, axis=-1)
        weights = Dropout(self.dropout_rate)(weights, dropout_seed)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(*inputs_q.shape[:-1], inner)
        return _dense(d_model, "out", inner**-0.5)(out)


class MlpBlock(nn.Module):
    """T5 feed-forward: act(x W_i) W_o, or act(x W_i0) * (x W_i1) W_o when gated."""

    d_ff: int
    activation: str
    gated: bool
    dropout_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, dropout_seed: jax.Array | None) -> jax.Array:
        # [batch, length, d_model] -> [batch, length, d_model]
        act = _ACTIVATIONS[self.activation]
        std = x.shape[-1] ** -0.5
        if self.gated:
            hidden = act(_dense(self.d_ff, "wi_0", std)(x)) * _dense(self.d_ff, "wi_1", std)(x)
        else:
            hidden = act(_dense(self.d_ff, "wi", std)(x))
        hidden = Dropout(self.dropout_rate)(hidden, dropout_seed)
        return _dense(x.shape[-1], "wo", self.d_ff**-0.5)(hidden)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + FFN, each with a residual."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, dropout_seed: jax.Array | None) -> jax.Array:
        # [batch, length, d_model] -> [batch, length, d_model]
        cfg = self.config
        h = LayerNorm(cfg.layer_norm_epsilon, name="pre_self_attention_norm")(x)
        h = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, name="self_attention")(
            h, h, bias, dropout_seed
        )
        x = x + Dropout(cfg.dropout_rate)(h, dropout_seed)
        h = LayerNorm(cfg.layer_norm_epsilon, name="pre_mlp_norm")(x)
        h = MlpBlock(cfg.d_ff, cfg.activation, cfg.is_gated, cfg.dropout_rate, name="mlp")(
            h, dropout_seed
        )
        return x + Dropout(cfg.dropout_rate)(h, dropout_seed)


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention + cross-attention + FFN, each with a residual."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array,
        self_bias: jax.Array,
        cross_bias: jax.Array,
        dropout_seed: jax.Array | None,
    ) -> jax.Array:
        # [batch, k, d_model], encoded [batch, src_len, d_model] -> [batch, k, d_model]
        cfg = self.config
        h = LayerNorm(cfg.layer_norm_epsilon, name="pre_self_attention_norm")(x)
        h = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, name="self_attention")(
            h, h, self_bias, dropout_seed
        )
        x = x + Dropout(cfg.dropout_rate)(h, dropout_seed)
        h = LayerNorm(cfg.layer_norm_epsilon, name="pre_cross_attention_norm")(x)
        h = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, name="cross_attention")(
            h, encoded, cross_bias, dropout_seed
        )
        x = x + Dropout(cfg.dropout_rate)(h, dropout_seed)
        h = LayerNorm(cfg.layer_norm_epsilon, name="pre_mlp_norm")(x)
        h = MlpBlock(cfg.d_ff, cfg.activation, cfg.is_gated, cfg.dropout_rate, name="mlp")(
            h, dropout_seed
        )
        return x + Dropout(cfg.dropout_rate)(h, dropout_seed)


def _mask_bias(key_mask: jax.Array) -> jax.Array:
    """[batch, k_len] 0/1 -> [batch, 1, 1, k_len] additive bias."""
    return jnp.where(key_mask[:, None, None, :] > 0, 0.0, _NEG_INF).astype(jnp.float32)


class Encoder(nn.Module):
    """Bidirectional stack over already-embedded inputs (soft prompt included)."""

    config: T5Config

    @nn.compact
    def __call__(
        self, embedded: jax.Array, mask: jax.Array, dropout_seed: jax.Array | None
    ) -> jax.Array:
        # [batch, src_len, d_model], mask [batch, src_len] -> [batch, src_len, d_model]
        cfg = self.config
        pos = position_ids(mask)  # [batch, src_len]
        bias = RelativePositionBiases(
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
            cfg.num_heads,
            bidirectional=True,
            init_std=cfg.d_model**-0.5,
            name="relpos_bias",
        )(pos, pos)
        bias = bias + _mask_bias(mask)  # [batch, heads, src_len, src_len]
        x = Dropout(cfg.dropout_rate)(embedded, dropout_seed)
        for i in range(cfg.num_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias, dropout_seed)
        x = LayerNorm(cfg.layer_norm_epsilon, name="final_norm")(x)
        return Dropout(cfg.dropout_rate)(x, dropout_seed)


class Decoder(nn.Module):
    """Causal stack with cross-attention to the encoder output; returns final hidden states."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        embedded: jax.Array,
        encoded: jax.Array,
        encoder_mask: jax.Array,
        dropout_seed: jax.Array | None,
    ) -> jax.Array:
        # [batch, k, d_model], [batch, src_len, d_model], [batch, src_len] -> [batch, k, d_model]
        cfg = self.config
        length = embedded.shape[1]
        pos = jnp.arange(length, dtype=jnp.int32)[None]  # [1, k]: choices are right-padded
        self_bias = RelativePositionBiases(
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
            cfg.num_heads,
            bidirectional=False,
            init_std=cfg.d_model**-0.5,
            name="relpos_bias",
        )(pos, pos)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        self_bias = self_bias + jnp.where(causal, 0.0, _NEG_INF)[None, None]  # [1, heads, k, k]
        cross_bias = _mask_bias(encoder_mask)  # [batch, 1, 1, src_len]
        x = Dropout(cfg.dropout_rate)(embedded, dropout_seed)
        for i in range(cfg.num_decoder_layers):
            x = DecoderLayer(cfg, name=f"layers_{i}")(
                x, encoded, self_bias, cross_bias, dropout_seed
            )
        x = LayerNorm(cfg.layer_norm_epsilon, name="final_norm")(x)
        return Dropout(cfg.dropout_rate)(x, dropout_seed)


class T5Transformer(nn.Module):
    """Shared embedding + encoder + decoder + LM head."""

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        self.shared = nn.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(1.0), name="shared"
        )
        self.encoder = Encoder(cfg, name="encoder")
        self.decoder = Decoder(cfg, name="decoder")
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, "lm_head", 1.0)

    def encode(
        self,
        prompt: jax.Array,
        tokens: jax.Array,
        mask: jax.Array,
        dropout_seed: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """prompt [batch, L, d], tokens/mask [batch, T] -> ([batch, L+T, d_model], [batch, L+T])."""
        embedded = jnp.concatenate([prompt.astype(jnp.float32), self.shared(tokens)], axis=1)
        full_mask = jnp.concatenate([jnp.ones(prompt.shape[:2], mask.dtype), mask], axis=1)
        return self.encoder(embedded, full_mask, dropout_seed), full_mask

    def decode(
        self,
        encoded: jax.Array,
        encoder_mask: jax.Array,
        decoder_input_ids: jax.Array,
        dropout_seed: jax.Array | None = None,
    ) -> jax.Array:
        """[batch, src_len, d], [batch, src_len], [batch, k] -> logits [batch, k, vocab]."""
        hidden = self.decoder(self.shared(decoder_input_ids), encoded, encoder_mask, dropout_seed)
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model**-0.5
        if self.config.tie_word_embeddings:
            return self.shared.attend(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        prompt: jax.Array,
        tokens: jax.Array,
        mask: jax.Array,
        decoder_input_ids: jax.Array,
        dropout_seed: jax.Array | None = None,
    ) -> jax.Array:
        # -> [batch, k, vocab]
        encoded, full_mask = self.encode(prompt, tokens, mask, dropout_seed)
        return self.decode(encoded, full_mask, decoder_input_ids, dropout_seed)
