"""Durable training records and their jobs' event streams, in the registry's storage.

    trainings/records/<id>.json                 the record (the gateway writes it, compare-and-swap)
    trainings/active/<id>                       present while it is queued or running (what gateways poll)
    trainings/runs/<id>/events/<seq>.json       the job's events (the job writes them, create-once)
    trainings/runs/<id>/validation/<step>.png   validation grids (the job)

Nothing lives in a gateway's memory: a restarted gateway reads the records and carries on.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from lorafleet.registry.storage import ObjectExists, ObjectStore, PreconditionFailed

from ..errors import TrainingNotFound

RECORDS = "trainings/records/"
ACTIVE = "trainings/active/"
RUNS = "trainings/runs/"
ID_PATTERN = r"tr-[0-9a-f]{20}"
RECENT_LOSSES = 50
KEPT_DELIVERIES = 100


def now() -> datetime:
    return datetime.now(timezone.utc)


class TrainingState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TrainingState.succeeded, TrainingState.failed, TrainingState.cancelled)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_cpus: float = Field(1.0, ge=0, le=1024, description="CPUs the Ray job's entry point reserves.")
    num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs the Ray job's entry point reserves.")


class PublishTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Registry name of the new adapter.")
    aliases: list[str] = Field(default_factory=list, max_length=8, description="Aliases moved to the new version.")


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="Called with POST on every state change.")
    secret: str = Field(min_length=16, max_length=256, description="HMAC-SHA256 key; never shown again.")


class Transition(BaseModel):
    state: TrainingState
    at: datetime
    reason: str | None = None


class Delivery(BaseModel):
    """One webhook attempt."""

    id: str
    event: str
    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    delivered: bool = False


class ValidationRef(BaseModel):
    step: int
    key: str


class PublishedRef(BaseModel):
    adapter: str = Field(description="name@version")
    name: str
    version: int
    digest: str


class TrainingRecord(BaseModel):
    """Everything known about one training; the API shows it without the webhook secret."""

    id: str = Field(pattern=f"^{ID_PATTERN}$")
    state: TrainingState = TrainingState.queued
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    tenant: str | None = None
    config: dict[str, Any]
    dataset: str
    publish: PublishTarget
    resources: Resources = Field(default_factory=Resources)
    webhook: Webhook | None = None
    ray_job_id: str | None = None
    step: int = 0
    max_steps: int = 0
    losses: list[float] = Field(default_factory=list, description=f"The last {RECENT_LOSSES} step losses.")
    seconds: float = 0.0
    eta_s: float | None = None
    validation: ValidationRef | None = None
    published: PublishedRef | None = None
    error: str | None = None
    cancel_requested: bool = False
    events_folded: int = Field(0, description="Job events already folded into this record.")
    history: list[Transition] = Field(default_factory=list)
    deliveries: list[Delivery] = Field(default_factory=list)

    def moved(self, state: TrainingState, reason: str | None = None) -> "TrainingRecord":
        self.state, self.updated_at = state, now()
        self.history.append(Transition(state=state, at=self.updated_at, reason=reason))
        if state == TrainingState.running:
            self.started_at = self.updated_at
        if state.terminal:
            self.finished_at, self.eta_s = self.updated_at, None
        return self


class WebhookView(BaseModel):
    url: str


class ValidationView(BaseModel):
    step: int
    url: str = Field(description="The grid as PNG.")


class TrainingView(BaseModel):
    """A training as the API shows it: no webhook secret, no storage keys."""

    id: str
    state: TrainingState
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    tenant: str | None
    config: dict[str, Any]
    dataset: str
    publish: PublishTarget
    resources: Resources
    webhook: WebhookView | None
    ray_job_id: str | None
    step: int
    max_steps: int
    losses: list[float]
    seconds: float
    eta_s: float | None
    validation: ValidationView | None
    published: PublishedRef | None
    error: str | None
    cancel_requested: bool
    history: list[Transition]
    deliveries: list[Delivery]

    @classmethod
    def of(cls, record: TrainingRecord) -> "TrainingView":
        fields = record.model_dump(exclude={"webhook", "validation", "events_folded"})
        return cls(**fields, webhook=WebhookView(url=str(record.webhook.url)) if record.webhook else None,
                   validation=ValidationView(step=record.validation.step,
                                             url=f"/v1/trainings/{record.id}/validation.png")
                   if record.validation else None)


class JobEvent(BaseModel):
    """What the job reports (events/<seq>.json)."""

    seq: int
    type: Literal["progress", "checkpoint", "validation", "published", "failed"]
    at: datetime = Field(default_factory=now)
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    losses: list[float] = Field(default_factory=list)
    learning_rate: float | None = None
    grad_norm: float | None = None
    seconds: float | None = None
    eta_s: float | None = None
    validation_key: str | None = None
    published: PublishedRef | None = None
    error: str | None = None


def new_training_id() -> str:
    return "tr-" + secrets.token_hex(10)


class TrainingRecords:
    """Records (compare-and-swap) and event streams in one object store."""

    def __init__(self, store: ObjectStore):
        self.store = store

    # ------------------------------------------------------------------ records
    def create(self, record: TrainingRecord) -> TrainingRecord:
        record.history = record.history or [Transition(state=record.state, at=record.created_at)]
        if not record.state.terminal:
            self.store.create(f"{ACTIVE}{record.id}", b"")
        self.store.create(f"{RECORDS}{record.id}.json", record.model_dump_json().encode())
        return record

    def read(self, training_id: str) -> TrainingRecord:
        return self._read(training_id)[0]

    def _read(self, training_id: str) -> tuple[TrainingRecord, str]:
        stored = self.store.read(f"{RECORDS}{_checked(training_id)}.json")
        if stored is None:
            raise TrainingNotFound(f"no training {training_id}", field="id")
        return TrainingRecord.model_validate_json(stored.data), stored.token

    def update(self, training_id: str, change: Callable[[TrainingRecord], bool]) -> TrainingRecord | None:
        """Apply ``change`` (which returns whether it changed anything) with compare-and-swap,
        retrying on a concurrent write; the new record, or None when nothing changed."""
        for _ in range(20):
            record, token = self._read(training_id)
            if not change(record):
                return None
            record.updated_at = now()
            try:
                self.store.compare_and_swap(f"{RECORDS}{training_id}.json", record.model_dump_json().encode(), token)
                return record
            except PreconditionFailed:
                time.sleep(0.05)
        raise PreconditionFailed(f"training {training_id} kept changing; try again")

    def all(self) -> Iterator[TrainingRecord]:
        for info in self.store.list(RECORDS):
            stored = self.store.read(info.key)
            if stored is not None:
                yield TrainingRecord.model_validate_json(stored.data)

    def active(self) -> Iterator[TrainingRecord]:
        """Queued and running trainings only (a marker each; a stale marker is removed)."""
        for info in self.store.list(ACTIVE):
            training_id = info.key.rsplit("/", 1)[1]
            try:
                record = self.read(training_id)
            except TrainingNotFound:
                continue  # the marker is written first: its record is being created
            if record.state.terminal:
                self.finished(training_id)
            else:
                yield record

    def finished(self, training_id: str) -> None:
        self.store.delete(f"{ACTIVE}{training_id}")

    # ------------------------------------------------------------------ the job's side
    def append_event(self, training_id: str, event: JobEvent) -> JobEvent:
        """Add an event with the next free sequence number (create-once: never overwrites)."""
        seq = max(event.seq, 0)
        while True:
            event.seq = seq
            try:
                self.store.create(f"{RUNS}{training_id}/events/{seq:08d}.json", event.model_dump_json().encode())
                return event
            except ObjectExists:
                seq += 1

    def events(self, training_id: str, after: int = -1) -> list[JobEvent]:
        """Events with seq > ``after``, in order."""
        found = []
        for info in self.store.list(f"{RUNS}{_checked(training_id)}/events/"):
            seq = int(info.key.rsplit("/", 1)[1].split(".")[0])
            if seq > after:
                stored = self.store.read(info.key)
                if stored is not None:
                    found.append(JobEvent.model_validate_json(stored.data))
        return sorted(found, key=lambda e: e.seq)

    def put_validation(self, training_id: str, step: int, grid: Path) -> str:
        key = f"{RUNS}{training_id}/validation/{step:09d}.png"
        self.store.put_blob(key, grid)
        return key

    def validation_png(self, training_id: str, key: str) -> bytes | None:
        if not key.startswith(f"{RUNS}{_checked(training_id)}/validation/"):
            return None
        stored = self.store.read(key)
        return stored.data if stored else None


def _checked(training_id: str) -> str:
    if not re.fullmatch(ID_PATTERN, training_id or ""):
        raise TrainingNotFound(f"no training {training_id[:40]!r}", field="id")
    return training_id
