"""Request handling helpers of the retrieval service (`retrieval_api.app`): prompt uploads and
JSON query bodies decoded and checked, publishing, and what the service knows of its library."""

import base64
import binascii
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUploadFile

from library import Library, LibraryError, Published, decode_prompt
from retrieval_api.limits import Limits
from retrieval_api.schemas import QueryJSON

BACKBONES_TTL_SECONDS = 1.0


def _json_object(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:  # also integers of over 4300 digits
        raise LibraryError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise LibraryError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _prompt_file(upload: Any, what: str, limits: Limits) -> tuple[np.ndarray, dict[str, str]]:
    """An uploaded prompt file, decoded and checked against the limits (runs off the loop)."""
    if not isinstance(upload, StarletteUploadFile):
        raise LibraryError(f"{what} must be an uploaded prompt file")
    try:
        array, metadata = decode_prompt(upload.file.read())
    except LibraryError as err:
        raise LibraryError(f"{what}: {err}") from None
    limits.check_length(array.shape[0], what)
    limits.check_metadata(metadata, f"{what} metadata")
    return array, metadata


def _check_width(width: int, d_model: int, backbone: str) -> None:
    if width != d_model:
        raise LibraryError(f"query prompt has d_model {width}, backbone {backbone!r} has {d_model}")


def _json_prompt(request: QueryJSON, d_model: int, limits: Limits) -> np.ndarray:
    """The query prompt of a JSON body, its shape checked before it is converted."""
    if (request.prompt is None) == (request.prompt_base64 is None):
        raise LibraryError(
            "give exactly one of 'prompt' (nested lists) or 'prompt_base64' (with 'shape')"
        )
    if request.prompt is not None:
        limits.check_length(len(request.prompt), "query prompt")
        widths = {len(row) for row in request.prompt}
        if len(widths) > 1:
            raise LibraryError("prompt rows must all have the same length (d_model)")
        _check_width(widths.pop(), d_model, request.backbone)
        return np.array(request.prompt, dtype=np.float64)
    if request.shape is None:
        raise LibraryError("'prompt_base64' needs 'shape': [length, d_model]")
    length, width = request.shape
    limits.check_length(length, "query prompt")
    _check_width(width, d_model, request.backbone)
    try:
        data = base64.b64decode(request.prompt_base64, validate=True)
    except (binascii.Error, ValueError) as err:
        raise LibraryError(f"prompt_base64 is not valid base64: {err}") from None
    if len(data) != length * width * 4:
        raise LibraryError(
            f"prompt_base64 holds {len(data)} bytes, shape {request.shape} needs "
            f"{length * width * 4} (float32)"
        )
    return np.frombuffer(data, dtype="<f4").reshape(length, width)


def _publish(library: Library, form: FormData, limits: Limits) -> Published:
    """Decode, check and publish the prompt files of a publish form (runs off the loop)."""
    text = form.get("metadata")
    if text is not None and not isinstance(text, str):
        raise LibraryError("metadata must be a form field, not a file")
    common = _json_object(text, "metadata")
    limits.check_metadata(common, "metadata")
    key = _prompt_file(form.get("key"), "key", limits)
    value = form.get("value")
    value_prompt = None if value is None else _prompt_file(value, "value", limits)
    for _, metadata in [key] + ([] if value_prompt is None else [value_prompt]):
        limits.check_metadata({**metadata, **common}, "merged metadata")
    return library.publish(key, value_prompt, common)


def _scrubber(root: Path) -> Callable[[str], str]:
    """Removes the library's absolute location from messages (paths become library-relative)."""
    prefixes = sorted({f"{root}{os.sep}", f"{root.resolve()}{os.sep}"}, key=len, reverse=True)

    def scrub(message: str) -> str:
        for prefix in prefixes:
            message = message.replace(prefix, "")
        return message

    return scrub


def _writable(root: Path) -> bool:
    """Whether this process may write the library at `root` (or create it)."""
    manifest = root / "manifest.sqlite"
    if not root.exists():
        return True
    return os.access(root, os.W_OK) and (not manifest.exists() or os.access(manifest, os.W_OK))


class KnownBackbones:
    """The library's backbones and their d_model, re-read at most once per `ttl` seconds."""

    def __init__(self, library: Library, ttl: float = BACKBONES_TTL_SECONDS) -> None:
        self.library, self.ttl = library, ttl
        self._known: dict[str, int] = {}
        self._read_at = -float("inf")

    async def get(self, *, fresh: bool = False) -> dict[str, int]:
        if fresh or time.monotonic() - self._read_at > self.ttl:
            self._known = await run_in_threadpool(self.library.backbones)
            self._read_at = time.monotonic()
        return self._known

    async def d_model(self, backbone: str, *, list_known: bool) -> int:
        """The backbone's d_model; LibraryError naming the known ones (if `list_known`) if none."""
        known = await self.get()
        if backbone not in known:
            known = await self.get(fresh=True)
        if backbone not in known:
            listing = f"; this library has {sorted(known)}" if list_known else ""
            raise LibraryError(f"unknown backbone {backbone!r}{listing}")
        return known[backbone]
