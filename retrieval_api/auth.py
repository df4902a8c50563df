"""Bearer tokens: loaded from SPOT_API_TOKENS (comma separated) or a file (one per line)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

TOKENS_ENV = "SPOT_API_TOKENS"


def load_tokens(file: str | os.PathLike[str] | None = None) -> frozenset[str]:
    """Tokens from `file` (blank lines and `#` comments ignored) if given, else from SPOT_API_TOKENS."""
    if file is not None:
        lines = Path(file).read_text().splitlines()
        return frozenset(
            line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
        )
    return frozenset(
        token.strip() for token in os.environ.get(TOKENS_ENV, "").split(",") if token.strip()
    )


def token_ok(presented: str, tokens: Iterable[str]) -> bool:
    """Whether `presented` is one of `tokens`, compared in constant time."""
    return any(hmac.compare_digest(presented.encode(), token.encode()) for token in tokens)
