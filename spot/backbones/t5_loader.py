"""Build a T5 `Backbone`: random init, and Hugging Face checkpoints (safetensors) in and out."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spot.backbones.base import Backbone, BackboneError, Params, backbone_identity
from spot.backbones.t5 import EMBED_PATH, T5Config, T5Transformer, t5_config_from_hf
from spot.backbones.t5_fns import make_loss_fn, make_score_fn


def _param_shapes(config: T5Config) -> Params:
    """The param tree of `config` as ShapeDtypeStructs (no allocation)."""
    model = T5Transformer(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    prompt = jnp.zeros((1, 0, config.d_model), jnp.float32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), prompt, dummy, dummy, dummy)
    )
    return variables["params"]


def _make_backbone(name: str, config: T5Config, params: Params, tokenizer: Any) -> Backbone:
    return Backbone(
        name=name,
        arch="t5",
        config=config,
        params=params,
        tokenizer=tokenizer,
        identity=backbone_identity("t5", config, params),
        bos_id=None,
        eos_id=config.eos_token_id,
        pad_id=config.pad_token_id,
        eos_after_choice=True,
        loss_fn=make_loss_fn(config),
        score_fn=make_score_fn(config),
        embed_path=EMBED_PATH,
    )


def _init_std(path: tuple[str, ...], config: T5Config) -> float:
    """Normal init std of a param, as in HF `T5PreTrainedModel._init_weights`."""
    module = path[-2]
    if path in (EMBED_PATH, ("lm_head", "kernel")):
        return 1.0
    if module == "query":
        return (config.d_model * config.d_kv) ** -0.5
    if module == "out":
        return (config.num_heads * config.d_kv) ** -0.5
    if module == "wo":
        return config.d_ff**-0.5
    return config.d_model**-0.5  # key, value, wi*, relpos_bias


def init_t5(config: T5Config, seed: int = 0) -> Backbone:
    """A randomly initialised T5 (tiny test models).

    Drawn with numpy from the shapes alone: no XLA compilation of an init graph.
    """
    generator = np.random.default_rng(seed)

    def draw(keys: tuple[Any, ...], spec: jax.ShapeDtypeStruct) -> jax.Array:
        path = _path(keys)
        if path[-1] == "scale":
            return jnp.ones(spec.shape, jnp.float32)
        array = generator.standard_normal(spec.shape, dtype=np.float32) * _init_std(path, config)
        return jnp.asarray(array)

    params = jax.tree_util.tree_map_with_path(draw, _param_shapes(config))
    return _make_backbone(f"random-t5-seed{seed}", config, params, None)


_SUBLAYER = {  # (stack, flax sub-module) -> (HF layer index, HF module name)
    ("encoder", "self_attention"): (0, "SelfAttention"),
    ("encoder", "pre_self_attention_norm"): (0, "layer_norm"),
    ("encoder", "mlp"): (1, "DenseReluDense"),
    ("encoder", "pre_mlp_norm"): (1, "layer_norm"),
    ("decoder", "self_attention"): (0, "SelfAttention"),
    ("decoder", "pre_self_attention_norm"): (0, "layer_norm"),
    ("decoder", "cross_attention"): (1, "EncDecAttention"),
    ("decoder", "pre_cross_attention_norm"): (1, "layer_norm"),
    ("decoder", "mlp"): (2, "DenseReluDense"),
    ("decoder", "pre_mlp_norm"): (2, "layer_norm"),
}
_PROJ = {"query": "q", "key": "k", "value": "v", "out": "o"}


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Flax param path -> (HF tensor name, transpose?)."""
    if path == EMBED_PATH:
        return "shared.weight", False
    if path == ("lm_head", "kernel"):
        return "lm_head.weight", True
    stack = path[0]
    if path[1:] == ("relpos_bias", "embedding"):
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False
    if path[1:] == ("final_norm", "scale"):
        return f"{stack}.final_layer_norm.weight", False
    block = int(path[1].removeprefix("layers_"))
    index, module = _SUBLAYER[(stack, path[2])]
    prefix = f"{stack}.block.{block}.layer.{index}.{module}"
    if path[-1] == "scale":
        return f"{prefix}.weight", False
    leaf = _PROJ.get(path[3], path[3])  # attention q/k/v/o or mlp wi/wi_0/wi_1/wo
    return f"{prefix}.{leaf}.weight", True


def _path(keys: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(key, "key", key)) for key in keys)


def t5_params_to_hf(params: Params) -> dict[str, np.ndarray]:
    """Flax params -> HF `T5ForConditionalGeneration` state dict (numpy, float32)."""
    out: dict[str, np.ndarray] = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, transpose = _hf_name(_path(keys))
        array = np.asarray(leaf, dtype=np.float32)
        out[name] = np.ascontiguousarray(array.T if transpose else array)
    return out


_EMBED_ALIASES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


class _SafetensorsReader:
    """Lazy access to the tensors of model.safetensors or a sharded model.safetensors.index.json."""

    def __init__(self, directory: str) -> None:
        from safetensors import safe_open

        single = os.path.join(directory, "model.safetensors")
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(single):
            files = {single}
        elif os.path.isfile(index):
            try:
                with open(index) as handle:
                    weight_map = json.load(handle)["weight_map"]
                files = {os.path.join(directory, shard) for shard in set(weight_map.values())}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise BackboneError(f"corrupt safetensors index {index}: {error}") from error
        else:
            raise BackboneError(
                f"no model.safetensors (or model.safetensors.index.json) in {directory}; "
                "only safetensors checkpoints are supported (pickle files are never loaded)"
            )
        self._handles: dict[str, Any] = {}
        for file in sorted(files):
            try:
                handle = safe_open(file, framework="flax")
                self._handles.update(dict.fromkeys(handle.keys(), handle))
            except Exception as error:  # safetensors raises its own SafetensorError / OSError
                raise BackboneError(
                    f"corrupt or unreadable safetensors file {file}: {error}"
                ) from error

    def __contains__(self, name: str) -> bool:
        return name in self._handles

    def get(self, name: str) -> np.ndarray:
        try:
            tensor = self._handles[name].get_tensor(name)
        except Exception as error:
            raise BackboneError(f"could not read tensor {name!r}: {error}") from error
        return np.asarray(tensor.astype(jnp.float32))


def _load_params(reader: _SafetensorsReader, config: T5Config, directory: str) -> Params:
    """Read every expected tensor, check its shape, and build the Flax param tree."""

    def load(keys: tuple[Any, ...], spec: jax.ShapeDtypeStruct) -> jax.Array:
        path = _path(keys)
        name, transpose = _hf_name(path)
        candidates = _EMBED_ALIASES if path == EMBED_PATH else (name,)
        found = next((candidate for candidate in candidates if candidate in reader), None)
        if found is None:
            raise BackboneError(
                f"tensor {name!r} missing from the safetensors checkpoint in {directory}"
            )
        array = reader.get(found)
        array = array.T if transpose else array
        if array.shape != spec.shape:
            raise BackboneError(
                f"tensor {found!r} has shape {array.shape[::-1] if transpose else array.shape}, "
                f"expected {spec.shape[::-1] if transpose else spec.shape} for this config"
            )
        return jnp.asarray(array, dtype=jnp.float32)

    return jax.tree_util.tree_map_with_path(load, _param_shapes(config))


def load_t5_dir(path: str | os.PathLike[str], name: str | None = None) -> Backbone:
    """Load a Hugging Face T5 directory (config.json + safetensors [+ tokenizer.json]).

    `name` (default: the path) is recorded as `Backbone.name`.
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise BackboneError(f"T5 checkpoint directory {directory} does not exist")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise BackboneError(f"missing config.json in {directory}")
    try:
        with open(config_path) as handle:
            hf_config = json.load(handle)
    except (OSError, ValueError) as error:
        raise BackboneError(f"could not parse {config_path}: {error}") from error
    if not isinstance(hf_config, dict):
        raise BackboneError(f"{config_path} is not a JSON object")
    config = t5_config_from_hf(hf_config)
    reader = _SafetensorsReader(directory)
    if config.tie_word_embeddings and "lm_head.weight" in reader:
        # Untie when the checkpoint carries its own, different head (what transformers 5.x does).
        embed = next((name for name in _EMBED_ALIASES if name in reader), None)
        if embed is not None and not np.array_equal(
            reader.get("lm_head.weight"), reader.get(embed)
        ):
            config = dataclasses.replace(config, tie_word_embeddings=False)
    params = _load_params(reader, config, directory)

    tokenizer = None
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tokenizer_path):
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(tokenizer_path)
        except Exception as error:
            raise BackboneError(f"could not load {tokenizer_path}: {error}") from error
    return _make_backbone(name or directory, config, params, tokenizer)
