"""The project's one prompt file format, plus import/export of other prompt formats.

A prompt file is safetensors holding exactly one float32 tensor `prompt` [L, d] and string
metadata. Known fields (`FIELDS`) are typed and checked when writing and reading; any other
string field is kept as is. Bytes are canonical (sorted header, canonical numbers), so the
same prompt and metadata always give the same file and the same sha256.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from library.atomic import atomic_write
from library.errors import LibraryError

FORMAT = "spot-prompt"
FORMAT_VERSION = "1"
TENSOR = "prompt"
ROLES = ("key", "value", "query")
FIELDS: dict[str, type] = {
    "backbone": str,  # backbone identity, e.g. `llama-<config hash>-<weights hash>`
    "task": str,
    "role": str,  # one of ROLES
    "step": int,  # training step of the checkpoint
    "score": float,  # validation score of the checkpoint
    "metric": str,  # name of the validation metric
    "init": str,  # how the prompt was initialised
    "seed": int,
    "length": int,  # L, always equal to the tensor's shape
    "d_model": int,  # d, always equal to the tensor's shape
}
_FORMAT_FIELDS = ("format", "format_version")
_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}
_MAX_HEADER_BYTES = 1 << 20
_INT64 = (-(2**63), 2**63 - 1)  # integer fields are stored as SQLite INTEGER
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_TENSOR = "prompt_embeddings"
PEFT_SIDECAR = "spot_prompt.json"  # the prompt file's metadata beside an exported adapter

Metadata = dict[str, str]


class PromptFileError(LibraryError):
    """A prompt or prompt file is malformed (shape, dtype, non-finite values, metadata)."""


def check_prompt(array: Any) -> np.ndarray:
    """Validate a prompt: rank 2, non-empty, floating point, finite. Returns C-contiguous float32."""
    try:
        prompt = np.asarray(array)
    except (TypeError, ValueError) as err:
        raise PromptFileError(f"prompt is not a numeric array: {err}") from None
    if prompt.ndim != 2:
        raise PromptFileError(f"prompt must be [length, d_model], got shape {list(prompt.shape)}")
    if prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise PromptFileError(f"prompt must be non-empty, got shape {list(prompt.shape)}")
    if not np.issubdtype(prompt.dtype, np.floating):
        raise PromptFileError(f"prompt must be floating point, got dtype {prompt.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused below
        prompt = np.ascontiguousarray(prompt, dtype=np.float32)
    if not np.isfinite(prompt).all():
        raise PromptFileError(
            "prompt contains NaN or infinite values (or values beyond float32 range)"
        )
    return prompt


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates, e.g. from json.loads('"\\ud800"')
        return False
    return True


def _shown(value: Any) -> str:
    """A short rendering of a refused value (a huge integer has no cheap decimal form)."""
    if isinstance(value, (int, np.integer)) and abs(int(value)).bit_length() > 64:
        return f"a {abs(int(value)).bit_length()}-bit integer"
    return repr(str(value)[:40])


def _field_string(name: str, value: Any) -> str:
    """One metadata value as its canonical string, checked against its field type."""
    kind = FIELDS.get(name, str)
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (str, int, float, np.integer, np.floating)
    ):
        raise PromptFileError(
            f"metadata {name!r} must be a string or number, got {type(value).__name__}"
        )
    try:
        if kind is int:
            number = float(value) if isinstance(value, (float, np.floating)) else int(value)
            if number != int(number) or not _INT64[0] <= int(number) <= _INT64[1]:
                raise ValueError
            return str(int(number))
        if kind is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return repr(number)
    except (ValueError, OverflowError):
        raise PromptFileError(
            f"metadata {name!r} must be a finite {kind.__name__}"
            + (" within 64 bits" if kind is int else "")
            + f", got {_shown(value)}"
        ) from None
    text = str(value)
    if not _utf8(text):
        raise PromptFileError(f"metadata {name!r} is not valid UTF-8 text")
    if name == "role" and text not in ROLES:
        raise PromptFileError(f"metadata 'role' must be one of {ROLES}, got {text!r}")
    return text


def metadata_strings(metadata: Mapping[str, Any] | None) -> Metadata:
    """Canonical string metadata: typed fields checked, None values dropped, format fields removed."""
    out: Metadata = {}
    for name, value in (metadata or {}).items():
        if not isinstance(name, str) or not name or not _utf8(name):
            raise PromptFileError(f"metadata names must be non-empty strings, got {name!r}")
        if name in _FORMAT_FIELDS:
            if name == "format_version" and str(value) != FORMAT_VERSION:
                raise PromptFileError(
                    f"unsupported prompt file format_version {value!r} (this code reads {FORMAT_VERSION})"
                )
            continue
        if value is not None:
            out[name] = _field_string(name, value)
    return out


def typed_fields(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The known fields of canonical metadata as Python values (int/float/str)."""
    return {name: FIELDS[name](text) for name, text in metadata.items() if name in FIELDS}


def _full_metadata(prompt: np.ndarray, metadata: Mapping[str, Any] | None) -> Metadata:
    meta = metadata_strings(metadata)
    for name, size in (("length", prompt.shape[0]), ("d_model", prompt.shape[1])):
        if name in meta and int(meta[name]) != size:
            raise PromptFileError(
                f"metadata {name}={meta[name]} disagrees with prompt shape {list(prompt.shape)}"
            )
        meta[name] = str(size)
    meta["format"] = FORMAT
    meta["format_version"] = FORMAT_VERSION
    return dict(sorted(meta.items()))


def encode_prompt(array: Any, metadata: Mapping[str, Any] | None = None) -> bytes:
    """A prompt and its metadata as canonical prompt-file bytes."""
    prompt = check_prompt(array)
    header = {
        "__metadata__": _full_metadata(prompt, metadata),
        TENSOR: {
            "dtype": "F32",
            "shape": list(prompt.shape),
            "data_offsets": [0, prompt.nbytes],
        },
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + prompt.astype("<f4", copy=False).tobytes()


def decode_prompt(data: bytes) -> tuple[np.ndarray, Metadata]:
    """Parse and validate prompt-file bytes -> (float32 [L, d], metadata)."""
    if len(data) < 8:
        raise PromptFileError("not a safetensors file: shorter than its 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > _MAX_HEADER_BYTES or 8 + size > len(data):
        raise PromptFileError(
            f"not a safetensors file: header length {size} is invalid for {len(data)} bytes"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as err:  # also UnicodeDecodeError, and integers of over 4300 digits
        raise PromptFileError(f"not a safetensors file: header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise PromptFileError("not a safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PromptFileError("safetensors __metadata__ must map strings to strings")
    if set(header) != {TENSOR}:
        raise PromptFileError(
            f"a prompt file holds exactly one tensor {TENSOR!r}, found {sorted(header)}"
        )
    info = header[TENSOR]
    name = info.get("dtype") if isinstance(info, dict) else None
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise PromptFileError(f"tensor {TENSOR!r} must be F16, F32 or F64, got {info!r:.200}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(type(n) is int and n >= 0 for n in shape)  # JSON true is no size
    ):
        raise PromptFileError(f"prompt must be [length, d_model], got shape {shape!r:.200}")
    nbytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
    if offsets != [0, nbytes] or len(data) != 8 + size + nbytes:
        raise PromptFileError(
            f"tensor data does not match shape {shape} (offsets {offsets!r:.100}, file {len(data)} bytes)"
        )
    prompt = check_prompt(
        np.frombuffer(data, dtype=dtype, count=shape[0] * shape[1], offset=8 + size).reshape(shape)
    )
    meta = metadata_strings(metadata)
    _full_metadata(prompt, meta)  # length/d_model must agree with the shape
    return prompt, meta


def save_prompt(
    path: str | os.PathLike[str], array: Any, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write a prompt file atomically (temp file in the same directory, fsync, rename)."""
    atomic_write(path, encode_prompt(array, metadata))


def load_prompt(path: str | os.PathLike[str]) -> tuple[np.ndarray, Metadata]:
    """Read and validate a prompt file -> (float32 [L, d], metadata)."""
    try:
        data = Path(path).read_bytes()
        return decode_prompt(data)
    except OSError as err:
        raise PromptFileError(f"{path}: cannot read prompt file: {err.strerror or err}") from None
    except PromptFileError as err:
        raise PromptFileError(f"{path}: {err}") from None


def import_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """A prompt saved with `np.save` (e.g. Google's released prompts); pickled arrays are refused."""
    try:
        with open(path, "rb") as handle:
            if handle.read(6) != b"\x93NUMPY":
                raise ValueError("not a .npy file (no NumPy header)")
        return check_prompt(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as err:
        raise PromptFileError(f"{path}: cannot import .npy prompt: {err}") from None


def _peft_paths(path: Path) -> tuple[Path, Path]:
    weights = path / PEFT_WEIGHTS if path.is_dir() else path
    return weights, weights.parent / PEFT_CONFIG


def _peft_init(init: str | None) -> dict[str, str]:
    """PEFT's prompt_tuning_init fields for one of our init specs."""
    if init and init.startswith("text:"):
        return {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": init[5:]}
    return {"prompt_tuning_init": "SAMPLE_VOCAB" if init == "sampled_vocab" else "RANDOM"}


def _our_init(config: Mapping[str, Any]) -> str | None:
    init = config.get("prompt_tuning_init")
    if init == "TEXT" and config.get("prompt_tuning_init_text"):
        return f"text:{config['prompt_tuning_init_text']}"
    return {"SAMPLE_VOCAB": "sampled_vocab", "RANDOM": "random_uniform"}.get(init, init)


def import_peft(path: str | os.PathLike[str]) -> tuple[np.ndarray, Metadata]:
    """A PEFT prompt-tuning adapter (its directory or its adapter_model.safetensors) -> (prompt, metadata).

    The metadata of an adapter written by `export_peft` (its sidecar) comes back whole: task,
    step, backbone and the rest."""
    weights, config_path = _peft_paths(Path(path))
    sidecar = weights.parent / PEFT_SIDECAR
    try:
        config = json.loads(config_path.read_text())
        tensors = safetensors.numpy.load_file(weights)
        kept = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except (OSError, ValueError, TypeError) as err:
        raise PromptFileError(f"{path}: cannot read PEFT adapter: {err}") from None
    if not isinstance(kept, dict):
        raise PromptFileError(f"{sidecar}: expected a JSON object of prompt metadata")
    if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
        raise PromptFileError(
            f"{config_path}: peft_type must be PROMPT_TUNING, got {config.get('peft_type')!r}"
        )
    if config.get("num_transformer_submodules") not in (None, 1):
        raise PromptFileError(
            f"{config_path}: only encoder-side prompts are supported (num_transformer_submodules=1)"
        )
    if PEFT_TENSOR not in tensors:
        raise PromptFileError(f"{weights}: no tensor {PEFT_TENSOR!r} (found {sorted(tensors)})")
    prompt = check_prompt(tensors[PEFT_TENSOR])
    expected = [config.get("num_virtual_tokens"), config.get("token_dim")]
    if list(prompt.shape) != expected:
        raise PromptFileError(
            f"{weights}: prompt shape {list(prompt.shape)} disagrees with config {expected}"
        )
    metadata = {
        "init": _our_init(config),
        "peft_base_model": config.get("base_model_name_or_path"),
        **kept,
    }
    return prompt, metadata_strings(metadata)


def export_peft(
    array: Any,
    out_dir: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    task_type: str = "CAUSAL_LM",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a PEFT prompt-tuning adapter directory (adapter_model.safetensors + adapter_config.json).

    `metadata` (a prompt file's: task, step, backbone, ...) sets PEFT's init fields and is kept
    whole in a sidecar, spot_prompt.json, that `import_peft` reads back."""
    prompt = check_prompt(array)
    meta = metadata_strings(metadata)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": task_type,
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        **_peft_init(meta.get("init")),
        "base_model_name_or_path": base_model or meta.get("peft_base_model"),
        "inference_mode": True,
    }
    atomic_write(out / PEFT_WEIGHTS, safetensors.numpy.save({PEFT_TENSOR: prompt}))
    atomic_write(out / PEFT_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    if meta:
        atomic_write(out / PEFT_SIDECAR, (json.dumps(meta, indent=2) + "\n").encode())
    return out
