"""OpenAPI declarations and JSON error responses of the retrieval service (`retrieval_api.app`)."""

from collections.abc import Iterable
from typing import Any

from fastapi.responses import JSONResponse

from retrieval_api.schemas import ErrorOut, QueryJSON, QueryOptions

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text}
    for status, text in (
        (400, "Malformed prompt, metadata or query"),
        (401, "Missing or invalid bearer token"),
        (403, "The library is served read-only"),
        (404, "No such entry"),
        (409, "A key protocol other than the library's for that backbone and recipe"),
        (413, "Request body too large"),
        (415, "Unsupported content type"),
        (422, "Request does not match the schema"),
        (500, "Library damaged on the server"),
        (503, "Library busy: retry after Retry-After seconds"),
        (507, "The library's disk is full"),
    )
}
_PUBLISH_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["key"],
                "properties": {
                    "key": {
                        "type": "string",
                        "format": "binary",
                        "description": "key prompt file (early checkpoint)",
                    },
                    "value": {
                        "type": "string",
                        "format": "binary",
                        "description": "value prompt file (best checkpoint)",
                    },
                    "metadata": {
                        "type": "string",
                        "description": 'JSON object, e.g. {"task": "rte", "backbone": "..."}',
                    },
                },
            }
        }
    },
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
