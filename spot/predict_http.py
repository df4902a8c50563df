"""`POST /v1/predict` on any FastAPI app (e.g. `retrieval_api.create_app(...)`), backed by a
`spot.predict.Predictor`. This module imports JAX through `spot.predict`; `retrieval_api` never does.

Request body (JSON)::

    {"requests": [{"task": "sst2", "text": "Sentence: ...\\nThe sentiment of the sentence is"},
                  {"prompt_id": "<library entry id>", "text": "...", "choices": [" no", " yes"]}]}

Each item names exactly one of `prompt_id` / `task`; `text` is formatted like the task's
`Example.text` (see `spot.predict`). Response::

    {"predictions": [{"label": " positive", "index": 1, "scores": [-3.1, -0.7],
                      "choices": [" negative", " positive"], "prompt_id": "...", "task": "sst2"}]}

Errors are JSON `{"error": message}`: 404 unknown prompt id / no prompt for a task, 409 a prompt
of another backbone, 400 anything else the predictor refuses, 422 a body that does not match
the schema (in the app's own error format).
"""

# No `from __future__ import annotations`: FastAPI evaluates the endpoint's annotations.
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from spot.predict import (
    BackboneMismatch,
    Prediction,
    Predictor,
    PromptNotFound,
    Request,
    ServeError,
)

MAX_REQUESTS = 1024  # items per call
MAX_TEXT = 100_000  # characters per text
MAX_CHOICES = 64


class PredictItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_id: str | None = Field(
        None, min_length=1, max_length=128, description="library entry id"
    )
    task: str | None = Field(None, min_length=1, max_length=128, description="registered task name")
    text: str = Field(
        min_length=1, max_length=MAX_TEXT, description="input formatted like the task's examples"
    )
    choices: list[str] | None = Field(
        None, min_length=2, max_length=MAX_CHOICES, description="default: the task's verbaliser"
    )

    @model_validator(mode="after")
    def one_prompt(self) -> "PredictItem":
        if (self.prompt_id is None) == (self.task is None):
            raise ValueError("give exactly one of prompt_id or task")
        return self


class PredictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[PredictItem] = Field(min_length=1, max_length=MAX_REQUESTS)


class PredictionOut(BaseModel):
    label: str
    index: int
    scores: list[float]
    choices: list[str]
    prompt_id: str
    task: str | None


class PredictOut(BaseModel):
    predictions: list[PredictionOut]


def _status(error: ServeError) -> int:
    if isinstance(error, PromptNotFound):
        return 404
    if isinstance(error, BackboneMismatch):
        return 409
    return 400


def prediction_out(prediction: Prediction) -> dict[str, Any]:
    return {
        **prediction.to_dict(),
        "scores": list(prediction.scores),
        "choices": list(prediction.choices),
    }


def add_predict_route(app: FastAPI, predictor: Predictor, path: str = "/v1/predict") -> FastAPI:
    """Add `POST path` (batched prediction) to `app`; returns the app."""

    async def predict(body: PredictIn) -> Any:
        try:
            requests = [
                Request(
                    item.text,
                    item.prompt_id,
                    item.task,
                    None if item.choices is None else tuple(item.choices),
                )
                for item in body.requests
            ]
            # the forward passes block: keep them off the event loop
            predictions = await run_in_threadpool(predictor.predict, requests)
        except ServeError as error:
            return JSONResponse({"error": str(error)}, status_code=_status(error))
        return PredictOut(predictions=[PredictionOut(**prediction_out(p)) for p in predictions])

    app.add_api_route(
        path,
        predict,
        methods=["POST"],
        response_model=PredictOut,
        tags=["predict"],
        summary="Classify a batch of inputs, each with its own prompt or task",
        responses={
            status: {"description": text}
            for status, text in (
                (400, "Request the predictor cannot serve"),
                (404, "Unknown prompt id or task"),
                (409, "Prompt trained on another backbone"),
            )
        },
    )
    return app
