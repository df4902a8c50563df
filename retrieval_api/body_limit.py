"""Refuse request bodies over a size limit with a JSON 413, whether announced or streamed.

Nothing is checked until the app reads the body, so a route's dependencies (the bearer token)
answer first, and a route may lower its own limit (`lower_body_limit`) before reading.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_SCOPE_KEY = "spot.body_limit"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class _Limit:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes


def lower_body_limit(request: Request, max_bytes: int) -> None:
    """Lower this request's body limit to `max_bytes` (call before reading the body)."""
    limit: _Limit = request.scope[_SCOPE_KEY]
    limit.max_bytes = min(limit.max_bytes, max_bytes)


class BodyLimitMiddleware:
    """On the app's first read of the body, raises BodyTooLarge (an HTTPException, so the app's
    JSON error handler answers it) if Content-Length is over the limit; afterwards counts the
    bytes received and raises once they go over."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = scope[_SCOPE_KEY] = _Limit(self.max_bytes)
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > limit.max_bytes:
                raise BodyTooLarge(limit.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    raise BodyTooLarge(limit.max_bytes)
            return message

        await self.app(scope, limited, send)
