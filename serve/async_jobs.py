"""Asynchronous generation: `POST /v1/generate` with `"async": true` (or `Prefer: respond-async`)
answers 202 with a job id at once; the gateway generates in the background and keeps the result
for `async_jobs.retention_s` in the registry's storage, so any gateway replica answers
`GET /v1/jobs/{id}`; an optional webhook is signed and retried like the training webhooks.

    jobs/<id>.json    state (queued, running, succeeded, failed), the result or the error
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from lorafleet.errors import ErrorKind, LorafleetError
from lorafleet.registry.storage import ObjectStore, PreconditionFailed
from lorafleet.training.service.outbound import OutboundTargets
from lorafleet.training.service.records import Delivery, Webhook
from lorafleet.training.service.webhooks import RetryPolicy, WebhookSender

PREFIX = "jobs/"
JOB_ID_PATTERN = r"job-[0-9a-f]{24}"
logger = logging.getLogger(__name__)


class JobNotFound(LorafleetError):
    code = "job_not_found"
    kind = ErrorKind.not_found


class AsyncJobSettings(BaseModel):
    retention_s: float = Field(3600.0, gt=0, description="How long a finished job's result is kept.")
    max_num_images: int = Field(16, ge=1, description="Most images per async request (sync: limits.max_num_images).")
    stale_after_s: float = Field(900.0, gt=0, description="A job still running this long after its last update "
                                 "(its gateway died) is reported failed.")


class JobState(BaseModel):
    """GET /v1/jobs/{id}."""

    id: str
    state: Literal["running", "succeeded", "failed"]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None
    result: dict[str, Any] | None = Field(None, description="The generate response, once succeeded.")
    error: dict[str, Any] | None = Field(None, description="The error body, once failed.")
    tenant: str | None = None
    webhook_url: str | None = None
    deliveries: list[Delivery] = Field(default_factory=list)


class JobAccepted(BaseModel):
    id: str
    state: str
    url: str = Field(description="Where to poll.")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class AsyncJobs:
    def __init__(self, store: ObjectStore, settings: AsyncJobSettings, outbound: OutboundTargets):
        self.store, self.settings, self.outbound = store, settings, outbound
        self.webhooks = WebhookSender(RetryPolicy(), self._log_delivery, outbound)
        self._secrets: dict[str, str] = {}  # job id -> webhook secret (never stored with the result)
        self._tasks: set[asyncio.Task] = set()

    def create(self, tenant: str | None, webhook: Webhook | None) -> JobState:
        """The job's record (blocking: storage); then ``start`` it on the event loop."""
        if webhook is not None:
            self.outbound.check(str(webhook.url), "webhook.url")
        now = _now()
        job = JobState(id="job-" + secrets.token_hex(12), state="running", created_at=now, updated_at=now,
                       tenant=tenant, webhook_url=str(webhook.url) if webhook else None)
        self.store.create(self._key(job.id), job.model_dump_json().encode())
        if webhook is not None:
            self._secrets[job.id] = webhook.secret
        return job

    def start(self, job_id: str, run: Callable[[], Awaitable[BaseModel]]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job_id, run))
        self._tasks.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job_id: str, run: Callable[[], Awaitable[BaseModel]]) -> None:
        try:
            response = await run()
            outcome = {"state": "succeeded", "result": json.loads(response.model_dump_json())}
        except LorafleetError as exc:
            outcome = {"state": "failed", "error": exc.to_dict()}
        except Exception as exc:  # the job must end in a state, whatever happened
            logger.exception("async job %s failed", job_id)
            outcome = {"state": "failed", "error": {"code": "internal", "message": str(exc), "field": None}}
        expires = _now() + timedelta(seconds=self.settings.retention_s)
        job = await asyncio.to_thread(self._update, job_id, lambda j: j.model_copy(update={
            **outcome, "updated_at": _now(), "expires_at": expires}))
        secret = self._secrets.pop(job_id, None)
        if job is not None and job.webhook_url and secret:
            body = {"job": json.loads(job.model_dump_json(exclude={"deliveries"}))}
            self.webhooks.send(job_id, job.webhook_url, secret, f"generation.{job.state}", body)

    def get(self, job_id: str, tenant: str | None) -> JobState:
        if not re.fullmatch(JOB_ID_PATTERN, job_id):
            raise JobNotFound(f"no job {job_id[:40]!r}", field="id")
        stored = self.store.read(self._key(job_id))
        job = JobState.model_validate_json(stored.data) if stored else None
        if job is None or (tenant is not None and job.tenant != tenant):
            raise JobNotFound(f"no job {job_id}", field="id")
        if job.expires_at is not None and job.expires_at < _now():
            self.store.delete(self._key(job_id))
            raise JobNotFound(f"job {job_id} expired (results are kept {self.settings.retention_s:g}s)", field="id")
        if job.state == "running" and _now() - job.updated_at > timedelta(seconds=self.settings.stale_after_s):
            return job.model_copy(update={"state": "failed", "error": {
                "code": "job_lost", "message": "the gateway running this job stopped", "field": None}})
        return job

    def _update(self, job_id: str, change: Callable[[JobState], JobState]) -> JobState | None:
        for _ in range(20):
            stored = self.store.read(self._key(job_id))
            if stored is None:
                return None
            job = change(JobState.model_validate_json(stored.data))
            try:
                self.store.compare_and_swap(self._key(job_id), job.model_dump_json().encode(), stored.token)
                return job
            except PreconditionFailed:
                continue
        return None

    def _log_delivery(self, job_id: str, delivery: Delivery) -> None:
        self._update(job_id, lambda j: j.model_copy(update={"deliveries": [*j.deliveries, delivery][-20:]}))

    def sweep(self) -> int:
        """Delete expired jobs; how many."""
        removed = 0
        for info in self.store.list(PREFIX):
            stored = self.store.read(info.key)
            if stored is None:
                continue
            job = JobState.model_validate_json(stored.data)
            if job.expires_at is not None and job.expires_at < _now():
                self.store.delete(info.key)
                removed += 1
        return removed

    @staticmethod
    def _key(job_id: str) -> str:
        return f"{PREFIX}{job_id}.json"

    def close(self) -> None:
        self.webhooks.close()
