"""Llama weights in and out: Hugging Face checkpoint directories and GGUF files.

Everything goes through the Hugging Face tensor layout (`model.layers.N.self_attn.q_proj.weight`,
torch `[out, in]`): a GGUF file is first translated to it, then one mapping builds the Flax tree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from spot.backbones.base import BackboneError, Params
from spot.backbones.llama import LlamaConfig

LAYER_TENSORS = {  # flax path under layers/ -> Hugging Face name under model.layers.N.
    ("attn", "q", "kernel"): "self_attn.q_proj.weight",
    ("attn", "k", "kernel"): "self_attn.k_proj.weight",
    ("attn", "v", "kernel"): "self_attn.v_proj.weight",
    ("attn", "o", "kernel"): "self_attn.o_proj.weight",
    ("mlp", "gate", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "up", "kernel"): "mlp.up_proj.weight",
    ("mlp", "down", "kernel"): "mlp.down_proj.weight",
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",
}
GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _take(state: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in state:
        raise BackboneError(f"checkpoint is missing tensor {name!r}")
    array = state[name]
    if tuple(array.shape) != shape:
        raise BackboneError(f"tensor {name!r} has shape {array.shape}, expected {shape}")
    return np.asarray(array, dtype=np.float32)


def params_from_hf(state: dict[str, np.ndarray], config: LlamaConfig) -> Params:
    """Hugging Face Llama state dict -> Flax params (layers stacked on axis 0)."""
    c = config
    shapes = {
        "self_attn.q_proj.weight": (c.num_heads * c.head_dim, c.d_model),
        "self_attn.k_proj.weight": (c.num_kv_heads * c.head_dim, c.d_model),
        "self_attn.v_proj.weight": (c.num_kv_heads * c.head_dim, c.d_model),
        "self_attn.o_proj.weight": (c.d_model, c.num_heads * c.head_dim),
        "mlp.gate_proj.weight": (c.d_ff, c.d_model),
        "mlp.up_proj.weight": (c.d_ff, c.d_model),
        "mlp.down_proj.weight": (c.d_model, c.d_ff),
        "input_layernorm.weight": (c.d_model,),
        "post_attention_layernorm.weight": (c.d_model,),
    }
    params: dict[str, Any] = {}
    for path, hf in LAYER_TENSORS.items():
        layers = [_take(state, f"model.layers.{i}.{hf}", shapes[hf]) for i in range(c.num_layers)]
        stacked = np.stack([w.T if path[-1] == "kernel" else w for w in layers])
        _set(params, ("layers", *path), stacked)
    embed = _take(state, "model.embed_tokens.weight", (c.vocab_size, c.d_model))
    params["embed"] = {"embedding": embed}
    params["norm"] = {"scale": _take(state, "model.norm.weight", (c.d_model,))}
    if not c.tie_embeddings:
        head = _take(state, "lm_head.weight", (c.vocab_size, c.d_model))
        params["lm_head"] = {"kernel": head.T}
    return params


def params_to_hf(params: Params, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Flax params -> Hugging Face Llama state dict (inverse of `params_from_hf`)."""
    state = {
        "model.embed_tokens.weight": np.asarray(params["embed"]["embedding"]),
        "model.norm.weight": np.asarray(params["norm"]["scale"]),
    }
    for path, hf in LAYER_TENSORS.items():
        node = params["layers"]
        for key in path:
            node = node[key]
        for i in range(config.num_layers):
            layer = np.asarray(node[i])
            state[f"model.layers.{i}.{hf}"] = layer.T if path[-1] == "kernel" else layer
    if not config.tie_embeddings:
        state["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    return {name: np.ascontiguousarray(array) for name, array in state.items()}


def read_hf_dir(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """config.json + model.safetensors (or sharded model-*.safetensors) -> (raw config, state)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BackboneError(f"{path} has no config.json")
    raw = json.loads(config_file.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = [p.name for p in path.glob("*.bin")]
        hint = f" (found {bins}: pickle-based weights are not loaded; convert to safetensors)" if bins else ""
        raise BackboneError(f"{path} has no .safetensors weights{hint}")
    state: dict[str, np.ndarray] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as error:
            raise BackboneError(f"cannot read {file}: {error}") from error
    return raw, state


def _unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rotary row permutation of q/k weights ([out, in])."""
    out = weight.shape[0]
    return weight.reshape(heads, out // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: Path):
    """GGUF Llama file -> (raw HF-style config, HF state dict, tokenizers.Tokenizer, special ids)."""
    import gguf
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise BackboneError(f"cannot read GGUF file {path}: {error}") from error

    def field(name: str, default: Any = None) -> Any:
        item = reader.fields.get(name)
        return default if item is None else item.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise BackboneError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")
    heads = int(field("llama.attention.head_count"))
    kv_heads = int(field("llama.attention.head_count_kv", heads))
    d_model = int(field("llama.embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    raw = {
        "model_type": "llama",
        "vocab_size": len(field("tokenizer.ggml.tokens")),
        "hidden_size": d_model,
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(field("llama.rope.dimension_count", d_model // heads)),
        "intermediate_size": int(field("llama.feed_forward_length")),
        "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        weight = weight.reshape([int(n) for n in reversed(tensor.shape)])
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", tensor.name)
        if match:
            layer, kind = match.groups()
            if kind == "attn_q":
                weight = _unpermute_rope(weight, heads)
            elif kind == "attn_k":
                weight = _unpermute_rope(weight, kv_heads)
            name = f"model.layers.{layer}.{GGUF_NAMES[kind]}.weight"
        else:
            name = {
                "token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight",
            }[tensor.name]
        state[name] = weight
    special = {
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": field("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
    }
    return raw, state, _gguf_tokenizer(field), special


def _gguf_tokenizer(field):
    """Byte-level BPE tokenizer from the GGUF vocabulary and merges (gpt2-style models)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if field("tokenizer.ggml.model") != "gpt2":
        raise BackboneError(f"GGUF tokenizer {field('tokenizer.ggml.model')!r} is not supported")
    tokens = list(field("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    token_types = list(field("tokenizer.ggml.token_type"))
    control = [t for t, kind in zip(tokens, token_types, strict=False) if kind == 3]  # llama.cpp CONTROL
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer
