"""Per-request limits of the retrieval service, checked before the expensive work."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from library import LibraryError

DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20
DEFAULT_MAX_PROMPT_LENGTH = 1024
# A float32 value written by json.dumps takes at most 24 characters, plus ", ".
JSON_BYTES_PER_NUMBER = 26
QUERY_SLACK_BYTES = 2**20  # a prompt file's header, form fields and JSON punctuation


class LimitExceeded(LibraryError):
    """A request exceeds one of the service's limits (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold; every limit has a name the error messages use."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH
    max_metadata_fields: int = 64
    max_metadata_key: int = 128
    max_metadata_value: int = 4096

    def query_bytes(self, d_model: int) -> int:
        """The largest query body worth reading when the widest backbone has `d_model`."""
        numbers = self.max_prompt_length * d_model
        return min(self.max_upload_bytes, JSON_BYTES_PER_NUMBER * numbers + QUERY_SLACK_BYTES)

    def check_length(self, length: int, what: str) -> None:
        """Refuse a prompt longer than `max_prompt_length`."""
        if length > self.max_prompt_length:
            raise LimitExceeded(
                f"{what} has length {length}, over the limit max_prompt_length="
                f"{self.max_prompt_length}"
            )

    def check_metadata(self, metadata: Mapping[str, object], what: str) -> None:
        """Refuse metadata with too many fields, or a name or value that is too long."""
        if len(metadata) > self.max_metadata_fields:
            raise LimitExceeded(
                f"{what} has {len(metadata)} fields, over the limit max_metadata_fields="
                f"{self.max_metadata_fields}"
            )
        for name, value in metadata.items():
            if len(str(name)) > self.max_metadata_key:
                raise LimitExceeded(
                    f"{what} field name {str(name)[:40]!r}... is over the limit "
                    f"max_metadata_key={self.max_metadata_key} characters"
                )
            if len(str(value)) > self.max_metadata_value:
                raise LimitExceeded(
                    f"{what} field {str(name)!r} is over the limit max_metadata_value="
                    f"{self.max_metadata_value} characters"
                )
