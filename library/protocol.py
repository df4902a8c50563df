"""Key protocols: how every key of one backbone in one library is made.

A task embedding (SPoT's "key") is only comparable with another made the same way: the same
shared start prompt, the same length, the same recipe with the same settings. A library records
one protocol per (backbone, recipe) and refuses keys made another way.

Recipes:
- "trained": `steps` optimizer steps from the shared start; the key is the prompt at that step
  (SPoT's own keys, with one start for every task);
- "gradient": the mean gradient of the training loss with respect to the shared start over
  `examples` training rows; no step is taken.
Either uses the `objective` "lm" (the gold answer's token cross-entropy, what training
minimises) or "choices" (cross-entropy of a softmax over the choices' scores, blind to how
likely the answer words are in general).

The start prompt is stored in the library as a prompt file named by its sha256 (`start`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from library.errors import LibraryError
from library.prompt_file import decode_prompt, encode_prompt

RECIPES = ("trained", "gradient")
OBJECTIVES = ("lm", "choices")  # the gold answer's token loss | a softmax over the choices
ID_LENGTH = 16


class ProtocolMismatch(LibraryError):
    """A key or protocol disagrees with the protocol the library holds for its backbone."""


@dataclasses.dataclass(frozen=True)
class KeyProtocol:
    """Everything that determines a key, given the task's training rows."""

    recipe: str  # one of RECIPES
    backbone: str  # backbone identity
    start: str  # sha256 of the start prompt's file bytes (`start_bytes`)
    prompt_length: int
    steps: int  # trained: optimizer steps; gradient: 0
    learning_rate: float  # trained only (0 for gradient)
    optimizer: str  # trained: "adafactor" | "adam"; gradient: "none"
    objective: str  # one of OBJECTIVES
    batch_size: int
    examples: int  # training rows the key sees (trained: steps x batch_size)
    max_length: int
    seed: int  # picks the rows (and the dropout keys of a trained key)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise LibraryError(f"unknown key recipe {self.recipe!r}; choose one of {RECIPES}")
        for name in ("prompt_length", "batch_size", "examples", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LibraryError(f"key protocol {name} must be a positive integer, got {value!r}")
        if self.objective not in OBJECTIVES:
            raise LibraryError(f"unknown key objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.recipe == "trained" and (self.steps < 1 or not self.learning_rate > 0):
            raise LibraryError("a trained key protocol needs steps >= 1 and learning_rate > 0")
        if self.recipe == "gradient" and (self.steps, self.learning_rate) != (0, 0.0):
            raise LibraryError("a gradient key protocol takes no step: steps=0, learning_rate=0")
        if not (isinstance(self.start, str) and len(self.start) == 64):
            raise LibraryError(f"key protocol start must be a sha256 hex digest, got {self.start!r}")

    @property
    def id(self) -> str:
        """A content hash of the canonical JSON: equal protocols have equal ids."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:ID_LENGTH]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> KeyProtocol:
        """Parse a protocol from its JSON (or dict); unknown or missing fields are errors."""
        try:
            raw = json.loads(text) if isinstance(text, str) else dict(text)
        except (TypeError, ValueError) as err:
            raise LibraryError(f"key protocol is not a JSON object: {err}") from None
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) != set(fields):
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise LibraryError(f"key protocol needs exactly the fields {sorted(fields)}, got {got}")
        kinds = {"str": str, "int": int, "float": (int, float)}
        for name, kind in fields.items():
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, kinds[kind]):
                raise LibraryError(f"key protocol field {name!r} must be {kind}, got {value!r}")
        raw["learning_rate"] = float(raw["learning_rate"])
        return cls(**raw)

    def differences(self, other: KeyProtocol) -> list[str]:
        """'field: ours != theirs' for every field that differs."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def start_bytes(start: Any, backbone: str) -> bytes:
    """The start prompt's canonical file bytes (its sha256 names it in a protocol)."""
    return encode_prompt(start, {"backbone": backbone, "task": "key-protocol-start"})


def start_sha256(start: Any, backbone: str) -> str:
    return hashlib.sha256(start_bytes(start, backbone)).hexdigest()


def check_start(protocol: KeyProtocol, data: bytes) -> np.ndarray:
    """The start prompt from its file bytes, checked against the protocol."""
    if hashlib.sha256(data).hexdigest() != protocol.start:
        raise ProtocolMismatch(f"start prompt bytes do not hash to the protocol's {protocol.start}")
    start, meta = decode_prompt(data)
    if meta.get("backbone") != protocol.backbone or start.shape[0] != protocol.prompt_length:
        raise ProtocolMismatch(
            f"start prompt is for {meta.get('backbone')} with length {start.shape[0]}; the "
            f"protocol says {protocol.backbone} with length {protocol.prompt_length}"
        )
    return start
