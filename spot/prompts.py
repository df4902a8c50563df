"""Prompt initialisers (plain functions) and backbone-checked prompt files.

The file format itself lives in `library.prompt_file` (JAX-free, shared with the service).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from library.prompt_file import import_peft, load_prompt, save_prompt
from spot.backbones.base import Backbone, BackboneError, check_prompt

VOCAB_SAMPLE_SIZE = 5000  # "sampled vocabulary": the 5,000 most common tokens


def random_uniform(length: int, d_model: int, seed: int, scale: float = 0.5) -> np.ndarray:
    """Uniform in [-scale, scale] (the reference's random init)."""
    return np.random.default_rng(seed).uniform(-scale, scale, (length, d_model)).astype(np.float32)


def _common_token_ids(backbone: Backbone, size: int) -> np.ndarray:
    """Ids of the `size` most common tokens: BPE and SentencePiece vocabularies are ordered by
    frequency/merge rank, so the lowest ids that are not special tokens."""
    special = set()
    if backbone.tokenizer is not None:
        special = {i for i, t in backbone.tokenizer.get_added_tokens_decoder().items() if t.special}
    special |= {i for i in (backbone.bos_id, backbone.eos_id, backbone.pad_id) if i is not None}
    vocab = backbone.embedding_table.shape[0]
    ids = [i for i in range(min(vocab, size + len(special))) if i not in special]
    return np.asarray(ids[:size])


def sampled_vocab(backbone: Backbone, length: int, seed: int) -> np.ndarray:
    """Embeddings of tokens drawn without replacement from the most common tokens."""
    ids = _common_token_ids(backbone, VOCAB_SAMPLE_SIZE)
    chosen = np.random.default_rng(seed).choice(ids, size=length, replace=length > len(ids))
    return np.asarray(backbone.embedding_table)[chosen].astype(np.float32)


def token_embeddings(backbone: Backbone, texts: list[str]) -> np.ndarray:
    """Embeddings of the tokens of each text, concatenated. [n_tokens, d_model]."""
    if backbone.tokenizer is None:
        raise BackboneError(f"backbone {backbone.name} has no tokenizer")
    ids = [i for t in texts for i in backbone.tokenizer.encode(t, add_special_tokens=False).ids]
    return np.asarray(backbone.embedding_table)[np.asarray(ids, np.int64)].astype(np.float32)


def class_labels(backbone: Backbone, labels: list[str], length: int, seed: int) -> np.ndarray:
    """Verbaliser token embeddings first, remaining slots from the sampled vocabulary."""
    head = token_embeddings(backbone, labels)[:length]
    return np.concatenate([head, sampled_vocab(backbone, length - len(head), seed)])


def from_text(backbone: Backbone, text: str, length: int) -> np.ndarray:
    """The text's token embeddings, repeated to fill `length` slots."""
    tokens = token_embeddings(backbone, [text])
    if len(tokens) == 0:
        raise ValueError("init text tokenizes to nothing")
    return np.resize(tokens, (length, tokens.shape[1])).astype(np.float32)


def read_prompt(path: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    """A prompt file, or a PEFT prompt-tuning adapter directory -> (prompt, metadata)."""
    return import_peft(path) if Path(path).is_dir() else load_prompt(path)


def load_for_backbone(path: str | Path, backbone: Backbone) -> tuple[np.ndarray, dict[str, str]]:
    """Read a prompt file (or PEFT adapter directory) and refuse it unless it was trained on
    this backbone."""
    prompt, meta = read_prompt(path)
    recorded = meta.get("backbone")
    if recorded and recorded != backbone.identity:
        raise BackboneError(
            f"{path} was trained on backbone {recorded}, not {backbone.identity} ({backbone.name})"
        )
    return check_prompt(prompt, backbone.d_model), meta


def initial_prompt(
    backbone: Backbone, init: str, length: int, seed: int, labels: list[str] | None = None
) -> np.ndarray:
    """Dispatch an init spec: random_uniform | sampled_vocab | class_labels | text:<s> | file:<path>."""
    if init == "random_uniform":
        return random_uniform(length, backbone.d_model, seed)
    if init == "sampled_vocab":
        return sampled_vocab(backbone, length, seed)
    if init == "class_labels":
        return class_labels(backbone, labels or [], length, seed)
    if init.startswith("text:"):
        return from_text(backbone, init[5:], length)
    if init.startswith("file:"):
        prompt, _ = load_for_backbone(init[5:], backbone)
        return prompt
    raise ValueError(
        f"unknown init {init!r}: random_uniform, sampled_vocab, class_labels, text:<s>, file:<path>"
    )


def save_for_backbone(path: str | Path, prompt: Any, backbone: Backbone, **metadata: Any) -> None:
    """Write a prompt file stamped with the backbone identity."""
    array = check_prompt(prompt, backbone.d_model)
    save_prompt(path, array, {"backbone": backbone.identity, **metadata})
