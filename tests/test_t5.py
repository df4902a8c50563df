"""T5 backbone: HF parity (needs torch), prompt semantics, padding invariance, bad checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from spot.backbones.base import Backbone, BackboneError
from spot.backbones.t5 import Dropout, T5Config, T5Transformer
from spot.backbones.t5_fns import shift_right, t5_logits
from spot.backbones.t5_loader import init_t5, load_t5_dir, t5_params_to_hf

TINY = dict(
    vocab_size=100,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    # few buckets and a short max distance so short test sequences hit the log-spaced buckets
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
T5_10 = T5Config(**TINY, feed_forward_proj="relu", tie_word_embeddings=True)
T5_11 = T5Config(**TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
EOS = 1


def make_batch(
    contexts: list[list[int]],
    choices: list[list[list[int]]],
    labels: list[int],
    length: int | None = None,
    k: int | None = None,
    pad_id: int = 0,
) -> dict[str, jax.Array]:
    """The `spot.batching` format: left-padded context, right-padded choices with EOS appended."""
    length = length or max(len(c) for c in contexts)
    with_eos = [[[*choice, EOS] for choice in row] for row in choices]
    k = k or max(len(choice) for row in with_eos for choice in row)
    n_choices = len(choices[0])
    tokens = np.full((len(contexts), length), pad_id, np.int32)
    mask = np.zeros((len(contexts), length), np.int32)
    choice_ids = np.full((len(contexts), n_choices, k), pad_id, np.int32)
    choice_mask = np.zeros((len(contexts), n_choices, k), np.int32)
    for b, context in enumerate(contexts):
        if context:
            tokens[b, -len(context) :] = context
            mask[b, -len(context) :] = 1
        for c, choice in enumerate(with_eos[b]):
            choice_ids[b, c, : len(choice)] = choice
            choice_mask[b, c, : len(choice)] = 1
    return {
        "tokens": jnp.asarray(tokens),
        "mask": jnp.asarray(mask),
        "choices": jnp.asarray(choice_ids),
        "choice_mask": jnp.asarray(choice_mask),
        "labels": jnp.asarray(labels, jnp.int32),
    }


CONTEXTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
    [20, 21, 22],
    [30, 31, 32, 33, 34, 35],
]
CHOICES = [[[40, 41], [42]], [[43], [44, 45, 46]], [[47, 48, 49, 50, 51], [52]]]
LABELS = [0, 1, 0]


def write_checkpoint(directory: Path, config: T5Config, params, drop: str | None = None) -> Path:
    """Write our params as an HF-format directory (config.json + model.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps({"model_type": "t5", **dataclasses.asdict(config)})
    )
    tensors = t5_params_to_hf(params)
    if drop is not None:
        del tensors[drop]
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def backbone(request) -> Backbone:
    return init_t5(T5_10 if request.param == "1.0" else T5_11, seed=0)


@pytest.fixture(scope="module")
def t5_11() -> Backbone:
    return init_t5(T5_11, seed=1)


def prompt_for(
    backbone: Backbone, length: int, seed: int = 0, batch: int | None = None
) -> jax.Array:
    shape = (length, backbone.d_model) if batch is None else (batch, length, backbone.d_model)
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, 0.5, shape), jnp.float32)


# --------------------------------------------------------------------------------------------
# (a) parity with transformers' T5ForConditionalGeneration
# --------------------------------------------------------------------------------------------


def _hf_reference(version: str, directory: Path):
    """Build a tiny random HF T5 1.0 / 1.1, save it (safetensors) and reload it as the reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gated = version == "1.1"
    hf_config = transformers.T5Config(
        **TINY,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,  # transformers 5.x: False only turns off the rescale
        decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(hf_config)
    tied_count = sum(p.numel() for p in model.parameters())
    if gated:  # T5 1.1 has its own lm_head: untie it explicitly
        model.lm_head.weight = torch.nn.Parameter(torch.randn(TINY["vocab_size"], TINY["d_model"]))
    count = sum(p.numel() for p in model.parameters())
    assert count == tied_count + (TINY["vocab_size"] * TINY["d_model"] if gated else 0)
    model.save_pretrained(str(directory), safe_serialization=True)
    assert not (directory / "pytorch_model.bin").exists()
    reference = transformers.T5ForConditionalGeneration.from_pretrained(str(directory)).eval()
    assert sum(p.numel() for p in reference.parameters()) == count
    assert (reference.lm_head.weight is reference.shared.weight) == (not gated)
    return torch, reference


@pytest.mark.torch
@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_hf_parity(version: str, tmp_path: Path) -> None:
    torch, reference = _hf_reference(version, tmp_path)
    loaded = load_t5_dir(tmp_path)
    assert loaded.config == (T5_10 if version == "1.0" else T5_11)
    assert loaded.eos_after_choice and loaded.eos_id == EOS and loaded.pad_id == 0
    assert loaded.tokenizer is None

    # Same weights back out.
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    for name, array in t5_params_to_hf(loaded.params).items():
        np.testing.assert_array_equal(array, state[name], err_msg=name)

    # Padded batch: HF sees right padding (positions 0..n-1), we see left padding.
    rng = np.random.default_rng(0)
    lengths, width, k = [20, 9, 1], 20, 6
    hf_ids = np.zeros((3, width), np.int64)
    hf_mask = np.zeros((3, width), np.int64)
    tokens = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    for b, n in enumerate(lengths):
        row = rng.integers(2, TINY["vocab_size"], n)
        hf_ids[b, :n], hf_mask[b, :n] = row, 1
        tokens[b, width - n :], mask[b, width - n :] = row, 1
    decoder_in = rng.integers(0, TINY["vocab_size"], (3, k))
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(hf_ids),
            attention_mask=torch.tensor(hf_mask),
            decoder_input_ids=torch.tensor(decoder_in),
        ).logits.numpy()
    empty = jnp.zeros((0, loaded.d_model))
    got = np.asarray(
        t5_logits(loaded.config, loaded.params, empty, tokens, mask, jnp.asarray(decoder_in))
    )
    diff = float(np.max(np.abs(got - expected)))
    print(f"T5 {version} max abs logit diff vs HF: {diff:.3g}")
    assert diff < 1e-4

    # Each row alone, unpadded, must agree too.
    for b, n in enumerate(lengths):
        with torch.no_grad():
            alone = reference(
                input_ids=torch.tensor(hf_ids[b : b + 1, :n]),
                decoder_input_ids=torch.tensor(decoder_in[b : b + 1]),
            ).logits.numpy()
        np.testing.assert_allclose(got[b : b + 1], alone, atol=1e-4)

    # score_fn against HF rank-classification scores.
    batch = make_batch(CONTEXTS, CHOICES, LABELS)
    scores = np.asarray(loaded.score_fn(loaded.params, empty, batch))
    targets = np.asarray(batch["choices"]).reshape(6, -1)
    weights = np.asarray(batch["choice_mask"]).reshape(6, -1)
    contexts = [c for c in CONTEXTS for _ in range(2)]
    hf_enc = np.zeros((6, 14), np.int64)
    hf_enc_mask = np.zeros((6, 14), np.int64)
    for i, context in enumerate(contexts):
        hf_enc[i, : len(context)], hf_enc_mask[i, : len(context)] = context, 1
    with torch.no_grad():
        logits = reference(
            input_ids=torch.tensor(hf_enc),
            attention_mask=torch.tensor(hf_enc_mask),
            decoder_input_ids=torch.tensor(
                np.asarray(shift_right(jnp.asarray(targets), 0)), dtype=torch.long
            ),
        ).logits
        log_probs = torch.log_softmax(logits, -1).gather(
            -1, torch.tensor(targets, dtype=torch.long)[..., None]
        )
    hf_scores = (log_probs[..., 0].numpy() * weights).sum(-1).reshape(3, 2)
    np.testing.assert_allclose(scores, hf_scores, atol=1e-4)

    # A soft prompt = HF `inputs_embeds` of [prompt; embed(tokens)] (HF: right padding after the
    # context; ours: left padding between prompt and context). Same code path for both versions.
    if version == "1.0":
        return
    prompt = prompt_for(loaded, 3)
    embedded = reference.shared(torch.tensor(hf_ids)).detach().numpy()
    hf_embeds = np.concatenate([np.broadcast_to(np.asarray(prompt), (3, 3, 32)), embedded], 1)
    with torch.no_grad():
        expected = reference(
            inputs_embeds=torch.tensor(hf_embeds),
            attention_mask=torch.tensor(np.concatenate([np.ones((3, 3), np.int64), hf_mask], 1)),
            decoder_input_ids=torch.tensor(decoder_in),
        ).logits.numpy()
    got = t5_logits(loaded.config, loaded.params, prompt, tokens, mask, jnp.asarray(decoder_in))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)


@pytest.mark.torch
def test_hf_parity_legacy_untied_config(tmp_path: Path) -> None:
    """transformers 4.x writes `tie_word_embeddings: false` and no `scale_decoder_outputs` for T5 1.1."""
    pytest.importorskip("torch")
    _hf_reference("1.1", tmp_path)
    modern = load_t5_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    legacy = load_t5_dir(tmp_path)
    assert legacy.config == modern.config
    assert legacy.identity == modern.identity


# --------------------------------------------------------------------------------------------
# (b) prompt semantics, padding, jit and grad (no torch)
# --------------------------------------------------------------------------------------------


def _scores_without_prompt(backbone: Backbone, batch) -> np.ndarray:
    """Reference path that never concatenates a prompt: encoder(embed(tokens))."""
    model = T5Transformer(backbone.config)
    batch_size, n_choices, k = batch["choices"].shape
    targets = batch["choices"].reshape(-1, k)

    def run(module: T5Transformer, tokens, mask, decoder_in):
        encoded = module.encoder(module.shared(tokens), mask, None)
        encoded = jnp.repeat(encoded, n_choices, axis=0)
        return module.decode(encoded, jnp.repeat(mask, n_choices, axis=0), decoder_in)

    apply = jax.jit(lambda params, *args: model.apply({"params": params}, *args, method=run))
    logits = apply(backbone.params, batch["tokens"], batch["mask"], shift_right(targets, 0))
    log_probs = jax.nn.log_softmax(logits, -1)
    token_lp = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    return np.asarray(
        (token_lp * batch["choice_mask"].reshape(-1, k)).sum(-1).reshape(batch_size, n_choices)
    )


# Compilations are the slow part: score/loss are cached per config, so the tests below reuse a
# few shapes (the CONTEXTS batch [3, 14] x [3, 2, 6], prompts of length 0 or 4).
P = 4


def test_empty_prompt_equals_no_prompt(backbone: Backbone) -> None:
    batch = make_batch(CONTEXTS, CHOICES, LABELS)
    empty = np.asarray(backbone.score(jnp.zeros((0, backbone.d_model)), batch))
    assert empty.shape == (3, 2) and np.all(empty < 0)
    np.testing.assert_allclose(empty, _scores_without_prompt(backbone, batch), atol=1e-5)


def test_prompt_changes_scores(t5_11: Backbone) -> None:
    batch = make_batch(CONTEXTS, CHOICES, LABELS)
    empty = t5_11.score(jnp.zeros((0, t5_11.d_model)), batch)
    prompted = t5_11.score(prompt_for(t5_11, P), batch)
    assert np.max(np.abs(np.asarray(prompted) - np.asarray(empty))) > 1e-3


def test_no_prefix_states(t5_11: Backbone) -> None:
    """The encoder attends both ways, so a prompt's states depend on the input: not cached."""
    assert t5_11.prefix_fn is None
    with pytest.raises(BackboneError, match="cannot cache"):
        t5_11.prefix_states(prompt_for(t5_11, P))


def test_per_row_prompts_equal_rows_alone(t5_11: Backbone) -> None:
    batch = make_batch(CONTEXTS, CHOICES, LABELS)
    width, k = batch["tokens"].shape[1], batch["choices"].shape[2]
    prompts = prompt_for(t5_11, P, seed=7, batch=3)
    together = np.asarray(t5_11.score(prompts, batch))
    for b in range(3):  # same shapes for every row: one compilation
        alone = make_batch(
            CONTEXTS[b : b + 1], CHOICES[b : b + 1], LABELS[b : b + 1], length=width, k=k
        )
        row = np.asarray(t5_11.score(prompts[b], alone))
        np.testing.assert_allclose(together[b : b + 1], row, atol=1e-5)
    # A shared [L, d] prompt is the same as that prompt repeated per row.
    np.testing.assert_allclose(
        t5_11.score(prompts[0], batch), t5_11.score(jnp.stack([prompts[0]] * 3), batch), atol=1e-6
    )


def test_score_consistent_with_loss(t5_11: Backbone) -> None:
    batch = make_batch(CONTEXTS, CHOICES, LABELS)
    prompt = prompt_for(t5_11, P)
    scores = np.asarray(t5_11.score(prompt, batch))
    gold_lp = scores[np.arange(3), LABELS].sum()
    gold_tokens = np.asarray(batch["choice_mask"])[np.arange(3), LABELS].sum()
    np.testing.assert_allclose(float(t5_11.loss(prompt, batch)), -gold_lp / gold_tokens, rtol=1e-5)

    # Unknown labels (-1) are left out of the loss.
    unknown = dict(batch, labels=jnp.asarray([LABELS[0], -1, -1], jnp.int32))
    first = scores[0, LABELS[0]] / np.asarray(batch["choice_mask"])[0, LABELS[0]].sum()
    np.testing.assert_allclose(float(t5_11.loss(prompt, unknown)), -first, rtol=1e-5)


def test_left_padding_invariance(t5_11: Backbone) -> None:
    """A row unpadded, then left-padded (pads between prompt and context) inside a wider batch."""
    prompt = prompt_for(t5_11, P)
    batch = make_batch(CONTEXTS, CHOICES, LABELS)
    k = batch["choices"].shape[2]
    alone = make_batch(CONTEXTS[:1], CHOICES[:1], LABELS[:1], length=14, k=k)  # no padding at all
    expected = np.asarray(t5_11.score(prompt, alone))[0]
    np.testing.assert_allclose(np.asarray(t5_11.score(prompt, batch))[0], expected, atol=1e-5)
    mixed = make_batch(  # the same row with 14 pads, next to a longer row
        [CONTEXTS[0], list(range(2, 30)), CONTEXTS[1]], CHOICES, LABELS, k=k
    )
    np.testing.assert_allclose(np.asarray(t5_11.score(prompt, mixed))[0], expected, atol=1e-5)
    # Row 2 of `batch` (6 tokens, 8 pads) vs row 2 of `mixed` (3 tokens, 25 pads): the context matters.
    assert np.max(np.abs(np.asarray(t5_11.score(prompt, mixed))[2] - expected)) > 1e-4


def test_jit_grad_and_dropout(t5_11: Backbone) -> None:
    batch = make_batch(CONTEXTS, CHOICES, LABELS)
    prompt = prompt_for(t5_11, P)
    deterministic = float(t5_11.loss(prompt, batch))
    # Pure functions of (params, prompt, batch, rng): an outer jit and grad both work.
    grad_fn = jax.jit(jax.value_and_grad(t5_11.loss_fn, argnums=1))
    key = jax.random.PRNGKey(0)
    dropped, grad = grad_fn(t5_11.params, prompt, batch, key)
    again, _ = grad_fn(t5_11.params, prompt, batch, key)
    other, _ = grad_fn(t5_11.params, prompt, batch, jax.random.PRNGKey(1))
    assert grad.shape == prompt.shape
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0
    assert np.isfinite(float(dropped)) and float(dropped) == float(again)
    assert float(dropped) != deterministic and float(other) != float(dropped)
    # rng=None is deterministic: same value as the inner jitted loss.
    np.testing.assert_allclose(
        float(t5_11.loss_fn(t5_11.params, prompt, batch, None)), deterministic
    )


def test_dropout_masks() -> None:
    class TwoSites(nn.Module):
        @nn.compact
        def __call__(self, x, seed):
            return Dropout(0.1)(x, seed), Dropout(0.1)(x, seed)

    ones = jnp.ones((400, 250))
    seed = jax.random.bits(jax.random.PRNGKey(0), (2,), jnp.uint32)
    first, second = TwoSites().apply({}, ones, seed)
    np.testing.assert_array_equal(TwoSites().apply({}, ones, None)[0], ones)
    for out in (first, second):
        kept = np.asarray(out) > 0
        assert abs(kept.mean() - 0.9) < 0.005
        np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.9, rtol=1e-6)
    assert (
        0.75 < np.mean((np.asarray(first) > 0) == (np.asarray(second) > 0)) < 0.9
    )  # independent sites
    other = TwoSites().apply({}, ones, jax.random.bits(jax.random.PRNGKey(1), (2,), jnp.uint32))[0]
    assert not np.array_equal(np.asarray(other), np.asarray(first))
    np.testing.assert_array_equal(TwoSites().apply({}, ones, seed)[0], first)


@pytest.mark.parametrize("config", [T5_10, T5_11], ids=["1.0", "1.1"])
def test_checkpoint_round_trip(config: T5Config, tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    original = init_t5(config, seed=2)
    names = set(t5_params_to_hf(original.params))
    assert ("lm_head.weight" in names) == (not config.tie_word_embeddings)
    write_checkpoint(tmp_path, config, original.params)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w2"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_t5_dir(tmp_path)
    assert loaded.config == config
    assert loaded.identity == original.identity and loaded.identity.startswith("t5-")
    assert loaded.tokenizer is not None and loaded.tokenizer.token_to_id("w5") == 5
    assert loaded.embedding_table.shape == (config.vocab_size, config.d_model)


# --------------------------------------------------------------------------------------------
# (c) bad checkpoints
# --------------------------------------------------------------------------------------------


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="does not exist"):
        load_t5_dir(tmp_path / "nope")
    with pytest.raises(BackboneError, match="missing config.json"):
        load_t5_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BackboneError, match="could not parse"):
        load_t5_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BackboneError, match="not a T5 model"):
        load_t5_dir(tmp_path)


def test_missing_or_corrupt_safetensors(t5_11: Backbone, tmp_path: Path) -> None:
    write_checkpoint(tmp_path, T5_11, t5_11.params)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(BackboneError, match="only safetensors"):
        load_t5_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BackboneError, match="corrupt or unreadable safetensors"):
        load_t5_dir(tmp_path)


def test_missing_tensor_and_bad_shape(t5_11: Backbone, tmp_path: Path) -> None:
    name = "decoder.block.1.layer.1.EncDecAttention.v.weight"
    write_checkpoint(tmp_path / "missing", T5_11, t5_11.params, drop=name)
    with pytest.raises(BackboneError, match=f"tensor '{name}' missing"):
        load_t5_dir(tmp_path / "missing")
    write_checkpoint(tmp_path / "head", T5_11, t5_11.params, drop="lm_head.weight")
    with pytest.raises(BackboneError, match="lm_head.weight"):
        load_t5_dir(tmp_path / "head")
    wrong = dataclasses.replace(T5_11, d_ff=48)
    write_checkpoint(tmp_path / "shape", T5_11, t5_11.params)
    (tmp_path / "shape" / "config.json").write_text(json.dumps(dataclasses.asdict(wrong)))
    with pytest.raises(BackboneError, match="has shape"):
        load_t5_dir(tmp_path / "shape")
