"""HTTP client of the retrieval service, with the same methods and results as `library.Library`."""

from __future__ import annotations

import base64
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from library import (
    DEFAULT_METRIC,
    Entry,
    EntryNotFound,
    KeyProtocol,
    LibraryError,
    Match,
    NoProtocolWarning,
    Published,
    check_prompt,
    decode_prompt,
    encode_prompt,
)
from library.atomic import atomic_write
from library.prompt_file import Metadata, metadata_strings
from library.protocol import ProtocolMismatch, check_start, start_bytes
from library.store import PromptLike, as_prompt

CONNECT_RETRIES = 3


class ApiError(LibraryError):
    """The service refused the request or failed; `status` is the HTTP status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class RetrievalClient:
    """A client of one retrieval service. Errors are `LibraryError`s, as with a local library."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # connection errors (refused, reset before a response) are retried: every call is
        # idempotent, publish included (ids are content hashes)
        transport = httpx.HTTPTransport(retries=CONNECT_RETRIES)
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, url, **kwargs)
        if response.is_success:
            return response
        try:
            message = str(response.json()["error"])
        except (ValueError, KeyError, TypeError):
            message = response.text or response.reason_phrase
        if response.status_code == 404:
            raise EntryNotFound(message)
        if response.status_code == 409:
            raise ProtocolMismatch(message)
        raise ApiError(response.status_code, message)

    @staticmethod
    def _entry_url(entry_id: str, suffix: str = "") -> str:
        return f"/v1/prompts/{quote(entry_id, safe='')}{suffix}"

    def publish(
        self,
        key: PromptLike,
        value: PromptLike | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Published:
        """Upload a key (and value) prompt; see `Library.publish`."""
        files = {
            "key": ("key.safetensors", encode_prompt(*as_prompt(key)), "application/octet-stream")
        }
        if value is not None:
            files["value"] = (
                "value.safetensors",
                encode_prompt(*as_prompt(value)),
                "application/octet-stream",
            )
        data = {"metadata": json.dumps(metadata_strings(metadata))}
        body = self._request("POST", "/v1/prompts", files=files, data=data).json()
        return Published(body["key"], body["value"])

    def list(
        self,
        *,
        task: str | None = None,
        backbone: str | None = None,
        role: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Entry]:
        """Entries matching every given filter, oldest first, one page at a time."""
        params = {
            "task": task,
            "backbone": backbone,
            "role": role,
            "limit": limit,
            "offset": offset,
        }
        body = self._request(
            "GET", "/v1/prompts", params={k: v for k, v in params.items() if v is not None}
        ).json()
        return [Entry(**entry) for entry in body["entries"]]

    def count(
        self, *, task: str | None = None, backbone: str | None = None, role: str | None = None
    ) -> int:
        """How many entries match every given filter."""
        params = {
            k: v
            for k, v in {"task": task, "backbone": backbone, "role": role}.items()
            if v is not None
        }
        return int(
            self._request("GET", "/v1/prompts", params={**params, "limit": 1}).json()["total"]
        )

    def get(self, entry_id: str) -> Entry:
        return Entry(**self._request("GET", self._entry_url(entry_id)).json())

    def backbones(self) -> dict[str, int]:
        """Every backbone identity in the library, with its d_model."""
        return self._request("GET", "/v1/backbones").json()["backbones"]

    def read_bytes(self, entry_id: str) -> bytes:
        """The entry's prompt file bytes (the server checks them against the manifest)."""
        return self._request("GET", self._entry_url(entry_id, "/file")).content

    def load(self, entry_id: str) -> tuple[np.ndarray, Metadata]:
        return decode_prompt(self.read_bytes(entry_id))

    def export(self, entry_id: str, path: str | os.PathLike[str]) -> Path:
        """Download the entry's prompt file to `path` (atomically)."""
        atomic_write(path, self.read_bytes(entry_id))
        return Path(path)

    def delete(self, entry_id: str) -> list[str]:
        """Delete an entry and its pair; returns the removed ids."""
        return self._request("DELETE", self._entry_url(entry_id)).json()["deleted"]

    def query(
        self, prompt: Any, backbone: str, metric: str = DEFAULT_METRIC, k: int = 10,
        recipe: str | None = None,
    ) -> list[Match]:
        """The `k` most similar keys; see `Library.query`."""
        array = check_prompt(prompt)
        body = {
            "prompt_base64": base64.b64encode(array.astype("<f4").tobytes()).decode(),
            "shape": list(array.shape),
            "backbone": backbone,
            "metric": metric,
            "k": k,
            "recipe": recipe,
        }
        answer = self._request("POST", "/v1/query", json=body).json()
        if answer.get("warning"):
            warnings.warn(answer["warning"], NoProtocolWarning, stacklevel=2)
        return [Match(Entry(**m["entry"]), m["similarity"]) for m in answer["matches"]]

    def protocols(self, backbone: str | None = None) -> list[tuple[KeyProtocol, bool]]:
        """The service library's key protocols; see `Library.protocols`."""
        params = {} if backbone is None else {"backbone": backbone}
        body = self._request("GET", "/v1/protocols", params=params).json()
        return [(KeyProtocol.from_json(p["protocol"]), p["default"]) for p in body["protocols"]]

    def resolve_protocol(self, backbone: str, recipe: str | None = None) -> KeyProtocol | None:
        """The protocol a query follows; see `Library.resolve_protocol`."""
        held = self.protocols(backbone)
        if recipe is None:
            return next((p for p, default in held if default), None)
        found = [p for p, _ in held if p.recipe == recipe]
        if not found:
            raise LibraryError(
                f"the service's library has no {recipe!r} key protocol for backbone {backbone}"
            )
        return found[0]

    def protocol_start(self, protocol: KeyProtocol) -> np.ndarray:
        """The protocol's start prompt, checked against the protocol's hash."""
        url = f"/v1/protocols/{quote(protocol.id, safe='')}/start"
        return check_start(protocol, self._request("GET", url).content)

    def protocol(
        self, backbone: str, recipe: str | None = None
    ) -> tuple[KeyProtocol, np.ndarray] | None:
        """The protocol a query follows and its start prompt; see `Library.protocol`."""
        protocol = self.resolve_protocol(backbone, recipe)
        return None if protocol is None else (protocol, self.protocol_start(protocol))

    def register_protocol(
        self, protocol: KeyProtocol, start: Any, *, default: bool = False
    ) -> KeyProtocol:
        """Register a key protocol with its start prompt; see `Library.register_protocol`."""
        body = {
            "protocol": json.loads(protocol.to_json()),
            "start_base64": base64.b64encode(start_bytes(start, protocol.backbone)).decode(),
            "default": default,
        }
        self._request("POST", "/v1/protocols", json=body)
        return protocol
