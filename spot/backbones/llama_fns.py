"""The Llama backbone's functions: gold-answer loss, rank-classification scores, next-token logits.

Rank classification scores each answer's tokens as a continuation of the context; logits are
computed only at the answer positions. Each function runs the fast path (`llama_fast`) unless
its options are None (the plain Flax path of `llama`: the reference, and benchmarks) or dropout
is active.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from spot.backbones.base import Batch, Params
from spot.backbones.llama import LlamaConfig, LlamaModel, reference_hidden
from spot.backbones.llama_fast import FAST, FastOptions, Layout, fast_hidden, prefix_states


def hidden(config: LlamaConfig, params: Params, prompt: jax.Array, tokens: jax.Array,
           mask: jax.Array, bos_id: int | None, layout: Layout, opts: FastOptions | None,
           rng: jax.Array | None = None) -> jax.Array:
    """Hidden states of the token columns `layout.cols` (B, hi - lo, C): the fast path unless
    `opts` is None or dropout is active."""
    if opts is None or (rng is not None and config.dropout_rate > 0):
        if layout.cached is not None:
            raise ValueError("cached prefix states need the fast path (no dropout)")
        states = reference_hidden(config, params, prompt, tokens, mask, bos_id, rng)
        return states if layout.cols is None else states[:, layout.cols[0] : layout.cols[1]]
    return fast_hidden(config, params, prompt, tokens, mask, bos_id, layout, opts)


def packing(batch: Batch, repeats: int = 1) -> tuple[int, int]:
    """(stream size, attention window) of a packed batch whose rows run `repeats` times each;
    (0, 0): run the padded layout."""
    if "pack" not in batch:
        return 0, 0
    return repeats * batch["pack"].shape[0], batch["pack_window"].shape[0]


def layout_of(batch: Batch, cols: tuple[int, int], repeats: int = 1,
              states: dict[str, jax.Array] | None = None) -> Layout:
    """The layout of a scored batch whose rows run `repeats` times each: its packing, and its
    prompt groups (`prompt_rows` [n], `prompt_index` [B]; see `spot.predict`) or, with prefix
    `states` (one prompt's [layers, p, kv, hd] or n prompts' [n, layers, ...] with
    `prompt_index` naming each row's), each row's cached prefix."""
    slots, window = packing(batch, repeats)
    if states is not None:
        keys, values = states["keys"], states["values"]
        if keys.ndim == 4:
            keys, values = keys[None], values[None]
        index = batch.get("prompt_index", jnp.zeros(batch["tokens"].shape[0], jnp.int32))
        cached = (jnp.moveaxis(keys, 0, 1), jnp.moveaxis(values, 0, 1), jnp.repeat(index, repeats))
        return Layout(cols, slots, window, cached=cached)
    if "prompt_index" not in batch:
        return Layout(cols, slots, window)
    groups = (batch["prompt_rows"] * repeats, jnp.repeat(batch["prompt_index"], repeats))
    return Layout(cols, slots, window, groups=groups)


def answer_log_probs(config: LlamaConfig, params: Params, states: jax.Array,
                     answers: jax.Array) -> jax.Array:
    """Log-probs of `answers` [n, k] given hidden states [n, k, C] that predict them ([n, 1, C]:
    one state predicts all k)."""
    logits = LlamaModel(config).apply({"params": params}, states, method=LlamaModel.logits)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, answers[..., None], axis=-1)[..., 0]


def _with_answers(tokens, mask, answers, answer_mask):
    """Append the answer tokens [n, k] but the last after the left-padded context [n, t]: columns
    t - 1 .. t + k - 2 (the last k) then predict the k answer tokens; the last answer token
    predicts nothing that is read, so it is not run."""
    return (jnp.concatenate([tokens, answers[:, :-1]], 1),
            jnp.concatenate([mask, answer_mask[:, :-1]], 1))


def gold_inputs(batch: Batch):
    """(context + gold answer tokens [n, t], their mask, gold answer [n, k], its mask [n, k]);
    hidden states of the last k columns predict the gold answer."""
    rows = jnp.arange(batch["tokens"].shape[0])
    gold = batch["choices"][rows, batch["labels"]]
    gold_mask = batch["choice_mask"][rows, batch["labels"]]
    return (*_with_answers(batch["tokens"], batch["mask"], gold, gold_mask), gold, gold_mask)


def gold_loss(config: LlamaConfig, params: Params, states: jax.Array, gold: jax.Array,
              gold_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the gold answer's tokens, from the hidden states predicting them."""
    log_probs = answer_log_probs(config, params, states, gold)
    weights = gold_mask.astype(jnp.float32)
    return -jnp.sum(log_probs * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_loss_fn(config: LlamaConfig, bos_id: int | None, _opts: FastOptions | None = FAST):
    """`_opts=None` selects the plain Flax path (reference and benchmarks)."""

    def loss_fn(params: Params, prompt: jax.Array, batch: Batch, rng: jax.Array | None = None):
        """Mean cross-entropy over the gold answer's tokens."""
        tokens, mask, gold, gold_mask = gold_inputs(batch)
        k, t = gold.shape[1], tokens.shape[1]
        layout = Layout((t - k, t), *packing(batch))
        states = hidden(config, params, prompt, tokens, mask, bos_id, layout, _opts, rng)
        return gold_loss(config, params, states, gold, gold_mask)

    return loss_fn


def make_score_fn(config: LlamaConfig, bos_id: int | None, _opts: FastOptions | None = FAST):
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
            layout = layout_of(batch, (t - 1, t), states=states)
            last = hidden(config, params, prompt, batch["tokens"], batch["mask"], bos_id, layout,
                          _opts)
            # last (n, 1, C) predicts each choice's token: vocabulary logits once per row
            log_probs = answer_log_probs(config, params, last, choices[..., 0])
            return log_probs * choice_mask[..., 0]
        # multi-token answers: each (row, choice) is its own sequence
        tokens = jnp.repeat(batch["tokens"], c, axis=0)
        mask = jnp.repeat(batch["mask"], c, axis=0)
        if prompt.ndim == 3:
            prompt = jnp.repeat(prompt, c, axis=0)
        answers, answer_mask = choices.reshape(n * c, k), choice_mask.reshape(n * c, k)
        tokens, mask = _with_answers(tokens, mask, answers, answer_mask)
        t = tokens.shape[1]
        layout = layout_of(batch, (t - k, t), c, states)  # each row c times
        predicting = hidden(config, params, prompt, tokens, mask, bos_id, layout, _opts)
        log_probs = answer_log_probs(config, params, predicting, answers)
        return jnp.sum(log_probs * answer_mask, axis=-1).reshape(n, c)

    return score_fn


def make_prefix_fn(config: LlamaConfig, bos_id: int | None):
    """prefix_fn(params, prompt [L, C]) -> prefix states that `score_fn` takes for `prompt`."""
    return functools.partial(prefix_states, config, bos_id=bos_id)


def make_logits_fn(config: LlamaConfig, bos_id: int | None, _opts: FastOptions | None = FAST):
    """Full next-token logits at every token column (generation and parity tests only)."""

    def logits_fn(params: Params, prompt: jax.Array, tokens: jax.Array, mask: jax.Array):
        states = hidden(config, params, prompt, tokens, mask, bos_id, Layout(), _opts)
        return LlamaModel(config).apply({"params": params}, states, method=LlamaModel.logits)

    return logits_fn


def greedy_generate(backbone, text: str, max_new_tokens: int = 8,
                    prompt: jax.Array | None = None) -> str:
    """Greedy continuation of `text` (no KV cache: a check of the model, not a serving path)."""
    logits_fn = jax.jit(make_logits_fn(backbone.config, backbone.bos_id))
    soft = prompt if prompt is not None else jnp.zeros((0, backbone.d_model))
    ids = list(backbone.tokenizer.encode(text, add_special_tokens=False).ids)
    start = len(ids)
    for _ in range(max_new_tokens):
        tokens = jnp.asarray([ids], jnp.int32)
        logits = logits_fn(backbone.params, soft, tokens, jnp.ones_like(tokens))
        next_id = int(jnp.argmax(logits[0, -1]))
        if next_id == backbone.eos_id:
            break
        ids.append(next_id)
    return backbone.tokenizer.decode(ids[start:])
