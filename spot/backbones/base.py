"""The one interface every frozen backbone implements.

A batch is a dict of arrays (a JAX pytree) built by `spot.batching`:

    tokens       int32 [batch, length]       context tokens, LEFT-padded with `pad_id`
    mask         int32 [batch, length]       1 on real context tokens, 0 on padding
    choices      int32 [batch, n_choices, k] each candidate answer's tokens, right-padded
    choice_mask  int32 [batch, n_choices, k] 1 on real answer tokens
    labels       int32 [batch]               index of the gold choice (-1 when unknown)
    pack         int8  [slots]               optional: run the real tokens as one packed stream
                                             of this static size (backbones with `packing`),
    pack_window  int8  [window]              its tokens attending within this many slots
                                             (>= the longest row - 1; see `PACK_CHUNK`)
    prompt_rows  int32 [n]                   optional (serving): first row of each distinct
    prompt_index int32 [batch]               per-row prompt, and each row's; with prefix states
                                             (`prefix_states`) prompt_index picks each row's

Position ids are `cumsum(mask) - 1` over the full input (prompt included), so padding
never shifts relative positions (rotary and T5 relative buckets both rely on this).

A prompt is `[prompt_len, d_model]` (shared by all rows) or `[batch, prompt_len, d_model]`
(one prompt per row: mixed-task batches, ensembles). `prompt_len` may be 0. Backbones with a
`prefix_fn` also score from prefix states: one prompt's, or n prompts' stacked (see `score`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Batch = dict[str, jax.Array]
Params = Any
# A packed stream's queries attend in blocks of this many slots (stream sizes are multiples of
# it): each block to the `pack_window` slots before it and its own, not to the whole stream.
PACK_CHUNK = 32


class BackboneError(ValueError):
    """A backbone could not be loaded or was given input it cannot use."""


def config_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a JSON-able dict."""
    return dataclasses.asdict(config)


def weights_hash(params: Params) -> str:
    """sha256 over every parameter's path, dtype, shape and bytes (order independent of dict order)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.asarray(leaf)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def backbone_identity(arch: str, config: Any, params: Params) -> str:
    """`arch-<config hash 12>-<weights hash 16>`: a stable id recorded in prompt files and the library."""
    config_json = json.dumps(config_dict(config), sort_keys=True)
    config_digest = hashlib.sha256(config_json.encode()).hexdigest()[:12]
    return f"{arch}-{config_digest}-{weights_hash(params)[:16]}"


def broadcast_prompt(prompt: jax.Array, batch_size: int) -> jax.Array:
    """[L, d] or [B, L, d] -> [B, L, d]."""
    if prompt.ndim == 2:
        return jnp.broadcast_to(prompt[None], (batch_size, *prompt.shape))
    return prompt


def position_ids(mask: jax.Array) -> jax.Array:
    """[batch, length] 0/1 mask -> [batch, length] positions counting only real tokens."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def check_prompt(prompt: Any, d_model: int) -> np.ndarray:
    """Validate a prompt outside jit: rank 2 or 3, last dim == d_model, float, finite."""
    array = np.asarray(prompt)
    if array.ndim not in (2, 3):
        raise BackboneError(f"prompt must be [L, d] or [batch, L, d], got shape {array.shape}")
    if array.shape[-1] != d_model:
        raise BackboneError(f"prompt dim {array.shape[-1]} != backbone d_model {d_model}")
    if not np.issubdtype(array.dtype, np.floating):
        raise BackboneError(f"prompt must be floating point, got {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise BackboneError("prompt contains NaN or infinite values")
    return array


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
    """A frozen language model that takes a soft prompt.

    `loss_fn(params, prompt, batch, rng)` and `score_fn(params, prompt, batch)` are pure and
    jit-compatible; the frozen `params` are passed as an argument (never closed over) so that
    XLA does not embed them as constants. `rng=None` means deterministic (no dropout).
    """

    name: str  # registry name or path it was loaded from
    arch: str  # "llama" | "t5"
    config: Any  # frozen dataclass of the architecture
    params: Params
    tokenizer: Any  # tokenizers.Tokenizer or None (tiny random test models)
    identity: str
    bos_id: int | None  # prepended before the prompt (decoder-only models that use BOS)
    eos_id: int | None  # appended to every choice when `eos_after_choice`
    pad_id: int
    eos_after_choice: bool
    loss_fn: Callable[..., jax.Array]
    score_fn: Callable[..., jax.Array]
    embed_path: tuple[str, ...]  # where the [vocab, d_model] token embedding lives in params
    packing: bool = False  # loss/score run packed batches (spot.batching.make_batch(pack=True))
    # prefix_fn(params, prompt [L, d]) -> prefix states that score_fn takes in place of the
    # prompt (decoder-only models: the prompt's keys/values do not depend on the input). None:
    # the architecture cannot reuse them (T5's encoder attends both ways).
    prefix_fn: Callable[..., Any] | None = None
    # prompt_grad_fn(params) -> prompt_grad(prompt [L, d], batch) = (loss, d loss / d prompt):
    # loss_fn's deterministic loss and prompt gradient computed layer by layer from Python
    # (faster than jit of loss_fn's gradient where the backbone has it; one device). None: none.
    prompt_grad_fn: Callable[..., Callable[..., Any]] | None = None

    @property
    def d_model(self) -> int:
        return int(self.embedding_table.shape[1])

    @property
    def embedding_table(self) -> jax.Array:
        """[vocab, d_model] token embeddings (prompt init, nearest neighbours)."""
        node = self.params
        for key in self.embed_path:
            node = node[key]
        return node

    @functools.cached_property
    def jitted_loss(self) -> Callable[..., jax.Array]:
        return jax.jit(self.loss_fn)

    @functools.cached_property
    def jitted_score(self) -> Callable[..., jax.Array]:
        return jax.jit(self.score_fn)

    def loss(self, prompt: jax.Array, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        """Mean token cross-entropy of the gold choice."""
        return self.jitted_loss(self.params, prompt, batch, rng)

    def score(self, prompt: Any, batch: Batch) -> jax.Array:
        """[batch, n_choices] summed log-likelihood of each choice (rank classification).
        `prompt`: a prompt, or prefix states from `prefix_states` (see `prefix_fn`)."""
        return self.jitted_score(self.params, prompt, batch)

    @functools.cached_property
    def prompt_grad(self) -> Callable[..., Any] | None:
        """`prompt_grad_fn` bound to this backbone's params (built once), or None."""
        return None if self.prompt_grad_fn is None else self.prompt_grad_fn(self.params)

    @functools.cached_property
    def jitted_prefix(self) -> Callable[..., Any]:
        if self.prefix_fn is None:
            raise BackboneError(f"{self.arch} backbones cannot cache prompt states")
        return jax.jit(self.prefix_fn)

    def prefix_states(self, prompt: jax.Array) -> Any:
        """A [L, d] prompt's reusable states (a pytree): `score(states, batch)` equals
        `score(prompt, batch)` without running the prompt again."""
        return self.jitted_prefix(self.params, prompt)
