"""Unexpected failures as clean JSON answers that keep the connection alive.

Starlette's handler for `Exception` runs in its outermost middleware, which re-raises after
answering, and uvicorn then drops the connection. `FailureMiddleware` answers instead and
returns normally; a full disk is a 507, a read-only library a 403, a busy one a 503.
"""

from __future__ import annotations

import errno
import logging
import sqlite3

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from library.locks import LockTimeout

LOG = logging.getLogger("retrieval_api")
RETRY_AFTER_SECONDS = "1"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS,)
DISK_FULL = "insufficient storage: the library's disk is full; reads still work"
READ_ONLY = "the library is served read-only: publish and delete are disabled"


def busy(exc: LockTimeout) -> JSONResponse:
    """503 with Retry-After for a lock not granted in time."""
    return JSONResponse(
        {"error": f"service busy: {exc}"},
        status_code=503,
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def failure_response(exc: Exception) -> JSONResponse:
    """The answer to an exception no route handled: no paths, no internals."""
    text = str(exc).lower() if isinstance(exc, sqlite3.OperationalError) else ""
    code = exc.errno if isinstance(exc, OSError) else None
    if code in _FULL or "disk is full" in text:
        LOG.error("disk full: %s", exc)
        return JSONResponse({"error": DISK_FULL}, status_code=507)
    if code in _READ_ONLY or "readonly database" in text:
        return JSONResponse({"error": READ_ONLY}, status_code=403)
    if "database is locked" in text:
        return busy(LockTimeout("the manifest is locked by another writer"))
    LOG.exception("internal error", exc_info=exc)
    return JSONResponse({"error": "internal error (logged on the server)"}, status_code=500)


class FailureMiddleware:
    """Answers any exception raised before the response started, then returns normally."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:  # noqa: BLE001 - every failure gets an answer
            if started:
                raise
            await failure_response(exc)(scope, receive, send)
