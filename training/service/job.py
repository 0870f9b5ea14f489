"""Inside the Ray job: `lorafleet train --job ID --registry URI`.

Read the stored training, fetch its dataset by digest, train with an observer that reports
progress, checkpoints and validation grids as job events, then publish with the lineage (dataset
digest, training id, tracking run ids) unless the training was cancelled meanwhile.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lorafleet.registry import AdapterRegistry

from ..checkpoint import latest_checkpoint
from ..config import TrainConfig
from ..loop import Interrupted, train
from ..observers import RunObserver, StepRecord
from ..publish import publish_result
from .datasets import DatasetStore
from .records import JobEvent, PublishedRef, TrainingRecords

WORK_DIR_ENV = "LORAFLEET_TRAINING_DIR"  # where jobs keep data and checkpoints (default: the temp dir)
PROGRESS_EVERY_S = 1.0
CANCEL_CHECK_EVERY_S = 2.0


class JobEvents(RunObserver):
    """Progress at most once a second (and at the last step), every checkpoint and validation grid;
    a cancelled training stops at the next step."""

    def __init__(self, records: TrainingRecords, training_id: str):
        self.records, self.training_id = records, training_id
        self.last_sent, self.last_cancel_check = 0.0, time.monotonic()
        self.pending_losses: list[float] = []
        existing = records.events(training_id)  # a retried job continues the stream
        self.next_seq = existing[-1].seq + 1 if existing else 0

    def on_step(self, record: StepRecord, state) -> None:
        self.pending_losses.append(round(record.loss, 6))
        clock = time.monotonic()
        if clock - self.last_sent >= PROGRESS_EVERY_S or record.step == record.max_steps:
            self.last_sent = clock
            self.send(JobEvent(seq=0, type="progress", step=record.step, max_steps=record.max_steps,
                                loss=record.loss, losses=self.pending_losses, learning_rate=record.learning_rate,
                                grad_norm=record.grad_norm, seconds=round(record.seconds, 2),
                                eta_s=round(record.eta_s, 1)))
            self.pending_losses = []
        if clock - self.last_cancel_check >= CANCEL_CHECK_EVERY_S:
            self.last_cancel_check = clock
            if self.records.read(self.training_id).cancel_requested:
                raise Interrupted(f"training {self.training_id} was cancelled")

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.send(JobEvent(seq=0, type="checkpoint", step=step))

    def on_validation(self, step: int, grid: Path, images: list[np.ndarray]) -> None:
        key = self.records.put_validation(self.training_id, step, grid)
        self.send(JobEvent(seq=0, type="validation", step=step, validation_key=key))

    def send(self, event: JobEvent) -> None:
        event.seq = self.next_seq
        self.next_seq = self.records.append_event(self.training_id, event).seq + 1


def run_training_job(training_id: str, registry_uri: str | None) -> dict:
    """Train and publish one stored training; returns the published manifest (as JSON)."""
    registry = AdapterRegistry(registry_uri)
    records = TrainingRecords(registry.store)
    record = records.read(training_id)
    events = JobEvents(records, training_id)
    try:
        work = Path(os.environ.get(WORK_DIR_ENV) or tempfile.gettempdir()) / "lorafleet-trainings" / training_id
        data = DatasetStore(registry.store).materialize(record.dataset, work / "data")
        config = TrainConfig.model_validate({**record.config, "output_dir": str(work / "run"),
                                             "data": {**record.config["data"], "path": str(data)}})
        result = train(config, resume=latest_checkpoint(config.output_dir) is not None, observers=[events])
        if records.read(training_id).cancel_requested:
            raise Interrupted(f"training {training_id} was cancelled; nothing is published")
        config.publish.aliases = list(record.publish.aliases)
        manifest = publish_result(result, config, registry, record.publish.name,
                                  lineage={"dataset": record.dataset, "training_id": training_id})
    except BaseException as exc:
        events.send(JobEvent(seq=0, type="failed", error=f"{type(exc).__name__}: {exc}"[:2000]))
        raise
    published = PublishedRef(adapter=f"{manifest.name}@{manifest.version}", name=manifest.name,
                             version=manifest.version, digest=manifest.digest)
    events.send(JobEvent(seq=0, type="published", step=result.state.step, published=published))
    return manifest.model_dump(mode="json")
