"""Prompt objects of a library: validated, merged with publish metadata and encoded (see
`library.store`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from library.errors import LibraryError
from library.prompt_file import (
    FIELDS,
    Metadata,
    check_prompt,
    encode_prompt,
    load_prompt,
    metadata_strings,
    typed_fields,
)
from library.protocol import KeyProtocol, ProtocolMismatch

PromptLike = np.ndarray | tuple[np.ndarray, Mapping[str, Any]] | str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class _Object:
    data: bytes
    sha256: str
    fields: dict[str, Any]  # typed known fields, plus `extra`


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def as_prompt(prompt: PromptLike) -> tuple[np.ndarray, Metadata]:
    """An array, (array, metadata) pair or prompt-file path -> validated (prompt, metadata)."""
    if isinstance(prompt, (str, os.PathLike)):
        return load_prompt(prompt)
    if isinstance(prompt, tuple):
        array, metadata = prompt
        return check_prompt(array), metadata_strings(metadata)
    return check_prompt(prompt), {}


def _prepare(prompt: PromptLike, role: str, common: Metadata) -> _Object:
    """Merge a prompt's own metadata with the publish metadata and encode its object file."""
    array, meta = as_prompt(prompt)
    for name, value in common.items():
        if meta.get(name, value) != value:
            raise LibraryError(
                f"{role} metadata {name!r}: the prompt says {meta[name]!r}, the request says {value!r}"
            )
        meta[name] = value
    if meta.get("role", role) != role:
        raise LibraryError(f"a prompt with role {meta['role']!r} was given as the {role}")
    meta["role"] = role
    for required in ("task", "backbone"):
        if not meta.get(required):
            raise LibraryError(f"{role} metadata must include a non-empty {required!r}")
    data = encode_prompt(array, meta)
    fields = {**typed_fields(meta), "length": array.shape[0], "d_model": array.shape[1]}
    fields["extra"] = {
        name: text for name, text in meta.items() if name not in FIELDS and name != "protocol"
    }
    fields["protocol"] = _key_protocol(meta, role, array.shape[0])
    return _Object(data, _sha256(data), fields)


def _key_protocol(meta: Metadata, role: str, length: int) -> KeyProtocol | None:
    """The protocol a key's metadata records (its JSON under "protocol"), checked against it."""
    if "protocol" not in meta:
        return None
    if role != "key":
        raise LibraryError(f"only keys record a key protocol, not a {role}")
    protocol = KeyProtocol.from_json(meta["protocol"])
    if protocol.backbone != meta["backbone"] or protocol.prompt_length != length:
        raise ProtocolMismatch(
            f"key of backbone {meta['backbone']} with length {length} names a protocol for "
            f"{protocol.backbone} with length {protocol.prompt_length}"
        )
    return protocol


def _entry_params(obj: _Object, entry_id: str, created: float) -> dict[str, Any]:
    fields = obj.fields
    return {
        **{
            name: fields.get(name)
            for name in (
                "task",
                "backbone",
                "role",
                "step",
                "score",
                "metric",
                "init",
                "seed",
            )
        },
        "id": entry_id,
        "sha256": obj.sha256,
        "length": fields["length"],
        "d_model": fields["d_model"],
        "created": created,
        "extra": json.dumps(fields["extra"], sort_keys=True),
        "protocol": fields["protocol"].id if fields["protocol"] is not None else None,
    }
