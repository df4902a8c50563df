"""Batch planning for `spot.predict.Predictor`: grouping rows by compiled shape, the cost model
that cuts each group into batches (padded or packed layout, plus a fixed cost per pass), and
building one batch's arrays (see `spot.predict` for the whole scheme)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from spot.batching import bucket_length, layout_cost, packed_cost, packed_layout

ANSWER_BUCKET = 4  # multi-token answers are padded to a multiple of this many tokens
CALL_COST = 16.0  # a forward pass's fixed cost in token-columns (dispatch, answer logits)


@dataclasses.dataclass
class _Row:
    prompt: np.ndarray  # [L, d]
    context: np.ndarray  # int32 token ids (last max_length)
    answers: list[list[int]]  # per choice: token ids


def _row_bucket(n: int, batch_size: int) -> int:
    """Rows of a batch rounded up to a power of two, at most `batch_size`."""
    return min(batch_size, 1 << max(0, n - 1).bit_length())


def _prompt_groups(chunk: Sequence[_Row]) -> tuple[list[int], np.ndarray]:
    """(first row of each distinct prompt, each row's group) of a batch's rows."""
    group_of: dict[int, int] = {}  # id(prompt array) -> group
    first_rows: list[int] = []
    index = np.zeros(len(chunk), np.int32)
    for i, row in enumerate(chunk):
        if id(row.prompt) not in group_of:
            group_of[id(row.prompt)] = len(first_rows)
            first_rows.append(i)
        index[i] = group_of[id(row.prompt)]
    return first_rows, index


class _BatchPlanner:
    """The row planning of `Predictor` (its base class): uses its `backbone`, `batch_size`,
    `bucket`, `max_length`, `_use_states`, `_pack` and `_stacked_states`."""

    def _group_key(self, row: _Row) -> tuple[int, int, int]:
        k = max(len(a) for a in row.answers)
        if k == 1:  # one pass over the context whatever the number of choices
            return (row.prompt.shape[0], 0, 1)
        return (row.prompt.shape[0], len(row.answers), -(-k // ANSWER_BUCKET) * ANSWER_BUCKET)

    def _layout(self, chunk: Sequence[_Row], k: int) -> tuple[int, int, dict[str, np.ndarray]]:
        """(rows, context columns, packing fields or {}) of the batch holding `chunk`. It can
        pack with prompt states or one shared prompt; packed, the context is `max_length` wide
        (one compiled shape per stream size and window)."""
        size = self._rows_for(len(chunk))
        length = bucket_length(max(len(r.context) for r in chunk), self.bucket, self.max_length)
        packable = self._use_states or all(r.prompt is chunk[0].prompt for r in chunk)
        if not (self._pack and packable):
            return size, length, {}
        answers = [max(len(a) for a in r.answers) for r in chunk]
        packing = packed_layout([len(r.context) for r in chunk], answers, size, length, k)
        return size, self.max_length if packing else length, packing

    def _cuts(self, rows: Sequence[_Row], k: int) -> list[int]:
        """Batch boundaries [0, ..., len(rows)] over rows sorted by context length: the split
        into batches of at most `batch_size` rows that `spot.batching`'s cost model finds
        cheapest (dynamic programming), e.g. short rows packed apart from long padded ones."""
        best, cut = [0.0] + [math.inf] * len(rows), [0] * (len(rows) + 1)
        for end in range(1, len(rows) + 1):
            for start in range(max(0, end - self.batch_size), end):
                cost = self._cost(rows[start:end], k)
                if best[start] + cost < best[end]:
                    best[end], cut[end] = best[start] + cost, start
        bounds = [len(rows)]
        while bounds[-1]:
            bounds.append(cut[bounds[-1]])
        return bounds[::-1]

    def _cost(self, chunk: Sequence[_Row], k: int) -> float:
        """The cost model's price of one batch holding `chunk` (token-columns)."""
        size, length, packing = self._layout(chunk, k)
        if packing:
            return CALL_COST + packed_cost(len(packing["pack"]), len(packing["pack_window"]))
        return CALL_COST + layout_cost(size, length + k)

    def _rows_for(self, n: int) -> int:
        """Rows of a batch holding n requests (a power of two: few shapes compile)."""
        return _row_bucket(n, self.batch_size)

    def _make_batch(
        self, chunk: Sequence[_Row], k: int
    ) -> tuple[Any, dict[str, np.ndarray], int]:
        """The prompt, a left-padded batch (see spot.backbones.base) and its number of distinct
        prompts.

        With prefix states (decoder-only backbones, `prefix_cache`): the stacked states of the
        batch's distinct prompts and `prompt_index` (each row's); no prompt runs. Otherwise one
        [L, d] prompt when every row has the same one (the backbone then runs it once, as a
        shared prefix, where its fast path can), else per-row prompts [B, L, d]; when some rows
        share a prompt, the batch also names the groups (`prompt_rows`: first row of each
        distinct prompt, padded to a power of two; `prompt_index`: each row's group) so each
        distinct prompt runs once."""
        c = max(len(r.answers) for r in chunk)
        if k == 1:  # extra choices are free on the one-pass path: bucket them too
            c = 1 << (c - 1).bit_length()
        first_rows, groups = _prompt_groups(chunk)
        size, length, packing = self._layout(chunk, k)
        pad = self.backbone.pad_id
        tokens = np.full((size, length), pad, np.int32)
        mask = np.zeros((size, length), np.int32)
        choices = np.full((size, c, k), pad, np.int32)
        choice_mask = np.zeros((size, c, k), np.int32)
        for i, row in enumerate(chunk):
            context = row.context[-length:]
            tokens[i, length - len(context) :] = context
            mask[i, length - len(context) :] = 1
            for j, answer in enumerate(row.answers):
                choices[i, j, : len(answer)] = answer
                choice_mask[i, j, : len(answer)] = 1
        batch = {
            "tokens": tokens,
            "mask": mask,
            "choices": choices,
            "choice_mask": choice_mask,
            "labels": np.zeros(size, np.int32),
            **packing,
        }
        index = np.zeros(size, np.int32)  # padding rows: prompt 0 (they are fully masked)
        index[: len(chunk)] = groups
        if self._use_states:
            prompt = self._stacked_states([chunk[i].prompt for i in first_rows])
            batch["prompt_index"] = index
        elif len(first_rows) == 1:
            prompt = chunk[0].prompt
        else:  # per-row prompts; padding rows take any valid one
            prompt = np.stack([r.prompt for r in chunk] + [chunk[0].prompt] * (size - len(chunk)))
            if len(first_rows) < len(chunk):  # some rows share a prompt: name the groups
                rows = np.zeros(_row_bucket(len(first_rows), self.batch_size), np.int32)
                rows[: len(first_rows)] = first_rows  # padded to a power of two: few shapes
                batch["prompt_rows"], batch["prompt_index"] = rows, index
        return prompt, batch, len(first_rows)
