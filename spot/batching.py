"""The one place that turns formatted examples into backbone batches (see spot/backbones/base.py).

Examples are tokenized once (`encode`); batches are then cut from the token lists with the
context length rounded up to a bucket, so each bucket compiles once and padding stays small.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from spot.backbones.base import PACK_CHUNK, Backbone


class ExampleLike(Protocol):
    text: str
    choices: tuple[str, ...]
    label: int


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of a list of examples: ragged contexts, [n, n_choices, k] padded answers."""

    contexts: list[np.ndarray]
    choices: np.ndarray  # int32 [n, n_choices, k]
    choice_mask: np.ndarray  # int32 [n, n_choices, k]
    labels: np.ndarray  # int32 [n]

    def __len__(self) -> int:
        return len(self.contexts)


def encode(
    backbone: Backbone, examples: Sequence[ExampleLike], max_length: int = 128, max_answer: int = 16
) -> Encoded:
    """Tokenize contexts (keeping the last `max_length` tokens) and answers (first `max_answer`)."""
    if not examples:
        raise ValueError("no examples to encode")
    if backbone.tokenizer is None:
        raise ValueError(f"backbone {backbone.name} has no tokenizer")
    n_choices = {len(e.choices) for e in examples}
    if len(n_choices) != 1:
        raise ValueError(f"examples disagree on the number of choices: {sorted(n_choices)}")
    tokenizer = backbone.tokenizer
    texts = [e.text for e in examples]
    contexts = [
        np.asarray(enc.ids[-max_length:], np.int32)
        for enc in tokenizer.encode_batch(texts, add_special_tokens=False)
    ]
    flat = [c for e in examples for c in e.choices]
    unique = sorted(set(flat))
    encoded_choices = tokenizer.encode_batch(unique, add_special_tokens=False)
    ids = {c: enc.ids for c, enc in zip(unique, encoded_choices, strict=True)}
    eos = [backbone.eos_id] if backbone.eos_after_choice and backbone.eos_id is not None else []
    answers = [(ids[c] + eos)[:max_answer] for c in flat]
    if any(len(a) == 0 for a in answers):
        raise ValueError("an answer choice tokenizes to nothing")
    k = max(len(a) for a in answers)
    c = n_choices.pop()
    choices = np.full((len(examples), c, k), backbone.pad_id, np.int32)
    choice_mask = np.zeros((len(examples), c, k), np.int32)
    for i, answer in enumerate(answers):
        choices[i // c, i % c, : len(answer)] = answer
        choice_mask[i // c, i % c, : len(answer)] = 1
    labels = np.asarray([e.label for e in examples], np.int32)
    if labels.min() < -1 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got {labels.min()}..{labels.max()}")
    return Encoded(contexts, choices, choice_mask, labels)


# Pack a batch only when that costs at most this share of the padded layout. 0.9 since packed
# streams attend in bands (benchmarks/README.md, item 9: packing paid up to 0.87, not at 1.02).
PACK_GAIN = 0.9
# Cost of one attended (query, key) pair in token-columns: a pair costs ~4 d FLOPs, a column's
# projections ~21 d^2 (SmolLM2: 1/3070); XLA's attention runs well below its GEMM rate, hence 1/1024.
PAIR_COST = 1 / 1024


def bucket_length(length: int, bucket: int, max_length: int) -> int:
    """Round `length` up to a multiple of `bucket`, at most `max_length` (never below 1)."""
    return max(1, min(max_length, -(-length // bucket) * bucket))


def layout_cost(rows: int, columns: int) -> float:
    """Relative cost of running `rows` sequences of `columns` tokens (projections + attention)."""
    return rows * columns * (1 + columns * PAIR_COST)


def packed_cost(slots: int, window: int) -> float:
    """`layout_cost` of a packed stream: each query block attends to `window` + PACK_CHUNK slots."""
    return slots * (1 + (window + PACK_CHUNK) * PAIR_COST)


def pack_slots(n_tokens: int) -> int:
    """Static size of a packed stream holding `n_tokens`: a multiple of 32 up to 256, of 64 up
    to 512, then of 128 (few shapes to compile, at most ~12% slack beyond 256 tokens)."""
    step = 32 if n_tokens <= 256 else 64 if n_tokens <= 512 else 128
    return max(step, -(-n_tokens // step) * step)


def pack_window(longest: int) -> int:
    """Attention window of a packed stream whose longest row has `longest` tokens: PACK_CHUNK
    times a power of two, at least `longest` - 1 (few shapes to compile)."""
    window = PACK_CHUNK
    while window < longest - 1:
        window *= 2
    return window


def packed_layout(
    lengths: Sequence[int], answers: Sequence[int], rows: int, length: int, k: int
) -> dict[str, np.ndarray]:
    """The `pack` and `pack_window` fields (see spot/backbones/base.py) of a stream holding
    contexts of these `lengths` (cut to `length`) and `answers` answer tokens per row, when
    packing costs at most PACK_GAIN of the padded layout (`rows` rows of `length` + `k`
    columns); else {}."""
    tokens = [min(n, length) + a for n, a in zip(lengths, answers, strict=True)]
    slots, window = pack_slots(sum(tokens)), pack_window(max(tokens))
    if packed_cost(slots, window) > PACK_GAIN * layout_cost(rows, length + k):
        return {}
    return {"pack": np.zeros(slots, np.int8), "pack_window": np.zeros(window, np.int8)}


def make_batch(
    encoded: Encoded, rows: Sequence[int], pad_id: int, bucket: int = 16, max_length: int = 128,
    batch_size: int | None = None, pack: bool = False,
) -> dict[str, np.ndarray]:
    """Rows of `encoded` -> a left-padded batch; padded with empty rows up to `batch_size`.

    With `pack`, when that saves a tenth of the cost (token columns plus attention, see
    `packed_layout`), the batch also carries `pack` and `pack_window`: zeros whose lengths are
    the static size of a packed stream that holds every real context token plus each row's
    longest answer, and its attention window (see `Backbone.packing`). The padded layout is then
    always `max_length` wide, so a packed step compiles once per (stream size, window) only.
    """
    size = batch_size or len(rows)
    length = bucket_length(max(len(encoded.contexts[r]) for r in rows), bucket, max_length)
    packing = {}
    if pack:
        answers = encoded.choice_mask[list(rows)].sum(axis=-1).max(axis=-1)
        packing = packed_layout([len(encoded.contexts[r]) for r in rows], answers.tolist(), size,
                                length, encoded.choices.shape[-1])
        length = max_length if packing else length
    tokens = np.full((size, length), pad_id, np.int32)
    mask = np.zeros((size, length), np.int32)
    for i, r in enumerate(rows):
        context = encoded.contexts[r][-length:]
        tokens[i, length - len(context) :] = context
        mask[i, length - len(context) :] = 1
    index = np.zeros(size, np.int64)
    index[: len(rows)] = rows
    choice_mask = encoded.choice_mask[index].copy()
    choice_mask[len(rows) :] = 0
    labels = encoded.labels[index].copy()
    labels[len(rows) :] = 0
    labels = np.maximum(labels, 0)
    batch = {
        "tokens": tokens,
        "mask": mask,
        "choices": encoded.choices[index],
        "choice_mask": choice_mask,
        "labels": labels,
    }
    return batch | packing


def eval_batches(
    encoded: Encoded, batch_size: int, pad_id: int, bucket: int = 16, max_length: int = 128,
    pack: bool = False,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Length-sorted full-size batches covering every row once: yields (row ids, batch)."""
    order = np.argsort([len(c) for c in encoded.contexts], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, make_batch(encoded, rows, pad_id, bucket, max_length, batch_size, pack)


def train_rows(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Row ids of training step `step`: epochs of seeded permutations, a pure function of step."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[offset * batch_size : (offset + 1) * batch_size]
