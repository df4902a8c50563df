"""What a soft prompt looks like from the vocabulary (Lester et al. 2021, section 7).

For each prompt position: the `k` vocabulary tokens whose input embeddings are nearest by cosine
similarity, and the vector's L2 norm next to the vocabulary's mean embedding norm (tuned
prompts often drift far from the norms of real tokens, which makes them "unreadable").

    result = inspect_prompt(backbone, prompt)      # [L, d] array
    print(render(result))                          # plain text; render(result, "rich") -> rich Table
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from spot.backbones.base import Backbone, BackboneError, check_prompt

__all__ = ["Neighbour", "PromptInspection", "TokenInspection", "inspect_prompt", "render"]

_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Neighbour:
    token_id: int
    token: str  # the vocabulary entry (e.g. "Ġgood" for byte-level BPE), "" without a tokenizer
    text: str  # the decoded string (e.g. " good")
    cosine: float


@dataclasses.dataclass(frozen=True)
class TokenInspection:
    position: int
    norm: float
    norm_ratio: float  # norm / vocabulary mean norm
    neighbours: tuple[Neighbour, ...]  # best first


@dataclasses.dataclass(frozen=True)
class PromptInspection:
    backbone: str  # identity
    length: int
    vocab_size: int
    vocab_mean_norm: float
    vocab_std_norm: float
    tokens: tuple[TokenInspection, ...]

    @property
    def mean_norm(self) -> float:
        return float(np.mean([t.norm for t in self.tokens])) if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean_norm": self.mean_norm}


def _token_strings(backbone: Backbone, ids: np.ndarray) -> list[tuple[str, str]]:
    tokenizer = backbone.tokenizer
    if tokenizer is None:
        return [("", "") for _ in ids]
    return [
        (tokenizer.id_to_token(int(i)) or "", tokenizer.decode([int(i)], skip_special_tokens=False))
        for i in ids
    ]


def inspect_prompt(backbone: Backbone, prompt_array: Any, k: int = 5) -> PromptInspection:
    """Nearest vocabulary tokens (cosine over the input embedding table) and norms of a prompt.

    `prompt_array` is [L, d] (a prompt file's tensor). Ties in cosine go to the lower token id.
    """
    prompt = check_prompt(prompt_array, backbone.d_model)
    if prompt.ndim != 2:
        raise BackboneError(f"inspect one prompt [L, d] at a time, got shape {prompt.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    table = np.asarray(backbone.embedding_table, np.float32)
    vocab_norms = np.linalg.norm(table, axis=1)
    unit_table = table / np.maximum(vocab_norms, _EPS)[:, None]
    prompt = prompt.astype(np.float32)
    norms = np.linalg.norm(prompt, axis=1)
    cosine = (prompt / np.maximum(norms, _EPS)[:, None]) @ unit_table.T  # [L, vocab]
    k = min(k, table.shape[0])
    mean_norm = float(vocab_norms.mean())
    tokens = []
    for position, row in enumerate(cosine):
        # stable sort on -cosine: equal similarities keep the lower token id first
        top = np.argsort(-row, kind="stable")[:k]
        strings = _token_strings(backbone, top)
        neighbours = tuple(
            Neighbour(int(t), tok, text, float(row[t]))
            for t, (tok, text) in zip(top, strings, strict=True)
        )
        tokens.append(
            TokenInspection(
                position,
                float(norms[position]),
                float(norms[position] / max(mean_norm, _EPS)),
                neighbours,
            )
        )
    return PromptInspection(
        backbone.identity,
        prompt.shape[0],
        table.shape[0],
        mean_norm,
        float(vocab_norms.std()),
        tuple(tokens),
    )


def render(result: PromptInspection, fmt: str = "text") -> Any:
    """`"text"`: a plain-text table (str); `"rich"`: a `rich.table.Table` to print with rich."""
    title = (
        f"prompt of {result.length} tokens on {result.backbone}: vocabulary mean norm "
        f"{result.vocab_mean_norm:.3f} (std {result.vocab_std_norm:.3f}), "
        f"prompt mean norm {result.mean_norm:.3f}"
    )
    header = ["pos", "norm", "x vocab"] + [
        f"nn{i + 1} (cos)"
        for i in range(max((len(t.neighbours) for t in result.tokens), default=0))
    ]
    rows = [
        [str(t.position), f"{t.norm:.3f}", f"{t.norm_ratio:.2f}"]
        + [f"{n.text!r} {n.cosine:.3f}" for n in t.neighbours]
        for t in result.tokens
    ]
    if fmt == "rich":
        from rich.table import Table

        table = Table(title=title)
        for i, name in enumerate(header):
            table.add_column(name, justify="right" if i < 3 else "left")
        for row in rows:
            table.add_row(*row)
        return table
    if fmt != "text":
        raise ValueError(f"unknown format {fmt!r}: text or rich")
    widths = [max(len(r[i]) for r in [header, *rows] if i < len(r)) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
