"""The retrieval service: a FastAPI app over one prompt library (`library.Library`).

Writes (publish, delete) need a bearer token; reads too unless `open_reads`. Every error is a
JSON body `{"error": message}`: 4xx for anything wrong with the request, 5xx only for damage
on the server side (a missing or altered prompt file).
"""

# No `from __future__ import annotations`: FastAPI must evaluate the closures' annotations,
# which refer to local variables (the bearer scheme).
import base64
import binascii
import json
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException

from library import EntryNotFound, IndexKind, Library, LibraryCorrupt, LibraryError, decode_prompt
from retrieval_api.auth import load_tokens, token_ok
from retrieval_api.batcher import QueryBatcher
from retrieval_api.body_limit import BodyLimitMiddleware
from retrieval_api.metrics import Metrics, MetricsMiddleware
from retrieval_api.schemas import (
    MAX_PAGE,
    DeleteOut,
    EntryList,
    EntryOut,
    ErrorOut,
    Health,
    PublishOut,
    QueryJSON,
    QueryOptions,
    QueryOut,
)

DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text}
    for status, text in (
        (400, "Malformed prompt, metadata or query"),
        (401, "Missing or invalid bearer token"),
        (404, "No such entry"),
        (413, "Request body too large"),
        (415, "Unsupported content type"),
        (422, "Request does not match the schema"),
        (500, "Library damaged on the server"),
    )
}
_QUERY_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": QueryJSON.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["prompt"],
                "properties": {
                    "prompt": {"type": "string", "format": "binary", "description": "prompt file"},
                    **QueryOptions.model_json_schema()[
                        "properties"
                    ],  # backbone defaults to the file's
                },
            }
        },
    },
}


def _error(
    status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": message} if detail is None else {"error": message, "detail": detail}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(errors: Iterable[Any]) -> JSONResponse:
    detail = [
        {
            "loc": list(e.get("loc", ())),
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in errors
    ]
    summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in detail)
    return _error(422, f"invalid request: {summary}", detail)


def _json_object(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise LibraryError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise LibraryError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _prompt_file(upload: Any, what: str) -> tuple[np.ndarray, dict[str, str]]:
    if not isinstance(upload, StarletteUploadFile):
        raise LibraryError(f"{what} must be an uploaded prompt file")
    try:
        return decode_prompt(upload.file.read())
    except LibraryError as err:
        raise LibraryError(f"{what}: {err}") from None


def _json_prompt(request: QueryJSON) -> np.ndarray:
    if (request.prompt is None) == (request.prompt_base64 is None):
        raise LibraryError(
            "give exactly one of 'prompt' (nested lists) or 'prompt_base64' (with 'shape')"
        )
    if request.prompt is not None:
        if len({len(row) for row in request.prompt}) > 1:
            raise LibraryError("prompt rows must all have the same length (d_model)")
        return np.array(request.prompt, dtype=np.float64)
    if request.shape is None:
        raise LibraryError("'prompt_base64' needs 'shape': [length, d_model]")
    try:
        data = base64.b64decode(request.prompt_base64, validate=True)
    except (binascii.Error, ValueError) as err:
        raise LibraryError(f"prompt_base64 is not valid base64: {err}") from None
    length, d_model = request.shape
    if length < 1 or d_model < 1 or len(data) != length * d_model * 4:
        raise LibraryError(
            f"prompt_base64 holds {len(data)} bytes, shape {request.shape} needs {max(length * d_model * 4, 0)} (float32)"
        )
    return np.frombuffer(data, dtype="<f4").reshape(length, d_model)


def create_app(
    library_dir: str | os.PathLike[str],
    *,
    tokens: Iterable[str] | None = None,
    open_reads: bool = True,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    index_kind: IndexKind = "flat",
) -> FastAPI:
    """The API over the library at `library_dir` (created if absent).

    `tokens` are the accepted bearer tokens; None reads them from SPOT_API_TOKENS. With no
    tokens at all, writes are refused. `open_reads=False` requires a token for reads too.
    """
    allowed = frozenset(tokens) if tokens is not None else load_tokens()
    library = Library(library_dir, index_kind=index_kind)
    metrics = Metrics()
    batcher = QueryBatcher(library)
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

    @app.exception_handler(EntryNotFound)
    async def not_found(_: Request, exc: EntryNotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(LibraryCorrupt)
    async def corrupt(_: Request, exc: LibraryCorrupt) -> JSONResponse:
        return _error(500, str(exc))

    @app.exception_handler(LibraryError)
    async def bad_input(_: Request, exc: LibraryError) -> JSONResponse:
        return _error(400, str(exc))

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

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.post("/v1/prompts", response_model=PublishOut, dependencies=writer, tags=["prompts"])
    def publish(
        key: Annotated[UploadFile, File(description="key prompt file (early checkpoint)")],
        value: Annotated[
            UploadFile | None, File(description="value prompt file (best checkpoint)")
        ] = None,
        metadata: Annotated[
            str | None, Form(description='JSON object, e.g. {"task": "rte", "backbone": "..."}')
        ] = None,
    ) -> PublishOut:
        """Publish a source task's key and value prompts (idempotent: same files, same ids)."""
        common = _json_object(metadata, "metadata")
        value_prompt = None if value is None else _prompt_file(value, "value")
        published = library.publish(_prompt_file(key, "key"), value_prompt, common)
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
        "/v1/prompts/{entry_id}", response_model=DeleteOut, dependencies=writer, tags=["prompts"]
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
        """Top-k keys most similar to a query prompt (JSON lists/base64, or a prompt-file upload)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if content_type == "multipart/form-data":
                form = await request.form()
                array, meta = _prompt_file(form.get("prompt"), "prompt")
                fields = {
                    name: form.get(name)
                    for name in ("backbone", "metric", "k")
                    if form.get(name) is not None
                }
                fields.setdefault("backbone", meta.get("backbone", ""))
                options = QueryOptions.model_validate(fields)
            elif content_type in ("application/json", ""):
                body = QueryJSON.model_validate_json(await request.body())
                array, options = _json_prompt(body), body
            else:
                raise HTTPException(
                    415, f"send application/json or multipart/form-data, not {content_type!r}"
                )
        except ValidationError as err:
            raise RequestValidationError(err.errors()) from None
        matches = await batcher.query(array, options.backbone, options.metric, options.k)
        found = [
            {"entry": EntryOut(**m.entry.to_dict()), "similarity": m.similarity} for m in matches
        ]
        return QueryOut(
            backbone=options.backbone, metric=options.metric, k=options.k, matches=found
        )

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        return Health(status="ok", entries=library.count(), backbones=library.backbones())

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"])
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
    index_kind: IndexKind = "flat",
    log_level: str = "info",
) -> None:
    """Serve the library with uvicorn (tokens from `tokens_file`, else SPOT_API_TOKENS)."""
    tokens = load_tokens(tokens_file)
    app = create_app(
        library_dir,
        tokens=tokens,
        open_reads=open_reads,
        max_upload_bytes=max_upload_bytes,
        index_kind=index_kind,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
