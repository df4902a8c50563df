"""The T5 backbone's pure functions: full decoder logits, rank-classification scores, and the
gold-answer loss (see `spot.backbones.t5` for the model)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from spot.backbones.base import Batch, Params, broadcast_prompt
from spot.backbones.t5 import T5Config, T5Transformer


def shift_right(targets: jax.Array, start_id: int) -> jax.Array:
    """[..., k] -> [..., k]: [start] + targets[:-1]."""
    start = jnp.full((*targets.shape[:-1], 1), start_id, dtype=targets.dtype)
    return jnp.concatenate([start, targets[..., :-1]], axis=-1)


def seed_from_rng(rng: jax.Array | None) -> jax.Array | None:
    """A jax PRNG key (raw or typed) -> uint32[2] seed for `Dropout`; None stays None."""
    return None if rng is None else jax.random.bits(rng, (2,), jnp.uint32)


@functools.cache
def _logits_fn(config: T5Config) -> Callable[..., jax.Array]:
    model = T5Transformer(config)

    def logits(params, prompt, tokens, mask, decoder_input_ids, rng):
        prompt = broadcast_prompt(jnp.asarray(prompt), tokens.shape[0])
        return model.apply(
            {"params": params}, prompt, tokens, mask, decoder_input_ids, seed_from_rng(rng)
        )

    return jax.jit(logits)


def t5_logits(
    config: T5Config,
    params: Params,
    prompt: jax.Array,
    tokens: jax.Array,
    mask: jax.Array,
    decoder_input_ids: jax.Array,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Full decoder logits: prompt [L,d]|[B,L,d], tokens/mask [B,T], decoder ids [B,K] -> [B,K,V]."""
    return _logits_fn(config)(params, prompt, tokens, mask, decoder_input_ids, rng)


def _token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[..., k, vocab], [..., k] -> [..., k] log p(target)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


@functools.cache  # one compiled function per config, shared by every Backbone that uses it
def make_score_fn(config: T5Config) -> Callable[[Params, jax.Array, Batch], jax.Array]:
    """score_fn(params, prompt, batch) -> [batch, n_choices] summed log-probs of each choice."""
    model = T5Transformer(config)

    def score_fn(params: Params, prompt: jax.Array, batch: Batch) -> jax.Array:
        tokens, mask, choices = batch["tokens"], batch["mask"], batch["choices"]
        batch_size, n_choices, k = choices.shape
        prompt = broadcast_prompt(jnp.asarray(prompt), batch_size)
        variables = {"params": params}
        # Encode once: [B, S, d], [B, S]; then repeat over choices: [B*C, S, d].
        encoded, enc_mask = model.apply(
            variables, prompt, tokens, mask, method=T5Transformer.encode
        )
        encoded = jnp.repeat(encoded, n_choices, axis=0)
        enc_mask = jnp.repeat(enc_mask, n_choices, axis=0)
        targets = choices.reshape(batch_size * n_choices, k)  # [B*C, K]
        decoder_in = shift_right(targets, config.decoder_start_token_id)
        logits = model.apply(variables, encoded, enc_mask, decoder_in, method=T5Transformer.decode)
        token_lp = _token_log_probs(logits, targets)  # [B*C, K]
        weights = batch["choice_mask"].reshape(batch_size * n_choices, k).astype(jnp.float32)
        return jnp.sum(token_lp * weights, axis=-1).reshape(batch_size, n_choices)

    return jax.jit(score_fn)  # still pure; jitting here makes eager `Backbone.score` fast


@functools.cache
def make_loss_fn(config: T5Config) -> Callable[..., jax.Array]:
    """loss_fn(params, prompt, batch, rng) -> mean token cross-entropy of the gold choice."""

    def loss_fn(
        params: Params, prompt: jax.Array, batch: Batch, rng: jax.Array | None = None
    ) -> jax.Array:
        labels = batch["labels"]  # [B], -1 = unknown (excluded)
        index = jnp.maximum(labels, 0)[:, None, None]
        targets = jnp.take_along_axis(batch["choices"], index, axis=1)[:, 0]  # [B, K]
        weights = jnp.take_along_axis(batch["choice_mask"], index, axis=1)[:, 0].astype(jnp.float32)
        weights = weights * (labels >= 0)[:, None]
        decoder_in = shift_right(targets, config.decoder_start_token_id)
        logits = t5_logits(config, params, prompt, batch["tokens"], batch["mask"], decoder_in, rng)
        token_lp = _token_log_probs(logits, targets)  # [B, K]
        return -jnp.sum(token_lp * weights) / jnp.maximum(jnp.sum(weights), 1.0)


    return jax.jit(loss_fn)
