"""The retrieval service: a FastAPI app over one prompt library (`library.Library`).

Writes (publish, delete) need a bearer token; reads too unless `open_reads`. Every error is a
JSON body `{"error": message}` on a connection that stays open: 4xx for anything wrong with the
request, 403 for a write to a read-only library, 503 (with Retry-After) when the library stays
busy, 507 when its disk is full, 500 for damage on the server side. Tokens are checked before a
body is read, and a query body is bounded by what the library can answer (`limits.Limits`).
"""

# No `from __future__ import annotations`: FastAPI must evaluate the closures' annotations,
# which refer to local variables (the bearer scheme).
import base64
import binascii
import json
import logging
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from library import (
    EntryNotFound,
    IndexKind,
    Library,
    LibraryCorrupt,
    LibraryError,
)
from library.locks import LockTimeout
from library.protocol import KeyProtocol, ProtocolMismatch, check_start, start_bytes
from retrieval_api.auth import load_tokens, token_ok
from retrieval_api.batcher import QueryBatcher
from retrieval_api.body_limit import BodyLimitMiddleware, lower_body_limit
from retrieval_api.failures import READ_ONLY, FailureMiddleware, busy
from retrieval_api.limits import DEFAULT_MAX_PROMPT_LENGTH, DEFAULT_MAX_UPLOAD_BYTES, Limits
from retrieval_api.metrics import Metrics, MetricsMiddleware
from retrieval_api.openapi import _PUBLISH_BODY, _QUERY_BODY, ERRORS, _error, _validation_error
from retrieval_api.request_helpers import (
    KnownBackbones,
    _check_width,
    _json_prompt,
    _prompt_file,
    _publish,
    _scrubber,
    _writable,
)
from retrieval_api.schemas import (
    MAX_PAGE,
    BackboneList,
    DeleteOut,
    EntryList,
    EntryOut,
    Health,
    ProtocolIn,
    ProtocolList,
    ProtocolOut,
    PublishOut,
    QueryJSON,
    QueryOptions,
    QueryOut,
)

LOG = logging.getLogger("retrieval_api")
NO_PROTOCOL_WARNING = (
    "the keys of this backbone record no key protocol: similarities compare however each key "
    "was made"
)


def create_app(
    library_dir: str | os.PathLike[str],
    *,
    tokens: Iterable[str] | None = None,
    open_reads: bool = True,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    index_kind: IndexKind = "flat",
    read_only: bool = False,
    public_status: bool = False,
) -> FastAPI:
    """The API over the library at `library_dir` (created if absent, unless read-only).

    `tokens` are the accepted bearer tokens; None reads them from SPOT_API_TOKENS. With no
    tokens at all, writes are refused. `open_reads=False` requires a token for reads too, and
    then /healthz says only "ok" and /metrics needs a token, unless `public_status`.
    `read_only` (automatic when the library is not writable) refuses publish and delete.
    """
    allowed = frozenset(tokens) if tokens is not None else load_tokens()
    if not read_only and not _writable(Path(library_dir)):
        LOG.warning("%s is not writable: serving it read-only", library_dir)
        read_only = True
    library = Library(library_dir, index_kind=index_kind, read_only=read_only)
    limits = Limits(max_upload_bytes=max_upload_bytes, max_prompt_length=max_prompt_length)
    show_status = open_reads or public_status
    scrub = _scrubber(library.root)
    metrics = Metrics()
    batcher = QueryBatcher(library)
    known = KnownBackbones(library)
    bearer = HTTPBearer(
        auto_error=False, description="a token from SPOT_API_TOKENS or the token file"
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        library.close()

    app = FastAPI(
        title="SPoT prompt retrieval",
        description="Publish soft prompts and retrieve the source prompts most similar to a task's prompt.",
        version="1",
        responses=ERRORS,
        lifespan=lifespan,
    )
    app.add_middleware(FailureMiddleware)  # innermost: metrics count its answers
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: also counts 413s
    app.state.library = library

    def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if credentials is None:
            raise HTTPException(
                401,
                "missing bearer token (Authorization: Bearer <token>)",
                {"WWW-Authenticate": "Bearer"},
            )
        if not token_ok(credentials.credentials, allowed):
            raise HTTPException(
                401, "invalid bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )

    writer = [Depends(require_token)]
    reader = [] if open_reads else writer  # open reads declare no security in the schema either

    def writable() -> None:
        if read_only:
            raise HTTPException(403, READ_ONLY)

    writes = [*writer, Depends(writable)]

    @app.exception_handler(EntryNotFound)
    async def not_found(_: Request, exc: EntryNotFound) -> JSONResponse:
        return _error(404, scrub(str(exc)))

    @app.exception_handler(LibraryCorrupt)
    async def corrupt(_: Request, exc: LibraryCorrupt) -> JSONResponse:
        LOG.error("library damaged: %s", exc)
        return _error(500, scrub(str(exc)))

    @app.exception_handler(LockTimeout)
    async def locked(_: Request, exc: LockTimeout) -> JSONResponse:
        return busy(exc)

    @app.exception_handler(ProtocolMismatch)
    async def other_protocol(_: Request, exc: ProtocolMismatch) -> JSONResponse:
        return _error(409, scrub(str(exc)))

    @app.exception_handler(LibraryError)
    async def bad_input(_: Request, exc: LibraryError) -> JSONResponse:
        return _error(400, scrub(str(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette lists only the first matching route's methods
            path = request.url.path
            methods = {
                m
                for r in app.routes
                if isinstance(r, APIRoute) and r.path_regex.match(path)
                for m in r.methods
            }
            headers["Allow"] = ", ".join(sorted(methods))
        return _error(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc.errors())

    @app.post(
        "/v1/prompts",
        response_model=PublishOut,
        dependencies=writes,
        tags=["prompts"],
        openapi_extra={"requestBody": _PUBLISH_BODY},
    )
    async def publish(request: Request) -> PublishOut:
        """Publish a source task's key and value prompts (idempotent: same files, same ids)."""
        form = await request.form(max_files=2, max_fields=1)
        if form.get("key") is None:
            missing = {"loc": ("body", "key"), "msg": "Field required", "type": "missing"}
            raise RequestValidationError([missing])
        published = await run_in_threadpool(_publish, library, form, limits)
        return PublishOut(key=published.key, value=published.value)

    @app.get("/v1/prompts", response_model=EntryList, dependencies=reader, tags=["prompts"])
    def list_prompts(
        task: str | None = None,
        backbone: str | None = None,
        role: Literal["key", "value"] | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> EntryList:
        """Entries matching every given filter, oldest first."""
        entries = library.list(task=task, backbone=backbone, role=role, limit=limit, offset=offset)
        total = library.count(task=task, backbone=backbone, role=role)
        return EntryList(
            entries=[EntryOut(**e.to_dict()) for e in entries],
            total=total,
            limit=limit,
            offset=offset,
        )

    @app.get(
        "/v1/prompts/{entry_id}", response_model=EntryOut, dependencies=reader, tags=["prompts"]
    )
    def get_prompt(entry_id: str) -> EntryOut:
        return EntryOut(**library.get(entry_id).to_dict())

    @app.get(
        "/v1/prompts/{entry_id}/file",
        dependencies=reader,
        tags=["prompts"],
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "the prompt file"}
        },
    )
    def download(entry_id: str) -> Response:
        """The entry's prompt file (safetensors), byte for byte."""
        data = library.read_bytes(entry_id)
        headers = {"Content-Disposition": f'attachment; filename="{entry_id}.safetensors"'}
        return Response(data, media_type="application/octet-stream", headers=headers)

    @app.delete(
        "/v1/prompts/{entry_id}", response_model=DeleteOut, dependencies=writes, tags=["prompts"]
    )
    def delete(entry_id: str) -> DeleteOut:
        """Delete an entry together with its key/value pair."""
        return DeleteOut(deleted=library.delete(entry_id))

    @app.post(
        "/v1/query",
        response_model=QueryOut,
        dependencies=reader,
        tags=["query"],
        openapi_extra={"requestBody": _QUERY_BODY},
    )
    async def query(request: Request) -> QueryOut:
        """Top-k keys most similar to a query prompt (JSON lists/base64, or a prompt-file upload).

        The body may hold at most `max_prompt_length` rows of the widest backbone's d_model;
        it is parsed and checked off the event loop.
        """
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        widest = max((await known.get()).values(), default=0)
        lower_body_limit(request, limits.query_bytes(widest))
        try:
            if content_type == "multipart/form-data":
                array, options = await upload_query(request)
            elif content_type in ("application/json", ""):
                body = await run_in_threadpool(QueryJSON.model_validate_json, await request.body())
                d_model = await known.d_model(body.backbone, list_known=show_status)
                array = await run_in_threadpool(_json_prompt, body, d_model, limits)
                options = body
            else:
                raise HTTPException(
                    415, f"send application/json or multipart/form-data, not {content_type!r}"
                )
        except ValidationError as err:
            raise RequestValidationError(err.errors()) from None
        protocol = await run_in_threadpool(
            library.resolve_protocol, options.backbone, options.recipe
        )
        matches = await batcher.query(
            array, options.backbone, options.metric, options.k, options.recipe
        )
        found = [
            {"entry": EntryOut(**m.entry.to_dict()), "similarity": m.similarity} for m in matches
        ]
        return QueryOut(
            backbone=options.backbone, metric=options.metric, k=options.k, matches=found,
            protocol=None if protocol is None else protocol.id,
            warning=NO_PROTOCOL_WARNING if protocol is None else None,
        )

    async def upload_query(request: Request) -> tuple[np.ndarray, QueryOptions]:
        form = await request.form(max_files=1, max_fields=4)
        array, meta = await run_in_threadpool(_prompt_file, form.get("prompt"), "prompt", limits)
        fields = {
            name: form.get(name)
            for name in ("backbone", "metric", "k", "recipe")
            if form.get(name) is not None
        }
        fields.setdefault("backbone", meta.get("backbone", ""))
        options = QueryOptions.model_validate(fields)
        d_model = await known.d_model(options.backbone, list_known=show_status)
        _check_width(array.shape[1], d_model, options.backbone)
        return array, options

    @app.get("/v1/protocols", response_model=ProtocolList, dependencies=reader, tags=["protocols"])
    def list_protocols(backbone: str | None = None) -> ProtocolList:
        """The key protocols (how each backbone's keys are made), with each backbone's default."""
        return ProtocolList(protocols=[
            ProtocolOut(id=p.id, default=default, protocol=json.loads(p.to_json()))
            for p, default in library.protocols(backbone)
        ])

    @app.get(
        "/v1/protocols/{protocol_id}/start",
        dependencies=reader,
        tags=["protocols"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}},
                         "description": "the protocol's start prompt file"}},
    )
    def protocol_start(protocol_id: str) -> Response:
        """The start prompt file every key of the protocol begins from."""
        found = [p for p, _ in library.protocols() if p.id == protocol_id]
        if not found:
            raise EntryNotFound(f"no key protocol {protocol_id!r}")
        data = start_bytes(library.protocol_start(found[0]), found[0].backbone)
        return Response(data, media_type="application/octet-stream")

    @app.post(
        "/v1/protocols", response_model=ProtocolOut, dependencies=writes, tags=["protocols"]
    )
    def register_protocol(body: ProtocolIn) -> ProtocolOut:
        """Register how keys of a backbone and recipe are made (idempotent; 409 if the library
        holds another protocol for them)."""
        protocol = KeyProtocol.from_json(body.protocol)
        try:
            data = base64.b64decode(body.start_base64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise LibraryError(f"start_base64 is not base64: {err}") from None
        library.register_protocol(protocol, check_start(protocol, data), default=body.default)
        default = any(d for p, d in library.protocols(protocol.backbone) if p.id == protocol.id)
        return ProtocolOut(id=protocol.id, default=default,
                           protocol=json.loads(protocol.to_json()))

    @app.get("/v1/backbones", response_model=BackboneList, dependencies=reader, tags=["prompts"])
    def backbones() -> BackboneList:
        """Every backbone identity in the library, with its d_model."""
        return BackboneList(backbones=library.backbones())

    @app.get("/healthz", response_model=Health, response_model_exclude_none=True, tags=["service"])
    def healthz() -> Health:
        """Liveness; with open reads (or `public_status`) also the entry count and backbones."""
        if not show_status:
            return Health(status="ok")
        return Health(status="ok", entries=library.count(), backbones=library.backbones())

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        dependencies=[] if show_status else writer,
        tags=["service"],
    )
    def prometheus() -> str:
        """Prometheus metrics: requests by route and status, latency histograms, entries."""
        entries = {role: library.count(role=role) for role in ("key", "value")}
        return metrics.render(entries)

    return app


def run(
    library_dir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tokens_file: str | os.PathLike[str] | None = None,
    open_reads: bool = True,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    index_kind: IndexKind = "flat",
    read_only: bool = False,
    public_status: bool = False,
    log_level: str = "info",
) -> None:
    """Serve the library with uvicorn (tokens from `tokens_file`, else SPOT_API_TOKENS)."""
    tokens = load_tokens(tokens_file)
    app = create_app(
        library_dir,
        tokens=tokens,
        open_reads=open_reads,
        max_upload_bytes=max_upload_bytes,
        max_prompt_length=max_prompt_length,
        index_kind=index_kind,
        read_only=read_only,
        public_status=public_status,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
