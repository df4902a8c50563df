"""Request and response bodies of the retrieval API (they define its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from library.similarity import DEFAULT_METRIC, METRICS

MAX_K = 1000
MAX_PAGE = 1000


class EntryOut(BaseModel):
    id: str
    task: str
    backbone: str
    role: Literal["key", "value"]
    step: int | None
    score: float | None
    metric: str | None
    init: str | None
    seed: int | None
    length: int
    d_model: int
    created: float
    sha256: str
    pair: str | None
    extra: dict[str, str]
    protocol: str | None = None  # a key's key protocol id


class EntryList(BaseModel):
    entries: list[EntryOut]
    total: int
    limit: int
    offset: int


class PublishOut(BaseModel):
    key: str
    value: str | None


class DeleteOut(BaseModel):
    deleted: list[str]


class MatchOut(BaseModel):
    entry: EntryOut
    similarity: float


class QueryOut(BaseModel):
    backbone: str
    metric: str
    k: int
    matches: list[MatchOut]
    protocol: str | None = Field(None, description="id of the key protocol searched")
    warning: str | None = None


class ProtocolOut(BaseModel):
    id: str
    default: bool
    protocol: dict[str, str | int | float]


class ProtocolList(BaseModel):
    protocols: list[ProtocolOut]


class ProtocolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    protocol: dict[str, str | int | float] = Field(description="the KeyProtocol's fields")
    start_base64: str = Field(max_length=2**24, description="the start prompt file, base64")
    default: bool = False


class Health(BaseModel):
    status: str
    entries: int | None = None  # None (left out) when reads are private
    backbones: dict[str, int] | None = None


class BackboneList(BaseModel):
    backbones: dict[str, int]


class ErrorOut(BaseModel):
    error: str
    detail: Any = None


class QueryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str = Field(min_length=1, description="backbone identity the keys were trained on")
    metric: Literal[METRICS] = DEFAULT_METRIC
    k: int = Field(10, ge=1, le=MAX_K)
    recipe: Literal["trained", "gradient"] | None = Field(
        None, description="key protocol recipe to search (default: the backbone's default)"
    )


class QueryJSON(QueryOptions):
    """A query prompt as nested lists, or as base64 of little-endian float32 bytes plus its shape."""

    prompt: list[Annotated[list[float], Field(min_length=1)]] | None = Field(
        None, min_length=1, description="[length][d_model] numbers"
    )
    prompt_base64: str | None = Field(None, description="row-major little-endian float32 bytes")
    shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=2, max_length=2, description="[length, d_model] of prompt_base64"
    )
