"""Training routes (scope `train`): datasets in, trainings submitted, followed, cancelled.

    POST   /v1/datasets                      zip/tar (raw or multipart `file`), or JSON {"uri": ...} -> 201 report
    GET    /v1/datasets/{digest}             the report
    POST   /v1/trainings                     -> 202, queued as a Ray job
    GET    /v1/trainings[?state=&name=]      newest first
    GET    /v1/trainings/{id}                state, step, losses, ETA, validation, published, error, deliveries
    GET    /v1/trainings/{id}/events         server-sent events until the training ends
    GET    /v1/trainings/{id}/validation.png the latest validation grid
    DELETE /v1/trainings/{id}                cancel: the Ray job stops, nothing is published
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.training.errors import DatasetInvalid, TrainingNotFound, TrainingsUnavailable
from lorafleet.training.service.datasets import DIGEST_PATTERN, DatasetReport
from lorafleet.training.service.records import ID_PATTERN, TrainingState, TrainingView
from lorafleet.training.service.scheduler import TrainingRequest, TrainingService

from .uploads import body_to_file, multipart_file, upload_workdir

ARCHIVE_TYPES = ("application/zip", "application/x-tar", "application/gzip", "application/x-gzip",
                 "application/octet-stream")
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary", "description": "A zip or tar(.gz) of images and "
                     "captions (NAME.txt sidecars or metadata.jsonl)."}}}},
        **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in ARCHIVE_TYPES},
        "application/json": {"schema": {"type": "object", "required": ["uri"], "additionalProperties": False,
                                        "properties": {"uri": {"type": "string", "maxLength": 2048}}}},
    },
}
SSE_RESPONSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                      "description": "Server-sent events: state, progress, checkpoint, validation, published, "
                                     "failed; the stream ends with the training."}}
PNG_RESPONSE = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                      "description": "The latest validation grid."}}


class DatasetUri(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str = Field(max_length=2048)


def install_training_routes(app: FastAPI, trainings: TrainingService | None, scope: list, responses: dict,
                            caller_of) -> None:
    """``caller_of(request)`` says who calls: a tenant sees and submits only its own trainings."""

    def service() -> TrainingService:
        if trainings is None:
            raise TrainingsUnavailable("trainings are not enabled on this server (serve settings: trainings)")
        return trainings

    _install_dataset_routes(app, service, scope, responses)
    _install_trainings(app, service, scope, responses, caller_of)


def _install_dataset_routes(app: FastAPI, service, scope: list, responses: dict) -> None:
    digest_path = Path(pattern=f"^{DIGEST_PATTERN}$")

    @app.post("/v1/datasets", status_code=201, response_model=DatasetReport, responses=responses,
              dependencies=scope, openapi_extra={"requestBody": UPLOAD_BODY})
    async def upload_dataset(request: Request) -> DatasetReport:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            return await asyncio.to_thread(service().add_dataset_from_uri, _uri_of(await request.body()))
        with upload_workdir() as folder:
            body = await body_to_file(request.stream(), service().settings.max_upload_bytes, FilePath(folder))
            if kind == "multipart/form-data":
                body = await asyncio.to_thread(multipart_file, body, request.headers["content-type"],
                                               FilePath(folder))
            return await asyncio.to_thread(service().add_dataset, body)

    @app.get("/v1/datasets/{digest}", response_model=DatasetReport, responses=responses, dependencies=scope)
    async def show_dataset(digest: str = digest_path) -> DatasetReport:
        return await asyncio.to_thread(service().dataset, digest)


def _install_trainings(app: FastAPI, service, scope: list, responses: dict, caller_of) -> None:
    id_path = Path(pattern=f"^{ID_PATTERN}$")

    @app.post("/v1/trainings", status_code=202, response_model=TrainingView, responses=responses,
              dependencies=scope)
    async def submit_training(body: TrainingRequest, request: Request) -> JSONResponse:
        record = await asyncio.to_thread(service().submit, body, caller_of(request))
        return JSONResponse(TrainingView.of(record).model_dump(mode="json"), status_code=202,
                            headers={"Location": f"/v1/trainings/{record.id}"})

    @app.get("/v1/trainings", response_model=list[TrainingView], responses=responses, dependencies=scope)
    async def list_trainings(request: Request, state: TrainingState | None = None,
                             name: Annotated[str | None, Query(max_length=64)] = None,
                             limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[TrainingView]:
        records = await asyncio.to_thread(service().list, state, name, limit, caller_of(request).tenant)
        return [TrainingView.of(r) for r in records]

    @app.get("/v1/trainings/{training_id}", response_model=TrainingView, responses=responses, dependencies=scope)
    async def show_training(request: Request, training_id: str = id_path) -> TrainingView:
        return TrainingView.of(await asyncio.to_thread(service().get, training_id, caller_of(request).tenant))

    @app.delete("/v1/trainings/{training_id}", status_code=202, response_model=TrainingView, responses=responses,
                dependencies=scope)
    async def cancel_training(request: Request, training_id: str = id_path) -> TrainingView:
        return TrainingView.of(await asyncio.to_thread(service().cancel, training_id, caller_of(request).tenant))

    @app.get("/v1/trainings/{training_id}/validation.png", response_class=Response,
             responses={**PNG_RESPONSE, **responses}, dependencies=scope)
    async def validation_grid(request: Request, training_id: str = id_path) -> Response:
        png = await asyncio.to_thread(service().validation_png, training_id, caller_of(request).tenant)
        if png is None:
            raise TrainingNotFound(f"training {training_id} has no validation grid yet", field="id")
        return Response(png, media_type="image/png")

    @app.get("/v1/trainings/{training_id}/events", response_class=StreamingResponse,
             responses={**SSE_RESPONSE, **responses}, dependencies=scope)
    async def training_events(request: Request, training_id: str = id_path,
                              last_event_id: Annotated[str | None, Header(max_length=64)] = None):
        record = await asyncio.to_thread(service().get, training_id, caller_of(request).tenant)  # 404 first
        return StreamingResponse(_event_stream(service(), record.id, _cursor(last_event_id)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _uri_of(body: bytes) -> str:
    try:
        return DatasetUri.model_validate_json(body).uri
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise DatasetInvalid(f"expected {{\"uri\": \"s3://... or file://...\"}}: {first['msg']}",
                             field=field) from exc


def _cursor(last_event_id: str | None) -> tuple[int, int]:
    """Last-Event-ID 'STATES:EVENTS' -> (state transitions sent, job events sent)."""
    states, _, events = (last_event_id or "").partition(":")
    try:
        return max(0, int(states)), max(0, int(events))
    except ValueError:
        return 0, 0


def _sse(event: str, cursor: tuple[int, int], data: dict) -> bytes:
    return f"id: {cursor[0]}:{cursor[1]}\nevent: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


async def _event_stream(trainings: TrainingService, training_id: str, cursor: tuple[int, int]) -> AsyncIterator[bytes]:
    states_sent, events_sent = cursor
    while True:
        record = await asyncio.to_thread(trainings.get, training_id)
        for event in await asyncio.to_thread(trainings.events, training_id, events_sent - 1):
            events_sent = event.seq + 1
            yield _sse(event.type, (states_sent, events_sent), event.model_dump(mode="json", exclude_none=True))
        for transition in record.history[states_sent:]:
            states_sent += 1
            view = TrainingView.of(record).model_dump(mode="json")
            yield _sse("state", (states_sent, events_sent), {"state": transition.state.value,
                                                             "reason": transition.reason, "training": view})
        if record.state.terminal:
            return
        yield b": keep-alive\n\n"
        await asyncio.sleep(trainings.settings.poll_s)
