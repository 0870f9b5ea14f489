"""The training service: datasets in, trainings queued, run as Ray jobs, reconciled, announced.

State machine of a record (records.py), driven by ``tick`` in every gateway (compare-and-swap
makes concurrent gateways safe; the Ray submission id makes a repeated submit harmless):

    queued --(a slot is free, oldest first)--> running --(Ray SUCCEEDED, adapter published)--> succeeded
       |                                          |--(Ray FAILED, or the job vanished)-------> failed
       '--(cancel)--> cancelled <--(cancel: Ray job stopped)--'
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.registry.storage import ObjectStore

from ..config import TrainConfig
from ..errors import (
    DatasetNotFound,
    TrainingInputInvalid,
    TrainingNotFound,
    TrainingStateConflict,
    TrainingsUnavailable,
)
from .datasets import DatasetLimits, DatasetReport, DatasetStore, check_digest
from .outbound import OutboundTargets
from .records import (
    RECENT_LOSSES,
    JobEvent,
    PublishTarget,
    Resources,
    TrainingRecord,
    TrainingRecords,
    TrainingState,
    TrainingView,
    ValidationRef,
    Webhook,
    new_training_id,
    now,
)
from .runner import JobSpec, RayJobRunner, RayJobState
from .webhooks import RetryPolicy, WebhookSender

logger = logging.getLogger(__name__)
PLACEHOLDER_DATA = "/dataset-of-the-training"  # replaced by the stored dataset inside the job


class TrainingServiceSettings(BaseModel):
    """`trainings:` in the serve settings: REST trainings run as Ray jobs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ray_address: str | None = Field(None, description="Job server of the training Ray cluster (http://HEAD:8265); "
                                    "unset: the cluster `lorafleet serve` starts (with its job server).")
    ray_token_env: str = Field("LORAFLEET_TRAINING_RAY_TOKEN", description="Environment variable holding the "
                               "training cluster's Ray token (when set; else this process's own Ray token).")
    max_concurrent: int = Field(1, ge=1, le=1000, description="Training jobs running at once; the rest queue, "
                                "oldest first, a tenant with fewer running first.")
    poll_s: float = Field(1.0, gt=0, le=60, description="How often each gateway reconciles trainings with Ray.")
    vanished_grace_s: float = Field(120.0, ge=0, description="A running training whose Ray job is unknown this "
                                    "long after its start is failed (resubmitted before that).")
    max_upload_bytes: int = Field(1024**3, ge=1024, description="Largest dataset upload; 413 above.")
    max_dataset_files: int = Field(20_000, ge=1, description="Most files in a dataset archive.")
    max_unpacked_bytes: int = Field(4 * 1024**3, ge=1024, description="Most bytes a dataset archive unpacks to.")
    dataset_uri_prefixes: list[str] = Field(default_factory=list, description="URIs (s3://bucket/uploads/, "
                                            "file:///data/) the server may read datasets from; none by default.")
    default_resources: Resources = Field(default_factory=Resources)
    webhook_attempts: int = Field(5, ge=1, le=20, description="Deliveries tried per state change.")
    webhook_first_delay_s: float = Field(1.0, ge=0, le=600, description="Backoff before the 2nd attempt "
                                         "(doubling, at most 60 s).")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120)


class TrainingRequest(BaseModel):
    """POST /v1/trainings."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(description="A training config (the schema of `lorafleet train --print-config`);"
                                   " data.path and output_dir are set by the service.")
    dataset: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="Digest from POST /v1/datasets.")
    publish: PublishTarget | None = Field(None, description="Default: config.publish.")
    webhook: Webhook | None = None
    resources: Resources | None = Field(None, description="Default: the server's trainings.default_resources.")


def validated_config(tree: dict[str, Any]) -> TrainConfig:
    """The request's config as a TrainConfig (422 naming config.<field>)."""
    data = tree.get("data")
    if data is None:
        data = {}
    if isinstance(data, dict):  # anything else is refused by the schema, naming config.data
        data = {"path": PLACEHOLDER_DATA, **data}
    try:
        return TrainConfig.model_validate({**tree, "data": data})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "config." + ".".join(str(p) for p in first["loc"])
        raise TrainingInputInvalid(f"invalid training config: {field}: {first['msg']}", field=field) from exc
    except TrainingInputInvalid as exc:
        raise TrainingInputInvalid(exc.message, field=f"config.{exc.field}" if exc.field else "config") from exc


def starting_order(queued: list[TrainingRecord], running: Counter, free: int) -> list[TrainingRecord]:
    """The queued trainings to start in ``free`` slots: oldest first, but a tenant with fewer
    trainings running (counting those this call starts) goes before one with more."""
    running, waiting, chosen = Counter(running), list(queued), []
    while waiting and len(chosen) < free:
        record = min(waiting, key=lambda r: (running[r.tenant], r.created_at))
        waiting.remove(record)
        chosen.append(record)
        running[record.tenant] += 1
    return chosen


class TrainingService:
    def __init__(self, settings: TrainingServiceSettings, store: ObjectStore, registry_uri: str,
                 runner: RayJobRunner | None = None, outbound: OutboundTargets | None = None):
        self.settings = settings
        self.outbound = outbound or OutboundTargets()
        self.registry_uri = registry_uri
        self.records = TrainingRecords(store)
        self.datasets = DatasetStore(store, DatasetLimits(
            max_upload_bytes=settings.max_upload_bytes, max_files=settings.max_dataset_files,
            max_unpacked_bytes=settings.max_unpacked_bytes))
        self.runner = runner or (RayJobRunner(settings.ray_address, os.environ.get(settings.ray_token_env))
                                 if settings.ray_address else None)
        self.webhooks = WebhookSender(RetryPolicy(settings.webhook_attempts, settings.webhook_first_delay_s,
                                                  timeout_s=settings.webhook_timeout_s), self._record_delivery,
                                      self.outbound)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    # ------------------------------------------------------------------ datasets
    def add_dataset(self, archive: Path) -> DatasetReport:
        return self.datasets.ingest_archive(archive)

    def add_dataset_from_uri(self, uri: str) -> DatasetReport:
        return self.datasets.ingest_uri(uri, self.settings.dataset_uri_prefixes)

    def dataset(self, digest: str) -> DatasetReport:
        return self.datasets.report(check_digest(digest))

    # ------------------------------------------------------------------ trainings
    def submit(self, request: TrainingRequest, caller=None) -> TrainingRecord:
        """Queue a training; ``caller`` (a serve Caller: tenant and namespaces) must own the name."""
        config = validated_config(request.config)
        publish = request.publish or (PublishTarget(name=config.publish.name, aliases=config.publish.aliases)
                                      if config.publish.name else None)
        if publish is None:
            raise TrainingInputInvalid("name the adapter to publish: publish.name (or config.publish.name)",
                                       field="publish.name")
        if caller is not None and not caller.sees(publish.name):
            raise TrainingInputInvalid(f"{publish.name!r} is outside this tenant's namespaces "
                                       f"({', '.join(p + '*' for p in caller.namespaces)})", field="publish.name")
        if request.webhook is not None:
            self.outbound.check(str(request.webhook.url), "webhook.url")
        if config.tracking.mlflow_uri is not None:  # the job reports there from the training cluster
            self.outbound.check(config.tracking.mlflow_uri, "config.tracking.mlflow_uri")
        tenant = caller.tenant if caller is not None else None
        try:
            self.datasets.report(request.dataset)
        except DatasetNotFound as exc:
            raise TrainingInputInvalid(f"no dataset {request.dataset}; upload it with POST /v1/datasets",
                                       field="dataset") from exc
        stored = config.model_dump(mode="json", exclude={"output_dir"})
        stored["data"].pop("path")  # the job's own: the dataset, fetched by digest
        record = TrainingRecord(id=new_training_id(), tenant=tenant, config=stored,
                                dataset=request.dataset, publish=publish, max_steps=config.max_steps,
                                resources=request.resources or self.settings.default_resources,
                                webhook=request.webhook)
        self.records.create(record)
        self._announce(record)
        self.wake()
        return record

    def get(self, training_id: str, tenant: str | None = None) -> TrainingRecord:
        """The training; another tenant's is not found (``tenant`` None: an operator's view)."""
        record = self.records.read(training_id)
        if tenant is not None and record.tenant != tenant:
            raise TrainingNotFound(f"no training {training_id}", field="id")
        return record

    def list(self, state: TrainingState | None = None, name: str | None = None, limit: int = 100,
             tenant: str | None = None) -> list[TrainingRecord]:
        found = [r for r in self.records.all() if (state is None or r.state == state)
                 and (name is None or r.publish.name == name) and (tenant is None or r.tenant == tenant)]
        return sorted(found, key=lambda r: r.created_at, reverse=True)[:limit]

    def cancel(self, training_id: str, tenant: str | None = None) -> TrainingRecord:
        self.get(training_id, tenant)

        def request_cancel(record: TrainingRecord) -> bool:
            if record.state.terminal:
                raise TrainingStateConflict(f"training {training_id} is already {record.state.value}", field="id")
            if record.cancel_requested:
                return False
            record.cancel_requested = True
            return True

        self.records.update(training_id, request_cancel)
        self.tick()
        return self.records.read(training_id)

    def events(self, training_id: str, after: int = -1) -> list[JobEvent]:
        return self.records.events(training_id, after)

    def validation_png(self, training_id: str, tenant: str | None = None) -> bytes | None:
        record = self.get(training_id, tenant)
        return self.records.validation_png(training_id, record.validation.key) if record.validation else None

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        if self._thread is None and self.runner is not None:
            self._thread = threading.Thread(target=self._loop, name="lorafleet-trainings", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        if self._thread is not None:
            threading.Thread(target=self._tick_safely, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.webhooks.close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            self._tick_safely()

    def _tick_safely(self) -> None:
        try:
            self.tick()
        except TrainingsUnavailable as exc:  # the cluster is down or starting: the next tick retries
            logger.warning("reconciling trainings: %s", exc)
        except Exception:  # the loop must outlive a flaky store too; the next tick retries
            logger.warning("reconciling trainings failed", exc_info=True)

    def tick(self) -> None:
        """One pass: fold job events, reconcile running jobs with Ray, start queued ones."""
        if self.runner is None:
            return
        with self._tick_lock:
            active = list(self.records.active())
            reconciled = [self._reconcile(r) for r in active if r.state == TrainingState.running]
            running = Counter(r.tenant for r in reconciled if r is not None and r.state == TrainingState.running)
            queued = [r for r in active if r.state == TrainingState.queued]
            for record in [r for r in queued if r.cancel_requested]:
                self._move(record.id, TrainingState.queued, TrainingState.cancelled, "cancelled while queued")
            queued = [r for r in queued if not r.cancel_requested]
            free = self.settings.max_concurrent - sum(running.values())
            for record in starting_order(queued, running, free):
                self._start(record)  # claimed by another gateway: it runs there; the slot refills next tick

    def _start(self, record: TrainingRecord) -> bool:
        claimed = self._move(record.id, TrainingState.queued, TrainingState.running, "submitted as a Ray job",
                             ray_job_id=record.id)
        if claimed is None:
            return False  # another gateway took it
        self._submit(claimed)
        return True

    def _submit(self, record: TrainingRecord) -> None:
        spec = JobSpec(record.id, self.registry_uri, record.resources.num_cpus, record.resources.num_gpus)
        try:
            self.runner.submit(spec)
        except TrainingsUnavailable as exc:  # retried by the next tick (the job is unknown to Ray)
            logger.warning("submitting training %s failed: %s", record.id, exc)

    def _reconcile(self, record: TrainingRecord) -> TrainingRecord | None:
        record = self._fold_events(record)
        state = self.runner.state(record.ray_job_id or record.id)
        if state is None:
            return self._vanished(record)
        if state in (RayJobState.pending, RayJobState.running):
            if record.cancel_requested:
                self.runner.stop(record.ray_job_id or record.id)
            return record
        record = self._fold_events(record)
        if state == RayJobState.succeeded and record.published is not None:
            return self._move(record.id, TrainingState.running, TrainingState.succeeded,
                              f"published {record.published.adapter}")
        if record.cancel_requested:
            return self._move(record.id, TrainingState.running, TrainingState.cancelled,
                              "cancelled: the Ray job was stopped; nothing was published")
        error = record.error or self._failure(record, state)
        return self._move(record.id, TrainingState.running, TrainingState.failed, error, error=error)

    def _failure(self, record: TrainingRecord, state: RayJobState) -> str:
        if state == RayJobState.stopped:
            return "the Ray job was stopped outside lorafleet"
        if state == RayJobState.succeeded:
            return "the Ray job ended without publishing an adapter"
        tail = self.runner.logs_tail(record.ray_job_id or record.id, 1500).strip()
        return f"the Ray job failed: {tail.splitlines()[-1] if tail else 'no log'}"

    def _vanished(self, record: TrainingRecord) -> TrainingRecord | None:
        started = record.started_at or record.created_at
        if now() - started < timedelta(seconds=self.settings.vanished_grace_s):
            self._submit(record)  # claimed but never submitted (a crash, or the cluster was down)
            return record
        reason = f"its Ray job {record.ray_job_id} vanished from the cluster's job table (the cluster restarted?)"
        return self._move(record.id, TrainingState.running, TrainingState.failed, reason, error=reason)

    def _fold_events(self, record: TrainingRecord) -> TrainingRecord:
        events = self.records.events(record.id, after=record.events_folded - 1)
        if not events:
            return record

        def fold(current: TrainingRecord) -> bool:
            for event in (e for e in events if e.seq >= current.events_folded):
                _apply(current, event)
                current.events_folded = event.seq + 1
            return True

        return self.records.update(record.id, fold) or record

    def _move(self, training_id: str, expected: TrainingState, state: TrainingState, reason: str,
              **fields) -> TrainingRecord | None:
        def move(record: TrainingRecord) -> bool:
            if record.state != expected:
                return False
            for name, value in fields.items():
                setattr(record, name, value)
            record.moved(state, reason)
            return True

        moved = self.records.update(training_id, move)
        if moved is not None:
            if state.terminal:
                self.records.finished(training_id)
            self._announce(moved)
        return moved

    # ------------------------------------------------------------------ webhooks
    def _announce(self, record: TrainingRecord) -> None:
        if record.webhook is not None:
            self.webhooks.send(record.id, str(record.webhook.url), record.webhook.secret,
                               f"training.{record.state.value}", {"training": public_view(record)})

    def _record_delivery(self, training_id: str, delivery) -> None:
        def log(record: TrainingRecord) -> bool:
            record.deliveries = [*record.deliveries, delivery][-100:]
            return True

        self.records.update(training_id, log)


def _apply(record: TrainingRecord, event: JobEvent) -> None:
    if event.step is not None:
        record.step = event.step
    if event.max_steps is not None:
        record.max_steps = event.max_steps
    if event.losses:
        record.losses = (record.losses + event.losses)[-RECENT_LOSSES:]
    if event.seconds is not None:
        record.seconds = event.seconds
    if event.eta_s is not None:
        record.eta_s = event.eta_s
    if event.type == "validation" and event.validation_key:
        record.validation = ValidationRef(step=event.step or 0, key=event.validation_key)
    if event.type == "published" and event.published is not None:
        record.published = event.published
    if event.type == "failed" and event.error:
        record.error = event.error


def public_view(record: TrainingRecord) -> dict:
    return TrainingView.of(record).model_dump(mode="json")

