"""Predicting many tasks with one frozen backbone: mixed-task batches, prompt ensembles.

A request names a prompt (a library entry id, or a task name that resolves to a prompt) and
carries the input text **already formatted** the way the task's loader formats it (e.g. sst2:
``"Sentence: <s>\\nThe sentiment of the sentence is"``). Tasks in `spot.tasks` apply their
templates inside their loaders and do not expose them, so the server does not re-template raw
text; a client formats its input like the task's `Example.text` does. The candidate answers
come from the request (`choices`) or, when omitted, from the task's fixed verbaliser: the choice
tuple shared by every example of the task's test split (tasks whose choices vary per example,
such as copa, must send `choices`).

Batching. Requests are tokenized, then grouped by what fixes the compiled shape of the
backbone's jitted `score`: the prompt length L (prompts are never padded: the backbone gives
every prompt position full attention) and the answers' shape. Single-token answers are scored
from one pass over the context, so they share a group across tasks whatever their number of
choices (the choice axis is padded to a power of two with masked choices, dropped from the
result); multi-token answers repeat the context once per choice, so they group by (number of
choices, answer length rounded up to a multiple of 4).
Inside a group rows are sorted by context length and cut into batches of at most `batch_size`
rows where `spot.batching`'s cost model (padded or packed layout, plus a fixed cost per pass)
finds the split cheapest, so short rows do not pay for long ones' padding; the context is
left-padded to a multiple of `bucket` tokens and the row count rounded up to a power of two, so
few shapes ever compile. Each batch is ONE forward pass.

Prompt states. On a backbone with `prefix_fn` (decoder-only: under causal attention the keys and
values of [BOS] + prompt do not depend on what follows) each distinct prompt runs once, into
per-layer keys/values cached by content (`cache_size` entries; 0.97 MB for a 20-token SmolLM2
prompt: 30 layers x 21 positions x 3 kv heads x 64 x keys and values, fp32); a batch passes the
stacked states of its distinct prompts and each row's index, and its rows attend to them: no
prompt runs again. Such a batch also runs packed (`spot.batching`'s
cost model: one stream of its real tokens, each attending to its own row's prompt) where that
costs at most 4/5 of the padded layout. Without states (T5, `prefix_cache=False`): one `[L, d]`
prompt when all rows share it (run once, as a shared prefix, where the fast path can), else
per-row prompts `[B, L, d]` (see `spot.backbones.base`) plus the groups of rows that share a
prompt, so the Llama fast path runs each distinct prompt once per batch.

Prompts: `Predictor(backbone, library, prompts)`. A prompt id is a `library.Library` entry id; its
value is loaded once and kept in an in-memory LRU keyed by entry id. A task name resolves to the
explicit `prompts={task: array}` mapping given to the constructor first, else to the library's
best "value" entry for that task and this backbone (highest score; newest on ties). A prompt
whose metadata names another backbone than `backbone.identity` is refused (`BackboneMismatch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from spot.backbones.base import Backbone, BackboneError, check_prompt
from spot.predict_ensemble import EnsembleReport, combine, ensemble_report
from spot.predict_plan import _BatchPlanner, _Row, _row_bucket

__all__ = [
    "BackboneMismatch",
    "EnsemblePrediction",
    "EnsembleReport",
    "Prediction",
    "Predictor",
    "PromptNotFound",
    "Request",
    "ServeError",
    "combine",
    "ensemble_report",
]


class ServeError(ValueError):
    """A request the predictor cannot serve (bad input: maps to HTTP 400)."""


class PromptNotFound(ServeError):
    """No such library entry, or no prompt for a task on this backbone (HTTP 404)."""


class BackboneMismatch(ServeError):
    """A prompt was trained on another backbone than the one serving (HTTP 409)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One input to classify. Exactly one of `prompt_id` (library entry id) or `task` is set.

    `text` is already formatted like the task's `Example.text`; `choices` default to the
    task's verbaliser (for a prompt id: the task recorded in the entry's metadata).
    """

    text: str
    prompt_id: str | None = None
    task: str | None = None
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.prompt_id is None) == (self.task is None):
            raise ServeError("a request needs exactly one of prompt_id or task")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ServeError("request text must be a non-empty string")
        if self.choices is not None:
            choices = tuple(self.choices)
            object.__setattr__(self, "choices", choices)
            _check_choices(choices)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The predicted choice of one request, with every choice's summed log-likelihood."""

    label: str  # the predicted choice string
    index: int  # its index in `choices`
    scores: tuple[float, ...]  # log-likelihood of each choice given prompt + text
    choices: tuple[str, ...]
    prompt_id: str  # the library entry id used, or "task:<name>" for an explicit prompt
    task: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EnsemblePrediction:
    """N prompts' votes on one input.

    `index` is the majority vote (ties: the tied choice with the highest mean log-likelihood,
    then the lowest index); `mean_index` is the argmax of the mean log-likelihood over prompts.
    """

    index: int
    label: str
    mean_index: int
    mean_label: str
    votes: tuple[int, ...]  # per choice: how many prompts picked it
    mean_scores: tuple[float, ...]  # per choice: mean log-likelihood over the prompts
    member_indices: tuple[int, ...]  # per prompt: its own prediction
    choices: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Prompt:
    key: str  # entry id or "task:<name>"
    array: np.ndarray  # float32 [L, d]
    task: str | None


def _check_choices(choices: tuple[str, ...]) -> None:
    if len(choices) < 2 or len(set(choices)) != len(choices):
        raise ServeError(f"need >= 2 distinct choices, got {list(choices)!r}")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ServeError(f"choices must be non-empty strings, got {list(choices)!r}")


def _library(library: Any) -> Any:
    if library is None or not isinstance(library, (str, os.PathLike)):
        return library
    from library import Library

    return Library(library, create=False)


class Predictor(_BatchPlanner):
    """Rank-classification serving of many prompts/tasks from one frozen backbone.

    `library`: a `library.Library` (or its directory); `prompts`: explicit {task: [L, d] array
    or (array, metadata)} that take precedence over the library for task-name requests.
    `prefix_cache`: reuse each prompt's states (when the backbone can); `pack`: run a batch as
    one packed stream where that pays (states or one shared prompt). Thread-safe: the caches are
    locked; forward passes may run concurrently.
    """

    def __init__(
        self,
        backbone: Backbone,
        library: Any = None,
        prompts: Mapping[str, Any] | None = None,
        *,
        batch_size: int = 16,
        bucket: int = 16,
        max_length: int = 128,
        max_answer: int = 16,
        cache_size: int = 64,
        prefix_cache: bool = True,
        pack: bool = True,
    ) -> None:
        if backbone.tokenizer is None:
            raise ServeError(f"backbone {backbone.name} has no tokenizer: it cannot serve text")
        if batch_size < 1 or bucket < 1 or max_length < 1 or max_answer < 1 or cache_size < 1:
            raise ValueError("batch_size, bucket, max_length, max_answer, cache_size must be >= 1")
        self.backbone = backbone
        self.library = _library(library)
        self.batch_size = batch_size
        self.bucket = bucket
        self.max_length = max_length
        self.max_answer = max_answer
        self.cache_size = cache_size
        self._explicit = {
            task: self._explicit_prompt(task, p) for task, p in (prompts or {}).items()
        }
        self._cache: OrderedDict[str, _Prompt] = OrderedDict()
        self._use_states = prefix_cache and backbone.prefix_fn is not None
        self._pack = pack and backbone.packing
        self._states: OrderedDict[bytes, dict[str, np.ndarray]] = OrderedDict()
        self._choices: dict[str, tuple[str, ...] | None] = {}
        self._answer_ids: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self.stats = {"batches": 0, "rows": 0, "padded_rows": 0, "shared_prompt_batches": 0,
                      "grouped_prompt_batches": 0, "cache_hits": 0, "cache_misses": 0,
                      "prefix_state_batches": 0, "prefix_states_computed": 0,
                      "packed_batches": 0}

    # ---- prompts ---------------------------------------------------------------------------

    def _check_backbone(self, recorded: str | None, what: str) -> None:
        if recorded and recorded != self.backbone.identity:
            raise BackboneMismatch(
                f"{what} was trained on backbone {recorded}, this server runs "
                f"{self.backbone.identity} ({self.backbone.name})"
            )

    def _check(self, array: Any, meta: Mapping[str, str], what: str) -> np.ndarray:
        self._check_backbone(meta.get("backbone"), what)
        try:
            prompt = check_prompt(array, self.backbone.d_model)
        except BackboneError as error:
            raise ServeError(f"{what}: {error}") from None
        if prompt.ndim != 2 or prompt.shape[0] == 0:
            raise ServeError(f"{what}: a served prompt must be [L >= 1, d], got {prompt.shape}")
        return np.ascontiguousarray(prompt, np.float32)

    def _explicit_prompt(self, task: str, prompt: Any) -> _Prompt:
        array, meta = prompt if isinstance(prompt, tuple) else (prompt, {})
        return _Prompt(f"task:{task}", self._check(array, meta, f"prompt for task {task!r}"), task)

    def prompt(self, prompt_id: str) -> _Prompt:
        """The library entry `prompt_id`, checked against this backbone (LRU-cached)."""
        with self._lock:
            hit = self._cache.get(prompt_id)
            if hit is not None:
                self._cache.move_to_end(prompt_id)
                self.stats["cache_hits"] += 1
                return hit
        if self.library is None:
            raise PromptNotFound(f"no library to look up prompt id {prompt_id!r}")
        from library import EntryNotFound, LibraryCorrupt, LibraryError

        try:
            entry = self.library.get(prompt_id)
        except EntryNotFound:
            raise PromptNotFound(f"no library entry with id {prompt_id!r}") from None
        self._check_backbone(entry.backbone, f"entry {prompt_id}")  # before reading the file
        try:
            array, meta = self.library.load(prompt_id)
        except EntryNotFound:  # deleted meanwhile
            raise PromptNotFound(f"no library entry with id {prompt_id!r}") from None
        except LibraryCorrupt:  # server-side damage: not the request's fault
            raise
        except LibraryError as error:
            raise ServeError(f"entry {prompt_id}: {error}") from None
        loaded = _Prompt(entry.id, self._check(array, meta, f"entry {prompt_id}"), entry.task)
        with self._lock:
            self.stats["cache_misses"] += 1
            self._cache[prompt_id] = loaded
            self._cache.move_to_end(prompt_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return loaded

    def best_entry(self, task: str) -> str:
        """Id of the library's best "value" entry for `task` on this backbone."""
        if self.library is None:
            raise PromptNotFound(f"no prompt for task {task!r}: no explicit prompt and no library")
        best, best_rank, offset = None, None, 0
        while True:
            page = self.library.list(
                task=task, backbone=self.backbone.identity, role="value", limit=1000, offset=offset
            )
            for entry in page:
                score = (
                    entry.score
                    if entry.score is not None and math.isfinite(entry.score)
                    else -math.inf
                )
                rank = (score, entry.created)
                if best_rank is None or rank > best_rank:
                    best, best_rank = entry.id, rank
            if len(page) < 1000:
                break
            offset += len(page)
        if best is None:
            raise PromptNotFound(
                f"no value prompt for task {task!r} on backbone {self.backbone.identity} in the library"
            )
        return best

    def resolve(self, request: Request) -> _Prompt:
        """The prompt a request names (explicit mapping, then the library)."""
        if request.prompt_id is not None:
            return self.prompt(request.prompt_id)
        if request.task in self._explicit:
            return self._explicit[request.task]
        return self.prompt(self.best_entry(request.task))

    # ---- choices and tokens ----------------------------------------------------------------

    def task_choices(self, task: str) -> tuple[str, ...]:
        """The task's fixed verbaliser: the choice tuple shared by its whole test split."""
        if task not in self._choices:
            from spot.tasks import TaskError, get_task

            try:
                examples = get_task(task).load("test")
            except TaskError as error:
                raise ServeError(f"cannot infer choices of task {task!r}: {error}") from None
            found = {e.choices for e in examples}
            self._choices[task] = found.pop() if len(found) == 1 else None
        choices = self._choices[task]
        if choices is None:
            raise ServeError(
                f"task {task!r} has per-example choices: send `choices` with the request"
            )
        return choices

    def _answers(self, choices: Sequence[str]) -> list[list[int]]:
        """Token ids of each choice, as `spot.batching.encode` makes them (EOS, max_answer)."""
        backbone = self.backbone
        eos = [backbone.eos_id] if backbone.eos_after_choice and backbone.eos_id is not None else []
        missing = [c for c in choices if c not in self._answer_ids]
        if missing:
            encoded = backbone.tokenizer.encode_batch(missing, add_special_tokens=False)
            for choice, enc in zip(missing, encoded, strict=True):
                self._answer_ids[choice] = (list(enc.ids) + eos)[: self.max_answer]
        answers = [self._answer_ids[c] for c in choices]
        if any(not a for a in answers):
            raise ServeError(f"an answer choice tokenizes to nothing: {list(choices)!r}")
        return answers

    def _contexts(self, texts: Sequence[str]) -> list[np.ndarray]:
        encoded = self.backbone.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids[-self.max_length :], np.int32) for e in encoded]

    # ---- scoring ---------------------------------------------------------------------------

    def _score_rows(self, rows: Sequence[_Row]) -> list[np.ndarray]:
        """Per row: [n_choices] log-likelihoods. One forward pass per (group, batch)."""
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(self._group_key(row), []).append(i)
        out: list[np.ndarray | None] = [None] * len(rows)
        for (_, _, k), members in groups.items():
            members.sort(key=lambda i: len(rows[i].context))  # stable: similar lengths together
            bounds = self._cuts([rows[i] for i in members], k)
            for start, end in zip(bounds, bounds[1:], strict=False):
                chunk = [rows[i] for i in members[start:end]]
                scores = self._score_batch(chunk, k)
                for i, row, s in zip(members[start:end], chunk, scores, strict=True):
                    out[i] = s[: len(row.answers)]
        return out  # type: ignore[return-value]

    def _prefix_states(self, prompt: np.ndarray) -> dict[str, np.ndarray]:
        """The backbone's reusable states of `prompt` (LRU by content, `cache_size` entries)."""
        digest = hashlib.blake2b(prompt.tobytes(), digest_size=16).digest()
        with self._lock:
            hit = self._states.get(digest)
            if hit is not None:
                self._states.move_to_end(digest)
                return hit
        states = {k: np.asarray(v) for k, v in self.backbone.prefix_states(prompt).items()}
        with self._lock:
            self.stats["prefix_states_computed"] += 1
            self._states[digest] = states
            while len(self._states) > self.cache_size:
                self._states.popitem(last=False)
        return states

    def _stacked_states(self, prompts: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """States of the distinct prompts stacked [n, ...], n padded to a power of two."""
        states = [self._prefix_states(p) for p in prompts]
        states += states[:1] * (_row_bucket(len(states), self.batch_size) - len(states))
        return {key: np.stack([s[key] for s in states]) for key in states[0]}

    def _run(self, prompt: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
        """One forward pass: [B, n_choices] log-likelihoods."""
        return np.asarray(self.backbone.score(prompt, batch), np.float32)

    def _score_batch(self, chunk: Sequence[_Row], k: int) -> np.ndarray:
        prompt, batch, distinct = self._make_batch(chunk, k)
        scores = self._run(prompt, batch)
        with self._lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(chunk)
            self.stats["padded_rows"] += batch["tokens"].shape[0] - len(chunk)
            self.stats["shared_prompt_batches"] += int(distinct == 1)
            self.stats["grouped_prompt_batches"] += int(1 < distinct < len(chunk))
            self.stats["prefix_state_batches"] += int(isinstance(prompt, dict))
            self.stats["packed_batches"] += int("pack" in batch)
        return scores[: len(chunk)]

    # ---- public entry points ---------------------------------------------------------------

    def predict(self, requests: Iterable[Request]) -> list[Prediction]:
        """Classify every request; requests of any tasks/prompts are batched together."""
        requests = list(requests)
        if not requests:
            return []
        named: dict[tuple[str | None, str | None], _Prompt] = {}  # resolve each name once per call
        for r in requests:
            if (r.prompt_id, r.task) not in named:
                named[r.prompt_id, r.task] = self.resolve(r)
        resolved = [named[r.prompt_id, r.task] for r in requests]
        choice_sets = []
        for request, prompt in zip(requests, resolved, strict=True):
            if request.choices is not None:
                choice_sets.append(request.choices)
            elif prompt.task is None:
                raise ServeError(f"prompt {prompt.key} records no task: send `choices`")
            else:
                choice_sets.append(self.task_choices(prompt.task))
        contexts = self._contexts([r.text for r in requests])
        rows = [
            _Row(p.array, ctx, self._answers(ch))
            for p, ctx, ch in zip(resolved, contexts, choice_sets, strict=True)
        ]
        scores = self._score_rows(rows)
        predictions = []
        for request, prompt, choices, s in zip(
            requests, resolved, choice_sets, scores, strict=True
        ):
            index = int(np.argmax(s))
            predictions.append(
                Prediction(
                    choices[index],
                    index,
                    tuple(float(v) for v in s),
                    choices,
                    prompt.key,
                    prompt.task or request.task,
                )
            )
        return predictions

    def _prompt_array(self, prompt: Any) -> np.ndarray:
        if isinstance(prompt, str):
            return self.prompt(prompt).array
        array, meta = prompt if isinstance(prompt, tuple) else (prompt, {})
        return self._check(array, meta, "ensemble prompt")

    def ensemble_scores(self, examples: Sequence[Any], prompts: Sequence[Any]) -> np.ndarray:
        """[n_examples, n_prompts, n_choices] log-likelihoods.

        `examples` have `.text` (formatted) and `.choices` (one count for all); `prompts` are
        entry ids or [L, d] arrays. Each input is replicated once per prompt, one prompt per row,
        and all replicas are scored in the same batches.
        """
        if not prompts:
            raise ServeError("an ensemble needs at least one prompt")
        arrays = [self._prompt_array(p) for p in prompts]
        n_choices = {len(e.choices) for e in examples}
        if len(n_choices) > 1:
            raise ServeError(f"examples disagree on the number of choices: {sorted(n_choices)}")
        contexts = self._contexts([e.text for e in examples])
        rows = [
            _Row(a, ctx, self._answers(e.choices))
            for e, ctx in zip(examples, contexts, strict=True)
            for a in arrays
        ]
        scores = self._score_rows(rows)
        return np.asarray(scores, np.float32).reshape(len(examples), len(arrays), -1)

    def predict_ensemble(
        self, examples: Sequence[Any], prompts: Sequence[Any]
    ) -> list[EnsemblePrediction]:
        """Majority vote and mean log-likelihood of N prompts on each example."""
        scores = self.ensemble_scores(examples, prompts)
        out = []
        for example, s in zip(examples, scores, strict=True):
            vote, mean_index, votes, mean = combine(s)
            choices = tuple(example.choices)
            out.append(
                EnsemblePrediction(
                    vote,
                    choices[vote],
                    mean_index,
                    choices[mean_index],
                    tuple(int(v) for v in votes),
                    tuple(float(m) for m in mean),
                    tuple(int(i) for i in s.argmax(axis=1)),
                    choices,
                )
            )
        return out
