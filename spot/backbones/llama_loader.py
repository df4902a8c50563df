"""Build a Llama `Backbone` from a Hugging Face-layout directory (also our own SmolLM2 cache)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from spot.backbones.base import Backbone, BackboneError, Params, backbone_identity
from spot.backbones.llama import LlamaConfig, to_config
from spot.backbones.llama_fns import make_loss_fn, make_prefix_fn, make_score_fn
from spot.backbones.llama_grad import prompt_grad_factory
from spot.backbones.llama_weights import params_from_hf, read_hf_dir


def build_llama(
    name: str,
    config: LlamaConfig,
    params: Params,
    tokenizer: Any = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    identity: str | None = None,
) -> Backbone:
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    return Backbone(
        name=name,
        arch="llama",
        config=config,
        params=params,
        tokenizer=tokenizer,
        identity=identity or backbone_identity("llama", config, params),
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        eos_after_choice=False,
        loss_fn=make_loss_fn(config, bos_id),
        score_fn=make_score_fn(config, bos_id),
        embed_path=("embed", "embedding"),
        packing=True,
        prefix_fn=make_prefix_fn(config, bos_id),
        prompt_grad_fn=prompt_grad_factory(config, bos_id),
    )


def load_llama_dir(path: Path, name: str | None = None) -> Backbone:
    """config.json + safetensors (+ tokenizer.json, tokenizer_config.json, spot.json) -> Backbone."""
    raw, state = read_hf_dir(path)
    config = to_config(raw)
    params = params_from_hf(state, config)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    add_bos = raw.get("add_bos_token")
    if add_bos is None and (path / "tokenizer_config.json").is_file():
        add_bos = json.loads((path / "tokenizer_config.json").read_text()).get("add_bos_token")
    bos = raw.get("bos_token_id")
    eos = raw.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    pad = raw.get("pad_token_id")
    stamp = path / "spot.json"
    identity = json.loads(stamp.read_text())["identity"] if stamp.is_file() else None
    return build_llama(
        name or str(path),
        config,
        params,
        tokenizer=tokenizer,
        bos_id=bos if add_bos and bos is not None else None,
        eos_id=eos,
        pad_id=pad if pad is not None else (eos if eos is not None else 0),
        identity=identity,
    )


def write_llama_dir(
    path: Path, raw_config: dict[str, Any], state: dict[str, np.ndarray], tokenizer, cache_version: int = 0
) -> None:
    """Write a loadable directory and stamp it with the backbone identity (computed once)."""
    config = to_config(raw_config)
    params = params_from_hf(state, config)
    if not all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(params)):
        raise BackboneError("converted weights contain NaN or infinite values")
    (path / "config.json").write_text(json.dumps(raw_config, indent=1))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer.json"))
    identity = backbone_identity("llama", config, params)
    (path / "spot.json").write_text(json.dumps({"identity": identity, "cache_version": cache_version}))
