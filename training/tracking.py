"""Experiment tracking as run observers: TensorBoard event files, and MLflow when configured.

Tracking never costs a run: an observer whose writer fails logs it once and stops tracking.
"""

from __future__ import annotations

# Imports inside functions: TensorBoard's writer and the mlflow client only when a run tracks.
import logging
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .observers import RunObserver, StepRecord

logger = logging.getLogger(__name__)
TENSORBOARD_DIR = "tensorboard"


class _Tolerant(RunObserver):
    """Runs each write; the first failure turns this tracker off (logged), the run goes on."""

    name = "tracking"

    def __init__(self):
        self.broken = False

    def _safely(self, write, *args) -> None:
        if self.broken:
            return
        try:
            write(*args)
        except Exception as exc:  # any tracking backend failure: never the run's
            self.broken = True
            logger.warning("%s stopped after an error: %s", self.name, exc, exc_info=True)


class TensorBoardTracker(_Tolerant):
    """Scalars loss, learning_rate, grad_norm per step and validation images, in ``folder``."""

    name = "TensorBoard"

    def __init__(self, folder: Path, log_every: int = 1):
        super().__init__()
        self.folder, self.log_every, self.writer = Path(folder), log_every, None

    def on_start(self, config, max_steps: int, first_step: int) -> None:
        self._safely(self._open)

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.folder))

    def on_step(self, record: StepRecord, state) -> None:
        if self.writer is not None and (record.step % self.log_every == 0 or record.step == record.max_steps):
            self._safely(self._scalars, record)

    def _scalars(self, record: StepRecord) -> None:
        self.writer.add_scalar("train/loss", record.loss, record.step)
        self.writer.add_scalar("train/learning_rate", record.learning_rate, record.step)
        self.writer.add_scalar("train/grad_norm", record.grad_norm, record.step)

    def on_validation(self, step: int, grid: Path, images: list[np.ndarray]) -> None:
        if self.writer is not None:
            self._safely(self._images, step, images)

    def _images(self, step: int, images: list[np.ndarray]) -> None:
        stacked = np.clip(np.stack(images), 0, 1)  # N, H, W, 3
        self.writer.add_images("validation", stacked, step, dataformats="NHWC")
        self.writer.flush()

    def lineage(self) -> dict[str, str]:
        return {"tensorboard_dir": str(self.folder)}

    def close(self) -> None:
        if self.writer is not None:
            self._safely(self.writer.close)
            self.writer = None


class MlflowTracker(_Tolerant):
    """One MLflow run per training run: the config as params, the scalars, the validation grids."""

    name = "MLflow"

    def __init__(self, uri: str, experiment: str, log_every: int = 1):
        super().__init__()
        self.uri, self.experiment, self.log_every = uri, experiment, log_every
        self.client, self.run_id = None, None

    def on_start(self, config, max_steps: int, first_step: int) -> None:
        self._safely(self._start, config)

    def _start(self, config: TrainConfig) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        run = self.client.create_run(experiment_id, tags={"lorafleet.method": config.method.value,
                                                          "lorafleet.base": config.base})
        self.run_id = run.info.run_id
        for key, value in sorted(_flat(config.model_dump(mode="json")).items())[:400]:
            self.client.log_param(self.run_id, key, str(value)[:500])

    def on_step(self, record: StepRecord, state) -> None:
        if self.run_id and (record.step % self.log_every == 0 or record.step == record.max_steps):
            self._safely(self._scalars, record)

    def _scalars(self, record: StepRecord) -> None:
        for key, value in (("loss", record.loss), ("learning_rate", record.learning_rate),
                           ("grad_norm", record.grad_norm)):
            self.client.log_metric(self.run_id, key, value, step=record.step)

    def on_validation(self, step: int, grid: Path, images: list[np.ndarray]) -> None:
        if self.run_id:
            self._safely(self.client.log_artifact, self.run_id, str(grid), "validation")

    def on_finish(self, result) -> None:
        if self.run_id:
            self._safely(self._finish, result)

    def _finish(self, result) -> None:
        for key, value in result.metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(self.run_id, f"final/{key}", float(value))
        self.client.set_terminated(self.run_id, "FINISHED")

    def lineage(self) -> dict[str, str]:
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.uri} if self.run_id else {}

    def close(self) -> None:
        if self.run_id and self.client is not None and not self.broken:
            run = self.client.get_run(self.run_id)
            if run.info.status == "RUNNING":  # the run failed or was stopped
                self._safely(self.client.set_terminated, self.run_id, "FAILED")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        else:
            flat[name] = value
    return flat


def tracking_observers(config: TrainConfig) -> list[RunObserver]:
    """The trackers a run's config asks for."""
    tracking = config.tracking
    observers: list[RunObserver] = []
    if tracking.tensorboard:
        observers.append(TensorBoardTracker(Path(config.output_dir) / TENSORBOARD_DIR, tracking.log_every))
    if tracking.mlflow_uri:
        observers.append(MlflowTracker(tracking.mlflow_uri, tracking.mlflow_experiment, tracking.log_every))
    return observers
