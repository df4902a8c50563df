"""Shared fixtures: a tiny random Llama with a byte-level tokenizer (fast, no downloads)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

# XLA's CPU backend at optimization level 0. On a cold compilation cache the tests mostly compile
# (one training test: 15.8 s of its 18.5 s); level 0 roughly halves that, and the SmolLM2 tests
# barely change (2-core VM, cold cache, beside a training run: the fast-path parity tests
# 127 s -> 63 s, the SmolLM2 tests 97 s -> 88 s).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true --xla_backend_optimization_level=0"
)
# Tests rebuild the same tiny-model steps many times (new backbone objects, subprocesses): JAX's
# persistent compilation cache (keyed by the compiled program) compiles each one once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def byte_tokenizer():
    """Byte-level BPE without merges: one token per byte, ids 0..255; then <pad>=256, <eos>=257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<pad>", "<eos>"])
    return tokenizer


def make_tiny_llama(seed: int = 0, tie: bool = True, bos: bool = False):
    from spot.backbones.llama import LlamaConfig, init_params
    from spot.backbones.llama_loader import build_llama

    config = LlamaConfig(vocab_size=260, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, d_ff=64, tie_embeddings=tie)
    params = init_params(config, seed)
    return build_llama("tiny-llama", config, params, tokenizer=byte_tokenizer(),
                       bos_id=258 if bos else None, eos_id=257, pad_id=256)


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


# ---- the `spot` command line in-process (tests/test_cli*.py)

FILE = dict(prompt_length=4, batch_size=8, steps=8, key_step=4, eval_every=4, eval_examples=16,
            max_length=32, learning_rate=0.05, schedule="linear", init="class_labels", seed=3)


@pytest.fixture
def cli(tiny_llama, monkeypatch, tmp_path):
    """Run `spot ...` in-process on the tiny model: (invoke, tiny task names, a config file).
    `invoke` asserts exit status 0 and returns the output; `invoke.loaded` lists the backbones."""
    from tiny_tasks import register_tiny_tasks
    from typer.testing import CliRunner

    from spot import backbones
    from spot.cli import app

    names = register_tiny_tasks()
    loaded: list[str] = []

    def load(name: str = "smollm2-135m"):
        loaded.append(str(name))
        return tiny_llama

    monkeypatch.setattr(backbones, "load", load)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"task": names[0], **FILE}))

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    invoke.loaded = loaded
    yield invoke, names, config
    logging.getLogger("spot.tasks").setLevel(logging.NOTSET)  # undo the level `spot` sets
